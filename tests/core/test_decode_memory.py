"""What checking an upload costs in memory, measured: the worst modes at the
pixel limit and at the decode bound, each checked in a subprocess whose peak
resident memory is read from the kernel (VmHWM, reset before each check),
against the cost ``check_cost`` computes from the header.

Run with ``-s`` to see the figures docs/configuration.md quotes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segq.images import TooCostlyToDecode, check_cost
from segq.settings import DEFAULT_MAX_DECODE_BYTES
from tests.support.images import jpeg_claiming, png_of_rows, with_jpeg_size

pytestmark = pytest.mark.slow

#: The shipped limits (segq/settings.py's defaults, deploy/k8s/configmap.yaml).
MAX_PIXELS = 40_000_000
MAX_DECODE_BYTES = DEFAULT_MAX_DECODE_BYTES
#: What the measured peak may exceed the computed cost by: the allocator's
#: rounding and arenas, and pages of code first touched by a check.
SLACK_BYTES = 4 << 20
#: The side of a square image at the pixel limit: the issue's 6300x6300.
SIDE = 6300

#: One check in a process of its own: in a process that has checked before,
#: glibc reuses what it freed and the peak would read low.
MEASURE = r"""
import json, re, sys
from segq.images import ImageRefused, check_image

def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024

case = json.loads(sys.argv[1])
# The code paths and libraries of the format, touched once before measuring.
check_image(open(case["warm_up"], "rb").read(), max_pixels=10**9, max_decode_bytes=2**40)
data = open(case["path"], "rb").read()
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak (VmHWM) starts again from now
before = status("VmRSS")
try:
    check_image(data, max_pixels=case["max_pixels"], max_decode_bytes=case["max_decode_bytes"])
    outcome = "accepted"
except ImageRefused as exc:
    outcome = type(exc).__name__
print(json.dumps({"peak": status("VmHWM") - before, "outcome": outcome}))
"""


def smooth(width: int, height: int, channels: int) -> np.ndarray:
    """Gradients: a photograph's size on disk without its encoding time."""
    ramp = (np.arange(width, dtype=np.uint16) * 255 // max(1, width - 1)).astype(np.uint8)
    column = (np.arange(height, dtype=np.uint16) * 255 // max(1, height - 1)).astype(np.uint8)
    planes = [
        np.broadcast_to(ramp, (height, width)),
        np.broadcast_to(column[:, None], (height, width)),
        np.broadcast_to(255 - ramp, (height, width)),
        np.full((height, width), 40, np.uint8),
    ][:channels]
    return np.ascontiguousarray(np.stack(planes, axis=2) if channels > 1 else planes[0])


def jpeg(width: int, height: int, mode: str, **options: object) -> bytes:
    pixels = smooth(width, height, {"L": 1, "RGB": 3, "CMYK": 4}[mode])
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def largest_within(make: Callable[[int], bytes], low: int, high: int) -> bytes:
    """``make(side)`` for the largest side whose check costs at most the
    bound, by bisection on the header alone (16x16 pixels claiming each
    side tried), then encoded for real."""
    while high - low > 8:
        middle = (low + high) // 2
        if check_cost(with_jpeg_size(make(16), middle, middle)) <= MAX_DECODE_BYTES:
            low = middle
        else:
            high = middle
    return make(low)


#: name -> the image, at the pixel limit or (for JPEGs that need libjpeg's
#: coefficient buffer) at the decode bound.
WORST: dict[str, Callable[[], bytes]] = {
    "png-rgba-16bit": lambda: png_of_rows(SIDE, SIDE, colour_type=6, bit_depth=16),
    "png-rgba-16bit-interlaced": lambda: png_of_rows(
        SIDE, SIDE, colour_type=6, bit_depth=16, interlaced=True
    ),
    "png-grey-16bit": lambda: png_of_rows(SIDE, SIDE, colour_type=0, bit_depth=16),
    "png-grey-alpha-16bit": lambda: png_of_rows(SIDE, SIDE, colour_type=4, bit_depth=16),
    "png-palette": lambda: png_of_rows(SIDE, SIDE, colour_type=3, bit_depth=8),
    "png-1bit": lambda: png_of_rows(SIDE, SIDE, colour_type=0, bit_depth=1),
    "jpeg-baseline-420": lambda: jpeg(SIDE, SIDE, "RGB"),
    "jpeg-baseline-cmyk": lambda: jpeg(SIDE, SIDE, "CMYK"),
    "jpeg-progressive-444": lambda: largest_within(
        lambda side: jpeg(side, side, "RGB", progressive=True, subsampling=0), 16, SIDE
    ),
    "jpeg-progressive-420": lambda: largest_within(
        lambda side: jpeg(side, side, "RGB", progressive=True), 16, SIDE
    ),
    "jpeg-progressive-cmyk": lambda: largest_within(
        lambda side: jpeg(side, side, "CMYK", progressive=True), 16, SIDE
    ),
    "jpeg-progressive-grey": lambda: largest_within(
        lambda side: jpeg(side, side, "L", progressive=True), 16, SIDE
    ),
}

#: Over the bound: refused from the header, before anything is decoded (the
#: files hold 16x16 pixels' data, so a decode would find them unreadable).
OVER: dict[str, Callable[[], bytes]] = {
    "over-jpeg-progressive-444": lambda: jpeg_claiming(SIDE, SIDE, progressive=True, subsampling=0),
    "over-jpeg-progressive-cmyk": lambda: jpeg_claiming(SIDE, SIDE, "CMYK", progressive=True),
}


def test_checking_an_upload_stays_within_the_cost_computed_from_its_header(
    tmp_path: Path,
) -> None:
    warm_ups = {}
    for kind, data in {
        "png": png_of_rows(64, 64, colour_type=6, bit_depth=16),
        "jpeg": jpeg(64, 64, "CMYK", progressive=True),
    }.items():
        warm_ups[kind] = tmp_path / f"warm-up.{kind}"
        warm_ups[kind].write_bytes(data)
    costs = {}
    measured = {}
    for name, make in {**WORST, **OVER}.items():
        data = make()
        path = tmp_path / f"{name}.img"
        path.write_bytes(data)
        costs[name] = check_cost(data)
        case = {
            "path": str(path),
            "warm_up": str(warm_ups["png" if name.startswith("png") else "jpeg"]),
            "max_pixels": MAX_PIXELS,
            "max_decode_bytes": MAX_DECODE_BYTES,
        }
        answer = subprocess.run(
            [sys.executable, "-c", MEASURE, json.dumps(case)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        measured[name] = json.loads(answer.stdout)

    print(f"\n{'case':28s} {'cost MiB':>9s} {'peak MiB':>9s}  outcome")
    for name, found in measured.items():
        print(
            f"{name:28s} {costs[name] / 2**20:9.1f} {found['peak'] / 2**20:9.1f}  "
            f"{found['outcome']}"
        )
    for name in WORST:
        assert measured[name]["outcome"] == "accepted", name
        assert costs[name] <= MAX_DECODE_BYTES, name
        assert measured[name]["peak"] <= costs[name] + SLACK_BYTES, (name, measured[name])
    for name in OVER:
        assert costs[name] > MAX_DECODE_BYTES, name
        assert measured[name]["outcome"] == TooCostlyToDecode.__name__, name
        # Refused before decoding: nothing near the cost was ever held.
        assert measured[name]["peak"] <= SLACK_BYTES, (name, measured[name])
