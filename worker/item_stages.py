"""Where one attempt at an item spends its time, stage by stage.

The pipeline opens an ``ItemStages`` when it starts to claim an item and
times each stage it runs for it; code deeper down (mask encoding, storage
writes) times its part with ``timed_stage``, which finds the attempt's
recording in a context variable, as the engine's metrics do
(``engines.item_metrics``), so no signature between them changes.

What is known before the completion is stored with the item, in its
result's ``metrics`` (``stagesMs``, and ``workerMs``: the attempt's time from
the start of its claim to then); the result's rendering, the commit and the
notification that follows cannot be in the row they write without a second
write, so they, with every other stage and the attempt's whole time, go to
the worker's ``/metrics`` histograms and the item's log line.
Stages are disjoint intervals of the attempt: their sum is its total less
the untimed glue between them (well under a millisecond for a lone item:
tests/worker/test_item_stages.py holds it to that).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum

from segq.contract import StoredMetrics
from segq.worker.metrics import ITEM_SECONDS, ITEM_STAGE_SECONDS


class Stage(StrEnum):
    """An attempt's stages, in the order they run; the value is the
    ``stage`` label of ``segq_worker_item_stage_seconds`` and the key in
    the stored ``stagesMs``."""

    #: Reading the queue and taking the item (its transactions).
    CLAIM = "claim"
    #: Reading the image (storage or URL) and decoding it.
    IMAGE_READ = "image_read"
    #: The engine's call: embedding (or its cache) and mask decoding.
    ENGINE = "engine"
    #: Mask encodings: the area and bounding box every segment carries,
    #: then one stage per output format asked for.
    ENCODE_SUMMARY = "encode_summary"
    ENCODE_POLYGONS = "encode_polygons"
    ENCODE_SVG_PATH = "encode_svg_path"
    ENCODE_RLE = "encode_rle"
    ENCODE_PNG = "encode_png"
    ENCODE_LOGITS = "encode_logits"
    #: Writing masks and logits to storage.
    STORAGE_WRITE = "storage_write"
    #: The result rendered once as the JSON text every GET splices.
    RENDER = "render"
    #: The transaction that completes (or fails) the item and rolls up its job.
    COMPLETION = "completion"
    #: Telling the API's waiting requests that the job changed.
    NOTIFY = "notify"
    #: An item run in a batch: the time it spent on its companions' stages.
    BATCH_COMPANY = "batch_company"


@dataclass
class ItemStages:
    """The stage times of one attempt, from ``started`` (perf_counter)."""

    started: float = field(default_factory=time.perf_counter)
    seconds: dict[Stage, float] = field(default_factory=dict)

    def add(self, stage: Stage, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Make this the attempt ``timed_stage`` records in, for the body."""
        token = _recording.set(self)
        try:
            yield
        finally:
            _recording.reset(token)

    @contextmanager
    def timing(self, stage: Stage) -> Iterator[None]:
        """Time the body as ``stage`` of this attempt, less the stages
        ``timed_stage`` records inside it (each counted once, as itself)."""
        token = _recording.set(self)
        inside = sum(self.seconds.values())
        begun = time.perf_counter()
        try:
            yield
        finally:
            nested = sum(self.seconds.values()) - inside
            self.add(stage, time.perf_counter() - begun - nested)
            _recording.reset(token)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def stored_in(self, metrics: StoredMetrics) -> StoredMetrics:
        """The item result's ``metrics`` with these stages (as they stand
        before the completion's commit) added."""
        return {
            **metrics,
            "stagesMs": {str(stage): round(s * 1000, 3) for stage, s in self.seconds.items()},
            "workerMs": round(self.elapsed() * 1000, 3),
        }

    def observe(self, *, in_batch: bool) -> dict[str, float]:
        """Record the finished attempt's stages and total in the histograms;
        the stage times in ms, for its log line. ``in_batch``: what its own
        stages leave of its time went to its companions (BATCH_COMPANY)."""
        total = self.elapsed()
        if in_batch:
            self.add(Stage.BATCH_COMPANY, max(total - sum(self.seconds.values()), 0.0))
        for stage, seconds in self.seconds.items():
            ITEM_STAGE_SECONDS.labels(str(stage)).observe(seconds)
        ITEM_SECONDS.observe(total)
        return {
            **{f"{stage}_ms": round(s * 1000, 2) for stage, s in self.seconds.items()},
            "total_ms": round(total * 1000, 2),
        }


_recording: ContextVar[ItemStages | None] = ContextVar("segq_item_stages", default=None)


@contextmanager
def timed_stage(stage: Stage) -> Iterator[None]:
    """Time the body as ``stage`` of the attempt being recorded, if any
    (nothing is recorded outside a pipeline's stage)."""
    stages = _recording.get()
    if stages is None:
        yield
        return
    begun = time.perf_counter()
    try:
        yield
    finally:
        stages.add(stage, time.perf_counter() - begun)
