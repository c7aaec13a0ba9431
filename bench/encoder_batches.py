"""What the SAM-family benchmarks share: an image the encoder cannot
shortcut, a device-synchronised timer, and the encoder's images per second
by precision and batch size (the GPU rows of bench/gpu_run.sh)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from segq.worker.engines.encoder_options import EncoderOptions, Precision


class ImageEncoding(Protocol):
    def encode_images(self, images: Sequence[npt.NDArray[np.uint8]]) -> None: ...


def photograph_like(width: int, height: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """Smooth colour fields with fine noise (the encoder's cost is the same
    for any pixels; this only keeps masks from being trivial)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack(
        [128 + 100 * np.sin(xs / 97 + c) * np.cos(ys / 71 - c) for c in range(3)], axis=-1
    )
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encoder_images_per_second(
    engine: ImageEncoding, images: list[npt.NDArray[np.uint8]], device: str, repeat: int
) -> float:
    """The engine's encode_images on ``images``: the best of ``repeat`` runs
    after one warm-up."""
    best = float("inf")
    for attempt in range(repeat + 1):
        synchronize(device)
        started = time.perf_counter()
        engine.encode_images(images)
        synchronize(device)
        if attempt > 0:
            best = min(best, time.perf_counter() - started)
    return len(images) / best


def encoder_batch_rows(
    engine_for: Callable[[EncoderOptions], ImageEncoding],
    batches: Sequence[int],
    width: int,
    height: int,
    device: str,
    repeat: int,
) -> list[dict[str, Any]]:
    """Images per second of the engine ``engine_for`` builds, for each batch
    size, in fp32 and (where the GPU has it) bf16; each row printed as it is
    measured, peak GPU memory included on a GPU."""
    precisions = [Precision.FP32]
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        precisions.append(Precision.BF16)
    rows = []
    for precision in precisions:
        baseline = None
        for batch in batches:
            images = [photograph_like(width, height, seed=i) for i in range(batch)]
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            engine = engine_for(EncoderOptions(precision, batch_size=batch))
            rate = encoder_images_per_second(engine, images, device, repeat)
            baseline = baseline or rate
            row: dict[str, Any] = {
                "precision": str(precision),
                "batch": batch,
                "images_per_s": round(rate, 3),
                "ms_per_image": round(1000 / rate, 1),
                "vs_batch_1": round(rate / baseline, 2),
            }
            if device.startswith("cuda"):
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows
