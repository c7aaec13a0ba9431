"""What one item cost the engine, as the item's ``metrics`` report it.

The pipeline opens a recording around an item's engine call; an engine with
an embedding records where it came from and what getting it took. A context
variable carries the recording, so the engine interface (``segment``) stays
as it is and threads never see each other's items.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from segq.worker.engines.embedding_cache import EmbeddingSource

#: Costlier first: an item that needed several embeddings reports the worst.
_COST_ORDER = (EmbeddingSource.COMPUTED, EmbeddingSource.SHARED, EmbeddingSource.LOCAL)


@dataclass
class ItemMetrics:
    #: None for an engine without an embedding (GrabCut).
    embedding: EmbeddingSource | None = None
    encode_ms: float = 0.0
    engine_ms: float = 0.0

    def as_result(self) -> dict[str, Any]:
        """The item result's ``metrics``; decoding is the engine's time
        beyond getting the embedding."""
        return {
            "embedding": None if self.embedding is None else str(self.embedding),
            "encodeMs": round(self.encode_ms, 1),
            "decodeMs": round(max(self.engine_ms - self.encode_ms, 0.0), 1),
        }


_recording: ContextVar[ItemMetrics | None] = ContextVar("segq_item_metrics", default=None)


@contextmanager
def recording_item_metrics() -> Iterator[ItemMetrics]:
    """Record what the engine calls inside cost; ``engine_ms`` is their time."""
    metrics = ItemMetrics()
    token = _recording.set(metrics)
    started = time.perf_counter()
    try:
        yield metrics
    finally:
        metrics.engine_ms = (time.perf_counter() - started) * 1000
        _recording.reset(token)


def record_embedding(source: EmbeddingSource, encode_ms: float) -> None:
    """Called by an engine each time it makes sure it holds an embedding;
    nothing happens outside a recording."""
    metrics = _recording.get()
    if metrics is None:
        return
    metrics.encode_ms += encode_ms
    if metrics.embedding is None or _COST_ORDER.index(source) < _COST_ORDER.index(
        metrics.embedding
    ):
        metrics.embedding = source
