"""``segq worker`` as it ships, with its engine wrapped so that fault tests
can see and steer each run from outside the process:

- ``SEGQ_PROBE_RUNS``: a file that gets one line per engine run, the item's
  id and this process's id: an item run twice shows as two lines, whatever
  its stored objects say;
- ``SEGQ_PROBE_GATE``: a file whose appearance the engine waits for before
  it segments, so a test decides when a run ends;
- ``SEGQ_PROBE_INVERT``: when set, masks come out inverted, so the objects
  this worker writes differ from another worker's for the same item.

Run as ``python -m tests.probed_worker worker ...`` with the CLI's options.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from celery import current_task

from worker import runtime
from worker.engines import EngineChoice, load_engine
from worker.engines.base import Candidate, Prompt, SegmentationEngine
from worker.engines.embedding_cache import EmbeddingCache


class ProbedEngine:
    def __init__(self, inner: SegmentationEngine) -> None:
        self._inner = inner
        self.name = inner.name
        self._runs = os.environ.get("SEGQ_PROBE_RUNS")
        self._gate = os.environ.get("SEGQ_PROBE_GATE")
        self._invert = bool(os.environ.get("SEGQ_PROBE_INVERT"))

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        if self._runs:
            item_id = current_task.request.args[0]
            with open(self._runs, "a") as runs:  # one short append: whole lines
                runs.write(f"{item_id} {os.getpid()}\n")
        if self._gate:
            while not Path(self._gate).exists():
                time.sleep(0.05)
        candidates = self._inner.segment(image, prompt, multimask)
        if self._invert:
            candidates = [Candidate(~c.mask, c.score) for c in candidates]
        return candidates


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
        choice: EngineChoice, device: str, embeddings: EmbeddingCache | None = None
    ) -> SegmentationEngine:
        return ProbedEngine(load_engine(choice, device, embeddings))

    vars(runtime)["load_engine"] = load_probed


if __name__ == "__main__":
    _install()
    from segq.cli.main import main

    main()
