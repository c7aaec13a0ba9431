"""Livepeer's answer, written as it goes: the same JSON as encoding it whole,
within the size ``answer_size_bound`` computes before the job runs, and what
producing it costs in memory, measured in a subprocess (peak resident memory
from the kernel, VmHWM, reset before): about one mask at the image's size,
not the answer. Run with ``-s`` to see the figures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from segq.api.peers.livepeer import MAX_MASKS, answer_chunks, answer_size_bound, full_size_logits

#: What the measured peak may exceed one float32 mask at the image's size
#: by: OpenCV's intermediate square, a chunk of text, allocator rounding.
SLACK_BYTES = 8 << 20

MEASURE = r"""
import json, re, sys
import numpy as np
from segq.api.peers.livepeer import answer_chunks, full_size_logits

def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024

kind, width, height = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
logits = [rng.normal(0, 8, (256, 256)).astype(np.float32) for _ in range(3)]
stored = [rng.random((height, width)) > 0.5 for _ in range(3)] if kind == "masks" else []

def masks(w, h):
    if kind == "masks":
        return [mask[:h, :w] for mask in stored]
    return (full_size_logits(low_res, w, h) for low_res in logits)

# Code paths touched once before measuring.
for _ in answer_chunks(masks(64, 48), [0.9, 0.8, 0.7], logits):
    pass
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
before = status("VmRSS")
size = 0
for chunk in answer_chunks(masks(width, height), [0.9, 0.8, 0.7], logits):
    size += len(chunk)
print(json.dumps({"peak": status("VmHWM") - before, "size": size}))
"""


def test_the_answer_is_the_json_of_its_arrays() -> None:
    rng = np.random.default_rng(1)
    logits = [rng.normal(0, 8, (256, 256)).astype(np.float32) for _ in range(2)]
    masks = [full_size_logits(low_res, 37, 23) for low_res in logits]
    scores = [0.9, 0.5]
    written = b"".join(answer_chunks(iter(masks), scores, logits))
    assert json.loads(written) == {
        "masks": json.dumps([mask.tolist() for mask in masks]),
        "scores": json.dumps(scores),
        "logits": json.dumps([low_res.tolist() for low_res in logits]),
    }
    binary = [rng.random((23, 37)) > 0.5]
    written = b"".join(answer_chunks(binary, [0.7], []))
    assert json.loads(json.loads(written)["masks"]) == [binary[0].astype(np.float32).tolist()]
    assert json.loads(written)["logits"] == "[]"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "width", "height"),
    [("logits", 1280, 960), ("masks", 2000, 1500)],
    ids=["sam-logits-as-masks", "binary-masks"],
)
def test_writing_the_answer_holds_one_mask_not_the_answer(
    kind: str, width: int, height: int
) -> None:
    answer = subprocess.run(
        [sys.executable, "-c", MEASURE, kind, str(width), str(height)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    measured = json.loads(answer.stdout)
    bound = answer_size_bound(
        width, height, masks=MAX_MASKS, logits=True, masks_as_logits=kind == "logits"
    )
    one_mask = 4 * width * height
    print(
        f"\n{kind} {width}x{height}: answer {measured['size'] / 2**20:.1f} MiB "
        f"(bound {bound / 2**20:.1f}), peak {measured['peak'] / 2**20:.1f} MiB"
    )
    assert measured["size"] <= bound
    assert measured["peak"] <= one_mask + SLACK_BYTES
    assert measured["peak"] < measured["size"] / 4
