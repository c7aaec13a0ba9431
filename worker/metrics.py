"""A worker's Prometheus metrics (prometheus-client), served by its main
process on ``SEGQ_METRICS_PORT``.

A prefork pool's processes each count in files of their own under
``PROMETHEUS_MULTIPROC_DIR`` (the library's multiprocess mode; ``segq
worker`` makes and empties that folder before any of them starts), and the
main process serves their sum. The folder must be set before this module is
first imported: the library picks where values live at import.

The API's ``/metrics`` says what Postgres knows (queues, ages, pending
webhooks); these say what workers did (outcomes, times, cache tiers, retries).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from segq.worker.pipeline import ItemRun

log = logging.getLogger(__name__)

#: Seconds: from a fast GPU item to a slow CPU one, and queue waits of hours.
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Seconds, for the stages of one item: from a fraction of a millisecond
#: (a Redis publish) to a slow engine.
_STAGE_SECONDS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60,
)  # fmt: skip
_WAIT_SECONDS = (0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)

ITEMS = Counter(
    "segq_worker_items",
    "Item attempts ended, by outcome: completed, failed, skipped (not this "
    "attempt's to run), lease_lost, storage_retry (storage failed; queued again).",
    ["outcome"],
)
QUEUE_WAIT = Histogram(
    "segq_worker_item_queue_wait_seconds",
    "From an item's wake-up call to the start of its first attempt.",
    buckets=_WAIT_SECONDS,
)
ENGINE_SECONDS = Histogram(
    "segq_worker_engine_seconds",
    "The engine's time per completed item: image embedding plus mask decoding.",
    ["engine"],
    buckets=_SECONDS,
)
ENCODE_STORE_SECONDS = Histogram(
    "segq_worker_encode_store_seconds",
    "Encoding an item's masks (PNG, polygons, RLE, logits) and writing them to storage.",
    buckets=_SECONDS,
)
ITEM_STAGE_SECONDS = Histogram(
    "segq_worker_item_stage_seconds",
    "Each stage of an item attempt that completed or failed (worker/item_stages.py): "
    "claim, image_read, engine, encode_<format>, storage_write, render, completion, notify, "
    "batch_company; they add up to segq_worker_item_seconds less untimed glue.",
    ["stage"],
    buckets=_STAGE_SECONDS,
)
ITEM_SECONDS = Histogram(
    "segq_worker_item_seconds",
    "An item attempt that completed or failed, from the start of its claim "
    "to the end of its notification.",
    buckets=_STAGE_SECONDS,
)
EMBEDDINGS = Counter(
    "segq_worker_embeddings",
    "Where completed SAM items' image embeddings came from: computed (a miss "
    "of both caches), local (this process's memory), shared (object storage).",
    ["source"],
)
STORAGE_ERRORS = Counter(
    "segq_worker_storage_errors",
    "Item attempts that storage failed (the item is queued again, or fails "
    "once its attempts run out).",
)
WEBHOOK_ATTEMPTS = Counter(
    "segq_worker_webhook_attempts",
    "Webhook delivery tasks, by outcome: delivered, retrying, given_up, "
    "skipped (not due, or already moved on).",
    ["outcome"],
)
RECONCILER_ACTIONS = Counter(
    "segq_worker_reconciler_actions",
    "What reconciler passes did: republished (a lost wake-up call sent "
    "again), requeued (a dead worker's item), failed (out of attempts).",
    ["action"],
)
RETENTION_DELETED = Counter(
    "segq_worker_retention_deleted",
    "What retention sweeps deleted: jobs, files, objects.",
    ["kind"],
)


def observe_item(run: ItemRun, outcome: str, seconds: float) -> None:
    """Count one attempt's end (``outcome``: its label) and log it with its
    job, attempt and duration, from what the pipeline answered (the item
    is not read again)."""
    ITEMS.labels(outcome).inc()
    claim = run.claim
    log.info(
        "item %s attempt %s: %s",
        run.item_id,
        None if claim is None else claim.attempt,
        outcome,
        # item_id too: an item taken along in a batch is logged inside the
        # log context of the item whose task ran the batch.
        extra={
            "item_id": run.item_id,
            "job_id": None if claim is None else claim.job_id,
            "attempt": None if claim is None else claim.attempt,
            "duration_ms": round(seconds * 1000, 1),
        },
    )
    if outcome != "completed":
        return
    if claim is not None and claim.queue_wait_ms is not None:
        QUEUE_WAIT.observe(claim.queue_wait_ms / 1000)
    metrics = run.metrics
    if metrics is None:
        return
    ENGINE_SECONDS.labels(run.engine).observe((metrics["encodeMs"] + metrics["decodeMs"]) / 1000)
    if metrics["embedding"] is not None:
        EMBEDDINGS.labels(metrics["embedding"]).inc()


def serve_metrics(port: int) -> None:
    """Serve the metrics of this process and, in multiprocess mode, of every
    process of its pool, on ``port`` of every interface (a Prometheus
    scraper reaches a pod by its address), from a thread of this process."""
    registry: CollectorRegistry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr="0.0.0.0", registry=registry)  # noqa: S104
    log.info("worker metrics on port %d", port)
