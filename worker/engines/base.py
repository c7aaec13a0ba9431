"""The one interface every segmentation engine implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Prompt:
    """Prompts in the image's pixel frame (origin top-left, x to the right).

    points: (N, 2) float64, x then y, in pixels; N may be 0.
    labels: (N,) int64, 1 foreground, 0 background.
    box:    (4,) float64 x_min, y_min, x_max, y_max in pixels, or None.
    At least one point or a box is present.
    """

    points: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    box: npt.NDArray[np.float64] | None


@dataclass(frozen=True)
class Candidate:
    """One proposed object mask.

    mask:  (H, W) bool at the input image's size, True on the object.
    score: the engine's confidence, higher is better (SAM: predicted IoU).
    """

    mask: npt.NDArray[np.bool_]
    score: float


class SegmentationEngine(Protocol):
    """Turns an image and a prompt into masks.

    ``name`` is what segq records on the job (e.g. ``sam_vit_b``, ``grabcut``).
    """

    name: str

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        """image: (H, W, 3) uint8 RGB. Returns candidates best first: exactly one
        when ``multimask`` is false, up to three when it is true."""
        ...
