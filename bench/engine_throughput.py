"""How many images per second SAM's encoder gets through as segq runs it,
by batch size, precision and compilation, and what a real `segq worker`
finishes end to end. A random-weight SAM (speed does not depend on the
weights) is saved to a temporary checkpoint and loaded through segq's own
loader.

Engine rows: ms per image and images/s of the image encoder (the part
batching, precision, SDPA and compilation act on; the mask decoder is
milliseconds) at each batch size, fp32 against bf16, compile off and on.
Every figure is also a ratio to the baseline measured first in the same run:
batch 1, fp32, segment_anything's own attention, not compiled (what segq
ran before batching).

End-to-end rows (``--items N``, 0 to skip): a real `segq serve` and
`segq worker` on Postgres and Redis (bench/ingest.py's harness, local-disk
storage) drain N one-item jobs, then one N-item job, with the worker's
defaults for the device unless ``--worker-batch``/``--worker-precision``
say; items/s from the first item's start to the last one's finish, and as a
fraction of the engine-only rate of the same configuration.

    make bench-throughput                                    # CPU: small
    python bench/engine_throughput.py --device cuda --model vit_h \\
        --batches 1,4,8,16 --precisions fp32,bf16 --compile off,on --items 200

The machine is shared and noisy: compare ratios, and rerun before comparing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.stack import add_service_arguments  # noqa: E402
from segq.worker.engines.encoder_options import EncoderOptions, Precision  # noqa: E402
from segq.worker.engines.sam import SAM_ARCHITECTURES, load_sam  # noqa: E402
from segq.worker.engines.sam_encoder import SamImageEncoder  # noqa: E402
from segq.worker.engines.torch_support import default_batch_size, resolve_device, resolve_precision  # noqa: E402


@dataclass(frozen=True)
class EngineRow:
    model: str
    batch: int
    precision: str
    compiled: bool
    sdpa: bool
    ms_per_image: float
    #: Peak GPU memory of the encoder at this batch (MiB); None on a CPU.
    peak_mib: float | None

    @property
    def images_per_second(self) -> float:
        return 1000 / self.ms_per_image


def photograph_like(count: int, seed: int = 0) -> list[npt.NDArray[np.uint8]]:
    """Distinct 1024x768 RGB images (noise: the encoder's cost does not
    depend on the content, and distinct pixels defeat every cache)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8) for _ in range(count)]


