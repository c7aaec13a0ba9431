"""What SAM costs per item, and what the embedding cache saves: a random-weight
SAM (speed does not depend on the weights) saved to a temporary checkpoint and
loaded through segq's own loader, then

- the image encoder's ms per image and the mask decoder's ms per prompt;
- the engine's time for the same image's second item: in the same process
  (tier 1) and in another process with an empty tier 1 that shares tier 2
  (a child process, started fresh), against the first item;
- one job with 16 prompts on an image against 16 one-prompt jobs on it:
  with the cache off (each job pays the encoder, as before the cache; 16 x
  the mean of ``--baseline-jobs`` measured jobs, to keep a CPU run short) and
  with it on (one encoding, then 16 single-prompt decodes);
- encoding one 1024x1024 mask as PNG, polygons, RLE and SVG.

The items run in-process through the engine with the worker's cache: the
figures are the engine's, which is where the cache acts. The same through the
whole pipeline (Postgres, Redis, S3, `segq worker`): bench/engine_pipeline.py.

    python bench/engine.py [--device cpu] [--model vit_b] [--prompts 5]
    python bench/engine.py --device cuda --model vit_h
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from segment_anything.modeling import Sam  # noqa: E402

from segq.storage import LocalStorage  # noqa: E402
from segq.worker.engines.base import Prompt, SegmentationEngine, segment_prompts  # noqa: E402
from segq.worker.engines.embedding_cache import (  # noqa: E402
    EmbeddingCache,
    checkpoint_digest,
    model_id,
)
from segq.worker.engines.item_metrics import ItemMetrics, recording_item_metrics  # noqa: E402
from segq.worker.engines.sam import SamEngine, load_sam  # noqa: E402
from segq.worker.masks import encode_png, mask_polygons, mask_rle, polygons_svg_path  # noqa: E402

MB = 1024 * 1024


def photograph_like(width: int, height: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """Smooth colour fields with fine noise: an image the encoder cannot
    shortcut (it never does: its cost is the same for any pixels)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack(
        [128 + 100 * np.sin(xs / 97 + c) * np.cos(ys / 71 - c) for c in range(3)], axis=-1
    )
    noise = rng.normal(0, 8, (height, width, 3))
    return np.asarray(np.clip(base + noise, 0, 255), dtype=np.uint8)


def prompt_at(index: int, width: int, height: int) -> Prompt:
    x = width * (0.2 + 0.6 * ((index * 37) % 11) / 10)
    y = height * (0.2 + 0.6 * ((index * 53) % 7) / 6)
    return Prompt(
        points=np.array([[x, y]], dtype=np.float64),
        labels=np.array([1], dtype=np.int64),
        box=None,
    )


def run_item(
    engine: SegmentationEngine, image: npt.NDArray[np.uint8], prompt: Prompt
) -> ItemMetrics:
    with recording_item_metrics() as metrics:
        engine.segment(image, prompt, multimask=False)
    return metrics


def worker_cache(objects: Path) -> EmbeddingCache:
    """What a worker process starts with: a tier 1 of its own, tier 2 in
    ``objects`` (a stand-in for the shared bucket)."""
    return EmbeddingCache(
        LocalStorage(objects, secret_key="bench"), max_bytes=512 * MB, ttl_seconds=3600
    )


def open_model(args: argparse.Namespace, checkpoint: Path) -> tuple[Sam, str]:
    """The model through segq's loader, and its id in the cache (as
    ``worker.engines.load_engine`` makes them)."""
    sam = load_sam(args.model, checkpoint, args.device)
    return sam, model_id(f"sam_{args.model}", checkpoint_digest(checkpoint))


def engine_on(sam: Sam, args: argparse.Namespace, model: str, cache: EmbeddingCache) -> SamEngine:
    return SamEngine(sam, f"sam_{args.model}", embeddings=cache, model_id=model)


def second_process(args: argparse.Namespace) -> int:
    """The child: a fresh process, so a fresh tier 1; prints its item as JSON."""
    sam, model = open_model(args, Path(args.checkpoint))
    engine = engine_on(sam, args, model, worker_cache(Path(args.objects)))
    image = photograph_like(args.width, args.height)
    metrics = run_item(engine, image, prompt_at(1, args.width, args.height))
    print(json.dumps({"embedding": str(metrics.embedding), "engineMs": metrics.engine_ms}))
    return 0


