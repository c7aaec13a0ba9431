"""What deciding an image's validity costs: ``segq.images.decode_image`` (a
strict full decode, done once at upload and once by the worker) on photograph-like
JPEGs and PNGs, and decode + GrabCut on worst-case content at a pixel count.

    python bench/decode_cost.py [--megapixels 4 16 24] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from segq.images import decode_image  # noqa: E402
from segq.worker.engines.base import Prompt  # noqa: E402
from segq.worker.engines.grabcut import GrabCutEngine  # noqa: E402


def photograph_like(width: int, height: int) -> np.ndarray:
    """Smooth colour fields with fine noise: compresses like a photograph."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    smooth = np.asarray(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC))
    noise = rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    return np.asarray(np.clip(smooth.astype(np.int16) + noise, 0, 255), dtype=np.uint8)


def encoded(pixels: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format, **({"quality": 90} if format == "JPEG" else {}))
    return buffer.getvalue()


def best_of(repeat: int, action: object) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--megapixels", type=float, nargs="+", default=[4.0, 16.0, 24.0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    engine = GrabCutEngine()
    print("Mpx   format  bytes       decode s  ms/Mpx")
    for megapixels in args.megapixels:
        width = round((megapixels * 1e6 * 4 / 3) ** 0.5)
        height = round(megapixels * 1e6 / width)
        pixels = photograph_like(width, height)
        limit = width * height
        for format in ("JPEG", "PNG"):
            data = encoded(pixels, format)
            seconds = best_of(args.repeat, lambda d=data, n=limit: decode_image(d, max_pixels=n))
            print(
                f"{limit / 1e6:5.1f} {format:7s} {len(data):11,d} {seconds:9.3f} "
                f"{1000 * seconds / (limit / 1e6):7.1f}"
            )
        worst = 0.0
        for speckles in (0, 20):
            flat = np.full((height, width, 3), (120, 80, 60), dtype=np.uint8)
            rng = np.random.default_rng(0)
            flat[rng.integers(0, height, speckles), rng.integers(0, width, speckles)] = 0
            data = encoded(flat, "PNG")
            box = np.array([0.1 * width, 0.1 * height, 0.9 * width, 0.9 * height])
            prompt = Prompt(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), box)

            def run(d: bytes = data, p: Prompt = prompt, n: int = limit) -> None:
                image = decode_image(d, max_pixels=n)
                engine.segment(image.pixels, p, multimask=True)

            worst = max(worst, best_of(1, run))
        print(f"{limit / 1e6:5.1f} flat PNG, box prompt, 3 candidates: {worst:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