def save_random_checkpoint(model: str, folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / f"random-{model}.pth"
    torch.save(SAM_ARCHITECTURES[model]().state_dict(), path)
    return path


def measure(
    checkpoint: Path,
    model: str,
    device: str,
    options: EncoderOptions,
    rounds: int,
) -> EngineRow:
    """Encode ``rounds`` batches (after one untimed batch) of fresh images."""
    assert options.batch_size is not None
    sam = load_sam(model, checkpoint, device)
    encoder = SamImageEncoder(sam, options)
    batch = options.batch_size
    images = photograph_like(batch * (rounds + 1))
    encoder.encode(images[:batch])  # allocator, kernels and caches warm
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for round_index in range(1, rounds + 1):
        encoder.encode(images[round_index * batch : (round_index + 1) * batch])
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    row = EngineRow(
        model=model,
        batch=encoder.limit.size,
        precision=str(encoder.precision),
        compiled=options.compile,
        sdpa=options.sdpa,
        ms_per_image=elapsed * 1000 / (rounds * batch),
        peak_mib=peak,
    )
    del encoder, sam
    if cuda:
        torch.cuda.empty_cache()
    return row


def describe(row: EngineRow, baseline: EngineRow) -> str:
    peak = "" if row.peak_mib is None else f"{row.peak_mib:>9.0f}"
    compiled = "on" if row.compiled else "off"
    attention = "sdpa" if row.sdpa else "ref"
    ratio = baseline.ms_per_image / row.ms_per_image
    return (
        f"{row.model:<6} {row.batch:>5} {row.precision:<5} {compiled:<7} {attention:<5} "
        f"{row.ms_per_image:>9.1f} {row.images_per_second:>8.2f} {ratio:>6.2f}x {peak}"
    )


def engine_rows(args: argparse.Namespace, checkpoint: Path, device: str) -> list[EngineRow]:
    baseline = measure(
        checkpoint,
        args.model,
        device,
        EncoderOptions(precision=Precision.FP32, batch_size=1, sdpa=False),
        args.rounds,
    )
    print(
        f"{'model':<6} {'batch':>5} {'prec':<5} {'compile':<7} {'attn':<5} "
        f"{'ms/image':>9} {'images/s':>8} {'ratio':>7} {'peak MiB':>9}"
    )
    print(describe(baseline, baseline) + "   <- baseline")
    rows = [baseline]
    for compiled in args.compile:
        for precision in args.precisions:
            for batch in args.batches:
                options = EncoderOptions(
                    precision=Precision(precision), batch_size=batch, compile=compiled
                )
                try:
                    row = measure(checkpoint, args.model, device, options, args.rounds)
                except torch.OutOfMemoryError:
                    print(f"{args.model:<6} {batch:>5} {precision:<5} out of GPU memory")
                    continue
                rows.append(row)
                print(describe(row, baseline), flush=True)
    return rows


def end_to_end(
    args: argparse.Namespace, checkpoint: Path, device: str, rows: list[EngineRow]
) -> None:
    from bench.ingest import Bench  # Postgres, Redis, `segq serve`, `segq worker`

    with tempfile.TemporaryDirectory(prefix="segq-throughput-") as workdir:
        bench_args = argparse.Namespace(
            postgres=args.postgres,
            redis=args.redis,
            api_processes=1,
            api_threads=4,
            worker_processes=1,
            client_threads=4,
        )
        bench = Bench(bench_args, Path(workdir))
        bench.env.update(
            {
                "SEGQ_MODEL": f"sam_{args.model}",
                "SEGQ_MODEL_CHECKPOINT": str(checkpoint),
                "SEGQ_DEVICE": device,
                "SEGQ_ENGINE_BATCH": str(args.worker_batch or ""),
                "SEGQ_PRECISION": args.worker_precision,
                # Each item is a fresh image: the cache would only add writes.
                "SEGQ_EMBEDDING_CACHE_MB": "1",
            }
        )
        prompt = {"boundingBox": {"xMin": 0.2, "yMin": 0.2, "xMax": 0.8, "yMax": 0.8}}
        figures = []
        try:
            with bench.api():
                bench.wait_ready()
                ids = bench.upload_images(2 * args.items)  # distinct: no embedding reused
                for label, bodies in (
                    (
                        f"{args.items} one-item jobs",
                        [{"items": [{"fileId": i}], **prompt} for i in ids[: args.items]],
                    ),
                    (
                        f"one {args.items}-item job",
                        [{"items": [{"fileId": i} for i in ids[args.items :]], **prompt}],
                    ),
                ):
                    before = bench.last_job()
                    bench.submit(bodies)
                    with bench.workers():
                        seconds = bench.drain(before)
                    figures.append((label, args.items / seconds))
        finally:
            bench.close()
    batch = args.worker_batch or default_batch_size(device)
    precision = str(resolve_precision(Precision(args.worker_precision), device))
    same = [
        r
        for r in rows
        if r.batch == batch and not r.compiled and r.sdpa and r.precision == precision
    ]
    engine_rate = same[-1].images_per_second if same else None
    print(f"\nend to end: one `segq worker` (batch {batch}, precision {precision}), {device}")
    for label, rate in figures:
        share = "" if engine_rate is None else f"  = {rate / engine_rate:.0%} of engine-only"
        print(f"  {label:<24} {rate:8.2f} items/s{share}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="vit_b", choices=sorted(SAM_ARCHITECTURES))
    parser.add_argument("--batches", default="1,4,8,16", type=_ints)
    parser.add_argument("--precisions", default="fp32,bf16", type=_names)
    parser.add_argument("--compile", default="off", type=_switches, help="off, on or off,on")
    parser.add_argument("--rounds", type=int, default=2, help="timed batches per row")
    parser.add_argument("--items", type=int, default=0, help="end-to-end items; 0 skips")
    parser.add_argument("--worker-batch", type=int, default=0, help="0: the device default")
    parser.add_argument("--worker-precision", default="auto")
    add_service_arguments(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"{name}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads")
    with tempfile.TemporaryDirectory(prefix="segq-weights-") as folder:
        checkpoint = save_random_checkpoint(args.model, Path(folder))
        rows = engine_rows(args, checkpoint, device)
        if args.items:
            end_to_end(args, checkpoint, device, rows)
    return 0


def _ints(raw: str) -> list[int]:
    return [int(part) for part in raw.split(",")]


def _names(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",")]


def _switches(raw: str) -> list[bool]:
    return [part.strip() == "on" for part in raw.split(",")]


if __name__ == "__main__":
    sys.exit(main())
