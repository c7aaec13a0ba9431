"""A benchmark-only engine: it returns a fixed mask and does no work, so a
benchmark of the pipeline measures segq's own overhead (queue, claim, image
load, encoding, storage, completion) and nothing of a model's. Never use it
to segment anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from segq.engine_catalogue import BENCHMARK_FIXED_MASK, EngineEntry
from segq.worker.engines.base import Candidate, EngineSetup, Prompt


class BenchmarkFixedMaskEngine:
    name = BENCHMARK_FIXED_MASK

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        """The middle half of the image in each direction, score 1, whatever the prompt."""
        height, width = image.shape[:2]
        mask = np.zeros((height, width), dtype=np.bool_)
        mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
        return [Candidate(mask=mask, score=1.0)]


def build_engine(
    entry: EngineEntry, weights: Path | None, setup: EngineSetup
) -> BenchmarkFixedMaskEngine:
    """The family's loader (segq.worker.engines.load_engine calls it)."""
    return BenchmarkFixedMaskEngine()
