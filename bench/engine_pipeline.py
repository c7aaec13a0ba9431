"""The embedding cache through the whole pipeline: a real `segq serve` and
`segq worker` on Postgres, Redis and S3 (moto on loopback), running a
random-weight SAM (speed does not depend on the weights) loaded through
segq's own loader. For one photograph-sized image it times, from the POST to
the job read back as Completed:

- the first job (the worker computes the embedding);
- a second job on the same image in the same worker process (tier 1 hit);
- a third job after that worker was stopped and a new one started: a fresh
  process with an empty tier 1, which finds the embedding in S3 (tier 2).

Each worker first runs a job on another image, so that loading the model and
the first call's one-off costs are not counted in the figures compared.

    make bench-engine-pipeline       # = .venv/bin/python bench/engine_pipeline.py
    .venv/bin/python bench/engine_pipeline.py --model vit_b --device cpu

The machine is shared and noisy: compare the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
from moto.server import ThreadedMotoServer
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.engine import photograph_like
from bench.stack import Stack, add_service_arguments, free_port

BUCKET = "segq-bench"
PROMPT = {"points": [{"x": 0.5, "y": 0.5, "label": 1}]}


@dataclass
class JobTiming:
    seconds: float
    embedding: str | None
    engine_ms: float


def png_bytes(pixels: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def random_checkpoint(model: str, folder: Path) -> Path:
    import torch
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = folder / f"random_{model}.pth"
    torch.save(sam_model_registry[model](checkpoint=None).state_dict(), path)
    return path


def upload(stack: Stack, pixels: np.ndarray[Any, Any]) -> int:
    response = stack.http.post(
        f"{stack.base}/files", files={"file": ("photo.png", png_bytes(pixels))}
    )
    response.raise_for_status()
    return int(response.json()["id"])


def timed_job(stack: Stack, file_id: int, timeout: float) -> JobTiming:
    """POST one job and poll it every 20 ms until it is Completed."""
    started = time.perf_counter()
    response = stack.http.post(
        f"{stack.base}/context/vision/segment",
        json={"items": [{"fileId": file_id}], **PROMPT},
    )
    response.raise_for_status()
    job_id = response.json()["jobId"]
    deadline = started + timeout
    while time.perf_counter() < deadline:
        body = stack.http.get(f"{stack.base}/context/vision/segment/{job_id}").json()
        if body["status"] == "Completed":
            seconds = time.perf_counter() - started
            metrics = body["items"][0].get("metrics") or {}
            return JobTiming(
                seconds,
                metrics.get("embedding"),
                float(metrics.get("encodeMs", 0)) + float(metrics.get("decodeMs", 0)),
            )
        if body["status"] == "Failed":
            raise RuntimeError(f"job {job_id} failed: {body}")
        time.sleep(0.02)
    raise RuntimeError(f"job {job_id} did not finish in {timeout:.0f} s")


def run(args: argparse.Namespace) -> list[tuple[str, str]]:
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(credentials)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        with tempfile.TemporaryDirectory(prefix="segq-bench-pipeline-") as workdir:
            checkpoint = random_checkpoint(args.model, Path(workdir))
            stack = Stack(
                args,
                Path(workdir),
                {
                    **credentials,
                    "SEGQ_MODEL": f"sam_{args.model}",
                    "SEGQ_MODEL_CHECKPOINT": str(checkpoint),
                    "SEGQ_DEVICE": args.device,
                    "SEGQ_STORAGE_URL": f"s3://{BUCKET}",
                    "SEGQ_S3_ENDPOINT_URL": endpoint,
                },
            )
            try:
                return measure(stack, args)
            finally:
                stack.close()
    finally:
        moto.stop()


def measure(stack: Stack, args: argparse.Namespace) -> list[tuple[str, str]]:
    photo = photograph_like(args.width, args.height, seed=1)
    warm_up_images = [photograph_like(args.width, args.height, seed=s) for s in (2, 3)]
    with stack.api():
        stack.wait_ready()
        photo_id = upload(stack, photo)
        warm_ids = [upload(stack, pixels) for pixels in warm_up_images]
        with stack.workers():
            timed_job(stack, warm_ids[0], args.timeout)
            first = timed_job(stack, photo_id, args.timeout)
            same_process = timed_job(stack, photo_id, args.timeout)
        with stack.workers():
            timed_job(stack, warm_ids[1], args.timeout)
            other_process = timed_job(stack, photo_id, args.timeout)
    for name, timing, expected in (
        ("first", first, "computed"),
        ("same process", same_process, "local"),
        ("other process", other_process, "shared"),
    ):
        if timing.embedding != expected:
            raise RuntimeError(f"{name} job's embedding was {timing.embedding}, not {expected}")

    def row(name: str, timing: JobTiming) -> tuple[str, str]:
        ratio = first.seconds / timing.seconds
        return (
            name,
            f"{timing.seconds * 1000:.0f} ms  (engine {timing.engine_ms:.0f} ms; "
            f"{ratio:.0f}x faster than the first)",
        )

    return [
        ("model / device", f"{args.model} (random weights) / {args.device}"),
        ("image", f"{args.width}x{args.height} PNG, 1 point prompt"),
        (
            "first job, POST to Completed",
            f"{first.seconds * 1000:.0f} ms  (engine {first.engine_ms:.0f} ms; computed)",
        ),
        row("second job, same worker (local)", same_process),
        row("second job, new worker (shared)", other_process),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    add_service_arguments(parser)
    args = parser.parse_args(argv)
    # What Stack starts: one API process, one worker process (the cache's
    # tiers are per process, so one makes "same process" certain).
    args.api_processes, args.api_threads, args.worker_processes = 1, 4, 1
    rows = run(args)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