def many_prompts_rows(
    sam: Sam, args: argparse.Namespace, image: npt.NDArray[np.uint8]
) -> list[tuple[str, str]]:
    """One job with ``args.many`` prompts against that many one-prompt jobs,
    in engine time. A fresh engine per job without a cache is a worker that
    has not seen the image: what every one-prompt job paid before the cache."""
    height, width = image.shape[:2]
    prompts = [prompt_at(i, width, height) for i in range(args.many)]

    def engine_ms(engine: SegmentationEngine, batch: list[Prompt]) -> float:
        with recording_item_metrics() as metrics:
            segment_prompts(engine, image, batch, multimask=False)
        return metrics.engine_ms

    together = engine_ms(SamEngine(sam, f"sam_{args.model}"), prompts)
    uncached = [
        engine_ms(SamEngine(sam, f"sam_{args.model}"), [prompts[i]])
        for i in range(args.baseline_jobs)
    ]
    apart_uncached = args.many * statistics.mean(uncached)
    cached_engine = SamEngine(sam, f"sam_{args.model}")
    apart_cached = sum(engine_ms(cached_engine, [prompt]) for prompt in prompts)
    return [
        (f"{args.many} prompts in one job", f"{together:.0f} ms"),
        (
            f"{args.many} one-prompt jobs, cache off",
            f"{apart_uncached:.0f} ms  ({args.many} x mean of {len(uncached)} measured; "
            f"{apart_uncached / together:.1f}x the one job)",
        ),
        (
            f"{args.many} one-prompt jobs, cache on",
            f"{apart_cached:.0f} ms  ({apart_cached / together:.2f}x the one job)",
        ),
    ]


def mask_encoding_ms(repeat: int) -> dict[str, float]:
    """Best of ``repeat`` for each output of one 1024x1024 mask (a disc with a hole)."""
    ys, xs = np.mgrid[0:1024, 0:1024]
    radius = np.hypot(xs - 500, ys - 480)
    mask = np.ascontiguousarray((radius < 380) & (radius > 90))
    # The worker traces the rings once for polygons and SVG alike.
    rings = mask_polygons(mask)
    figures: dict[str, float] = {}
    for name, action in (
        ("PNG", lambda: encode_png(mask)),
        ("polygons", lambda: mask_polygons(mask)),
        ("RLE", lambda: mask_rle(mask)),
        ("SVG path (from the rings)", lambda: polygons_svg_path(rings, 1024, 1024)),
    ):
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            action()
            times.append((time.perf_counter() - started) * 1000)
        figures[name] = min(times)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--prompts", type=int, default=5, help="prompts timed on one embedding")
    parser.add_argument("--many", type=int, default=16, help="prompts in the many-prompt job")
    parser.add_argument(
        "--baseline-jobs",
        type=int,
        default=2,
        help="cache-off one-prompt jobs measured (their mean stands for each of --many)",
    )
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--objects", help=argparse.SUPPRESS)
    parser.add_argument("--second-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.second_process:
        return second_process(args)

    import torch
    from segment_anything import sam_model_registry

    with tempfile.TemporaryDirectory(prefix="segq-bench-engine-") as workdir:
        checkpoint = Path(workdir) / f"random_{args.model}.pth"
        torch.manual_seed(0)
        torch.save(sam_model_registry[args.model](checkpoint=None).state_dict(), checkpoint)
        objects = Path(workdir) / "objects"
        started = time.perf_counter()
        sam, model = open_model(args, checkpoint)
        cache = worker_cache(objects)
        engine = engine_on(sam, args, model, cache)
        load_s = time.perf_counter() - started
        image = photograph_like(args.width, args.height)

        first = run_item(engine, image, prompt_at(0, args.width, args.height))
        assert str(first.embedding) == "computed", first.embedding
        decodes = [
            run_item(engine, image, prompt_at(i, args.width, args.height)).as_result()["decodeMs"]
            for i in range(1, args.prompts + 1)
        ]
        # A second engine on the same model and tier 1, with a predictor of
        # its own: what a worker that served other images in between finds.
        again = engine_on(sam, args, model, cache)
        local = run_item(again, image, prompt_at(1, args.width, args.height))
        assert str(local.embedding) == "local", local.embedding

        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--second-process",
                f"--device={args.device}",
                f"--model={args.model}",
                f"--width={args.width}",
                f"--height={args.height}",
                f"--checkpoint={checkpoint}",
                f"--objects={objects}",
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        shared = json.loads(child.stdout.strip().splitlines()[-1])
        assert shared["embedding"] == "shared", shared
        many_rows = many_prompts_rows(sam, args, image)

    first_ms = first.engine_ms
    rows = [
        ("model / device", f"{args.model} (random weights) / {args.device}"),
        ("image", f"{args.width}x{args.height}"),
        ("load (build, read checkpoint, SHA-256)", f"{load_s * 1000:.0f} ms"),
        ("encoder per image", f"{first.encode_ms:.0f} ms"),
        (f"decoder per prompt (median of {len(decodes)})", f"{statistics.median(decodes):.1f} ms"),
        ("first item, engine time (computed)", f"{first_ms:.0f} ms"),
        (
            "second item, same process (local)",
            f"{local.engine_ms:.1f} ms  ({first_ms / local.engine_ms:.0f}x faster)",
        ),
        (
            "second item, another process (shared)",
            f"{shared['engineMs']:.1f} ms  ({first_ms / shared['engineMs']:.0f}x faster)",
        ),
    ]
    rows += many_rows
    masks = mask_encoding_ms(repeat=5)
    rows += [(f"1024x1024 mask: {name}", f"{ms:.2f} ms") for name, ms in masks.items()]
    rows.append(("1024x1024 mask: all four", f"{sum(masks.values()):.2f} ms"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
