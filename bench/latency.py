"""How long a warm one-item job takes, POSTed with ``Prefer: wait``, and
where the time goes: a real `segq serve` (one process) and `segq worker`
(one process) on Postgres, Redis and S3 (moto on loopback).

For each engine (the classical GrabCut; SAM ViT-B at its real size with
random weights, whose speed does not depend on them, its embedding cached
by warm-up jobs on the same image) and each image (a smooth one: a disc on
a plain ground; a noisy one: the same object full of holes; each case prints its mask's
polygon vertices), after warm-up jobs, it POSTs ``--jobs``
one-item jobs one after the other and prints p50/p95/p99 of:

- end to end: from the POST to its answer (Completed), in this process;
- engine: the engine's own time, from the item's metrics;
- overhead: end to end less engine (the figure segq's own code answers for);
- worker: the attempt's time from its claim to its notification, and each
  of its stages, read from the worker's /metrics histograms (the change of
  each ``_sum`` over the job: one item runs at a time);
- outside the worker: end to end less the worker's time (the API, the
  broker, Celery's delivery to the pool process, the answer).

With ``--baseline PATH`` (a checkout of another commit, e.g. made by
``git worktree add``), each case runs first with that checkout's processes,
then with this one's, in the same run, on the same images; a checkout
without stage histograms shows end to end, engine and overhead only.

    make bench-latency                 # = .venv/bin/python bench/latency.py
    .venv/bin/python bench/latency.py --engines grabcut --jobs 100 --baseline /tmp/segq-main

The machine is shared and noisy: compare figures of one run.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import redis
import requests
from moto.server import ThreadedMotoServer
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.engine_pipeline import random_checkpoint  # noqa: E402
from bench.ingest import percentile  # noqa: E402
from bench.stack import REPO as THIS_CHECKOUT  # noqa: E402
from bench.stack import Stack, add_service_arguments, free_port  # noqa: E402

BUCKET = "segq-bench-latency"
#: A point on the object and a box around it: GrabCut needs the box, SAM takes both.
PROMPT = {
    "points": [{"x": 0.5, "y": 0.5, "label": 1}],
    "boundingBox": {"xMin": 0.2, "yMin": 0.15, "xMax": 0.8, "yMax": 0.85},
}
STAGE_METRIC = "segq_worker_item_stage_seconds"
TOTAL_METRIC = "segq_worker_item_seconds"
ENGINES = {"grabcut": "grabcut (classical)", "sam_vit_b": "SAM ViT-B (random weights)"}


GROUND_COLOUR, OBJECT_COLOUR = (40, 90, 160), (220, 180, 60)


def smooth_image(width: int, height: int) -> np.ndarray[Any, Any]:
    rows, columns = np.mgrid[0:height, 0:width]
    inside = (columns - width / 2) ** 2 + (rows - height / 2) ** 2 <= (
        0.3 * min(width, height)
    ) ** 2
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[...] = GROUND_COLOUR
    pixels[inside] = OBJECT_COLOUR
    return pixels


def noisy_image(width: int, height: int) -> np.ndarray[Any, Any]:
    """The smooth image with holes: a third of the object's 6x6 blocks in
    the ground's colour (GrabCut smooths smaller ones away)."""
    pixels = smooth_image(width, height)
    inside = np.all(pixels == OBJECT_COLOUR, axis=-1)
    blocks = np.random.default_rng(7).random((height // 6 + 1, width // 6 + 1)) < 0.3
    holes = np.kron(blocks, np.ones((6, 6), dtype=bool))[:height, :width] & inside
    pixels[holes] = GROUND_COLOUR
    return pixels


IMAGES = {"smooth": smooth_image, "noisy": noisy_image}


def png_bytes(pixels: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Case:
    """The figures of one engine on one image with one checkout (ms)."""

    end_to_end: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    worker: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    vertices: int = 0

    @property
    def overhead(self) -> list[float]:
        return [e2e - engine for e2e, engine in zip(self.end_to_end, self.engine, strict=True)]

    @property
    def outside_worker(self) -> list[float]:
        return [e2e - w for e2e, w in zip(self.end_to_end, self.worker, strict=True)]


class WorkerMetrics:
    """The worker's /metrics: the stage histograms' sums, read between jobs."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.has_stages = True

    def sums(self) -> tuple[int, dict[str, float]]:
        """How many attempts the total's histogram counted, and every stage's
        sum (and the total's, under "total"), in seconds."""
        text = requests.get(self.url, timeout=10).text
        count, sums = 0, {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == f"{STAGE_METRIC}_sum":
                    sums[sample.labels["stage"]] = sample.value
                elif sample.name == f"{TOTAL_METRIC}_sum":
                    sums["total"] = sample.value
                elif sample.name == f"{TOTAL_METRIC}_count":
                    count = int(sample.value)
        return count, sums

    def after(self, count_before: int) -> dict[str, float]:
        """The sums once the attempt after ``count_before`` is counted (the
        worker observes it just after it notified the API)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            count, sums = self.sums()
            if count > count_before:
                return sums
            time.sleep(0.002)
        raise RuntimeError("the worker never counted the job's item")


def run_job(stack: Stack, file_id: int, *, timed: bool = True) -> dict[str, Any]:
    response = stack.http.post(
        f"{stack.base}/context/vision/segment",
        json={"items": [{"fileId": file_id}], **PROMPT},
        headers={"Prefer": "wait=60"},
    )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    while body["status"] == "Running" and not timed:
        # A warm-up job may outlast one wait (SAM's first embedding on a CPU).
        again = stack.http.get(
            f"{stack.base}/context/vision/segment/{body['jobId']}",
            headers={"Prefer": "wait=60"},
        )
        again.raise_for_status()
        body = again.json()
    if body["status"] != "Completed":
        raise RuntimeError(f"job {body['jobId']} answered {body['status']}: {body}")
    return body


@dataclass
class Deployment:
    """One checkout's `segq serve` + `segq worker`, and an image's file id in it."""

    label: str
    stack: Stack
    metrics: WorkerMetrics
    file_ids: dict[str, int] = field(default_factory=dict)


def timed_job(deployment: Deployment, image: str, case: Case) -> None:
    """One job on ``image``, its figures added to ``case``."""
    metrics = deployment.metrics
    count, before = metrics.sums() if metrics.has_stages else (0, {})
    started = time.perf_counter()
    body = run_job(deployment.stack, deployment.file_ids[image])
    case.end_to_end.append((time.perf_counter() - started) * 1000)
    [item] = body["items"]
    case.engine.append(item["metrics"]["encodeMs"] + item["metrics"]["decodeMs"])
    case.vertices = sum(
        len(ring["vertices"]) for segment in item["segments"] for ring in segment["polygons"]
    )
    if metrics.has_stages:
        after = metrics.after(count)
        for stage, value in after.items():
            spent = (value - before.get(stage, 0.0)) * 1000
            if stage == "total":
                case.worker.append(spent)
            else:
                case.stages.setdefault(stage, []).append(spent)


def measure(deployments: list[Deployment], args: argparse.Namespace) -> dict[tuple[str, str], Case]:
    """Per image, warm-up jobs on each deployment, then ``args.jobs`` jobs on
    each, taking turns job by job: a deployment runs while the others are
    idle, and the machine's load at any moment falls on each alike."""
    cases: dict[tuple[str, str], Case] = {}
    for image in IMAGES:
        for deployment in deployments:
            for _ in range(args.warmup):
                run_job(deployment.stack, deployment.file_ids[image], timed=False)
            if deployment.metrics.has_stages:
                time.sleep(0.2)
                deployment.metrics.has_stages = deployment.metrics.sums()[0] > 0
        for _ in range(args.jobs):
            for deployment in deployments:
                timed_job(deployment, image, cases.setdefault((deployment.label, image), Case()))
    return cases


@contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    credentials = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(credentials)
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield {
            **credentials,
            "SEGQ_STORAGE_URL": f"s3://{BUCKET}",
            "SEGQ_S3_ENDPOINT_URL": endpoint,
        }
    finally:
        server.stop()


@contextmanager
def private_redis() -> Iterator[str]:
    """A Redis of the run's own (the deployments flush their databases)."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def deploy(
    running: ExitStack,
    engine: str,
    checkout: Path,
    label: str,
    number: int,
    redis_url: str,
    s3: dict[str, str],
    args: argparse.Namespace,
    workdir: Path,
) -> Deployment:
    metrics_port = free_port()
    environment = {
        **s3,
        "SEGQ_MODEL": engine,
        "SEGQ_DEVICE": args.device,
        "SEGQ_METRICS_PORT": str(metrics_port),
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"metrics-{number}-{engine}"),
    }
    if engine.startswith("sam_"):
        model = engine.removeprefix("sam_")
        checkpoint = workdir / f"random_{model}.pth"
        if not checkpoint.exists():
            checkpoint = random_checkpoint(model, workdir)
        environment["SEGQ_MODEL_CHECKPOINT"] = str(checkpoint)
    folder = workdir / f"deployment-{number}-{engine}"
    folder.mkdir()
    stack = Stack(
        argparse.Namespace(**{**vars(args), "redis": redis_url}), folder, environment, checkout
    )
    running.callback(stack.close)
    running.enter_context(stack.api())
    stack.wait_ready()
    running.enter_context(stack.workers())
    deployment = Deployment(label, stack, WorkerMetrics(metrics_port))
    for name, draw in IMAGES.items():
        response = stack.http.post(
            f"{stack.base}/files",
            files={"file": (f"{name}.png", png_bytes(draw(args.width, args.height)))},
        )
        response.raise_for_status()
        deployment.file_ids[name] = int(response.json()["id"])
    return deployment


def figures(values: list[float]) -> str:
    if not values:
        return "-"
    return " / ".join(f"{percentile(values, p):.1f}" for p in (0.5, 0.95, 0.99))


def report(label: str, case: Case) -> list[str]:
    lines = [
        f"{label}  ({case.vertices} polygon vertices)",
        f"    end to end            {figures(case.end_to_end)}",
        f"    engine                {figures(case.engine)}",
        f"    overhead (e2e-engine) {figures(case.overhead)}",
    ]
    if case.worker:
        lines.append(f"    worker, claim..notify {figures(case.worker)}")
        lines.append(f"    outside the worker    {figures(case.outside_worker)}")
        for stage, values in case.stages.items():
            lines.append(f"      {stage:<20}{figures(values)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default="grabcut,sam_vit_b")
    parser.add_argument("--jobs", type=int, default=50, help="timed jobs per engine and image")
    parser.add_argument("--warmup", type=int, default=3, help="jobs run first, not timed")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--baseline", type=Path, help="a checkout of another commit to measure first"
    )
    add_service_arguments(parser)
    args = parser.parse_args(argv)
    args.api_processes, args.api_threads, args.worker_processes = 1, 4, 1
    # moto's server logs each request it serves.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    checkouts = [("this checkout", THIS_CHECKOUT)]
    if args.baseline is not None:
        checkouts.insert(0, (f"baseline {args.baseline}", args.baseline))
    print(
        f"{args.jobs} jobs after {args.warmup} warm-up per case, {args.width}x{args.height} PNG; "
        "ms, p50 / p95 / p99",
        flush=True,
    )
    with ExitStack() as services:
        s3 = services.enter_context(moto_s3())
        workdir = Path(services.enter_context(tempfile.TemporaryDirectory(prefix="segq-bench-")))
        # Two deployments need two Redis databases: a server of the run's own.
        redis_url = args.redis if args.baseline is None else services.enter_context(private_redis())
        for engine in engines:
            with ExitStack() as running:
                deployments = [
                    deploy(
                        running, engine, checkout, label, number,
                        redis_url if args.baseline is None else f"{redis_url}/{number}",
                        s3, args, workdir,
                    )
                    for number, (label, checkout) in enumerate(checkouts)
                ]  # fmt: skip
                cases = measure(deployments, args)
            for (label, image), case in cases.items():
                title = f"{ENGINES.get(engine, engine)}, {image} image, {label}"
                print("\n".join(report(title, case)), flush=True)
            # What else ran meanwhile: figures that wait for a CPU depend on it.
            print("load average (1, 5, 15 min): {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
