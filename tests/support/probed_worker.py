"""``segq worker`` as it ships, with its engine wrapped so that fault tests
can see and steer each run from outside the process:

- ``SEGQ_PROBE_RUNS``: a file that gets one line per engine run, the item's
  id and this process's id: an item run twice shows as two lines, whatever
  its stored objects say;
- ``SEGQ_PROBE_GATE``: a file whose appearance the engine waits for before
  it segments, so a test decides when a run ends;
- ``SEGQ_PROBE_INVERT``: when set, masks come out inverted, so the objects
  this worker writes differ from another worker's for the same item;
- ``SEGQ_PROBE_TINY_SAM``: when set, ``sam_vit_b`` is built as the tiny SAM
  of tests/support/tiny_sam.py, so a checkpoint of it runs SAM's real code (and its
  encoder batches) at test speed. With a batching engine the gate is also
  waited for before each batch is encoded: the batch is claimed by then.

Run as ``python -m tests.support.probed_worker worker ...`` with the CLI's options.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt

from segq.contract import StoredResult
from segq.storage import ObjectStorage
from segq.worker import pipeline, runtime
from segq.worker.claims import Claim
from segq.worker.engines import EngineChoice, load_engine
from segq.worker.engines.base import (
    Candidate,
    Concept,
    ConceptSegmentationEngine,
    ImageBatchEngine,
    Prompt,
    SegmentationEngine,
)
from segq.worker.engines.embedding_cache import EmbeddingCache
from segq.worker.engines.encoder_options import EncoderOptions

if TYPE_CHECKING:
    # Only named: importing it would load torch into every probed worker.
    from segq.worker.engines.sam3 import Sam3Engine


class ProbedEngine:
    def __init__(self, inner: SegmentationEngine) -> None:
        self._inner = inner
        self.name = inner.name
        self._gate = os.environ.get("SEGQ_PROBE_GATE")
        self._invert = bool(os.environ.get("SEGQ_PROBE_INVERT"))

    def wait_for_gate(self) -> None:
        if self._gate:
            while not Path(self._gate).exists():
                time.sleep(0.05)

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        self.wait_for_gate()
        candidates = self._inner.segment(image, prompt, multimask)
        if self._invert:
            candidates = [Candidate(~c.mask, c.score) for c in candidates]
        return candidates


class ProbedBatchEngine(ProbedEngine):
    """A probed engine that encodes images in batches, as its inner one does."""

    def __init__(self, inner: ImageBatchEngine) -> None:
        super().__init__(inner)
        self._batching = inner

    @property
    def batch_size(self) -> int:
        return self._batching.batch_size

    def encode_images(self, images: Sequence[npt.NDArray[np.uint8]]) -> None:
        self.wait_for_gate()
        self._batching.encode_images(images)


class ProbedConceptEngine(ProbedBatchEngine):
    """A probed engine that also takes text prompts (SAM 3), and its
    prompts in batches, as its inner one does."""

    def __init__(self, inner: Sam3Engine) -> None:
        super().__init__(inner)
        self._sam3 = inner

    def segment_concepts(
        self, image: npt.NDArray[np.uint8], concepts: Sequence[Concept]
    ) -> list[list[Candidate]]:
        self.wait_for_gate()
        return self._sam3.segment_concepts(image, concepts)

    def segment_batch(
        self, image: npt.NDArray[np.uint8], prompts: Sequence[Prompt], multimask: bool
    ) -> list[list[Candidate]]:
        self.wait_for_gate()
        return self._sam3.segment_batch(image, prompts, multimask)


def probed(inner: SegmentationEngine) -> SegmentationEngine:
    if isinstance(inner, ConceptSegmentationEngine) and isinstance(inner, ImageBatchEngine):
        return ProbedConceptEngine(cast("Sam3Engine", inner))
    if isinstance(inner, ImageBatchEngine):
        return ProbedBatchEngine(inner)
    return ProbedEngine(inner)


def _record_runs(runs_file: str) -> None:
    """One line per item segmented, from the pipeline's segment_image, which
    knows the item (a batch segments many items in one task)."""
    segment_image = pipeline.segment_image

    def recorded(
        storage: ObjectStorage,
        engine: SegmentationEngine,
        claim: Claim,
        image: npt.NDArray[np.uint8],
    ) -> StoredResult:
        with open(runs_file, "a") as runs:  # one short append: whole lines
            runs.write(f"{claim.item_id} {os.getpid()}\n")
        return segment_image(storage, engine, claim, image)

    vars(pipeline)["segment_image"] = recorded


def engine_runs(path: Path) -> dict[int, int]:
    """How often the engine ran for each item, from a SEGQ_PROBE_RUNS file."""
    counts: dict[int, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            item_id = int(line.split()[0])
            counts[item_id] = counts.get(item_id, 0) + 1
    return counts


def _install() -> None:
    """Wrap the engine that worker.runtime loads (it imported load_engine
    by name, so the name is replaced in its namespace)."""

    def load_probed(
        choice: EngineChoice,
        device: str,
        embeddings: EmbeddingCache | None = None,
        encoder_options: EncoderOptions | None = None,
    ) -> SegmentationEngine:
        return probed(load_engine(choice, device, embeddings, encoder_options))

    vars(runtime)["load_engine"] = load_probed
    runs_file = os.environ.get("SEGQ_PROBE_RUNS")
    if runs_file:
        _record_runs(runs_file)
    if os.environ.get("SEGQ_PROBE_TINY_SAM"):
        from segq.worker.engines import sam
        from tests.support.tiny_sam import build_tiny_sam

        sam.SAM_ARCHITECTURES["vit_b"] = build_tiny_sam


if __name__ == "__main__":
    _install()
    from segq.cli.main import main

    main()
