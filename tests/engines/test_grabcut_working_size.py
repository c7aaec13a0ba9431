"""GrabCut's cost is bounded by the image: past ``max_side`` it works on a
shrunk copy and scales its masks back, and the masks still fit the object."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from segq.worker.engines.base import Prompt
from segq.worker.engines.grabcut import GrabCutEngine


def _object_scene(width: int, height: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """A textured background with one ellipse of another colour: the truth is known."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    truth = np.zeros((height, width), dtype=np.uint8)
    cv2.ellipse(
        truth, (width // 2, height // 2), (width // 5, height // 4), 15, 0, 360, 1, thickness=-1
    )
    image[truth == 1] = rng.integers(170, 230, size=(int(truth.sum()), 3), dtype=np.uint8)
    return image, truth.astype(bool)


def _iou(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(np.logical_and(a, b).sum()) / float(np.logical_or(a, b).sum())


def test_a_large_image_is_cut_at_the_working_size_and_its_mask_scaled_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    width, height = 2400, 1500
    image, truth = _object_scene(width, height)
    prompt = Prompt(
        points=np.array([[width / 2, height / 2]], dtype=np.float64),
        labels=np.array([1], dtype=np.int64),
        box=np.array([width * 0.25, height * 0.2, width * 0.75, height * 0.8], dtype=np.float64),
    )
    # Everything but the final resize happens in _segment: what it is given
    # is what the engine's work scales with.
    seen: list[tuple[int, ...]] = []
    segment = GrabCutEngine._segment

    def recording_segment(self: GrabCutEngine, img: Any, *args: Any) -> Any:
        seen.append(img.shape)
        return segment(self, img, *args)

    monkeypatch.setattr(GrabCutEngine, "_segment", recording_segment)
    [candidate] = GrabCutEngine(max_side=600).segment(image, prompt, multimask=False)

    assert seen == [(375, 600, 3)]
    assert candidate.mask.shape == (height, width)
    assert _iou(candidate.mask, truth) > 0.9
