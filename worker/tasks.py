"""Thin Celery tasks around the pipeline and webhook delivery. Shared tasks,
so whichever Celery app a process builds (the worker's, a test's) carries
them; each runs with the runtime attached to its app (``worker.runtime``)."""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from segq.logs import log_context
from segq.queue import DELIVER_WEBHOOK_TASK, SEGMENT_ITEM_TASK
from worker.claims import Claim
from worker.metrics import ITEMS, WEBHOOK_ATTEMPTS, observe_item
from worker.pipeline import ItemOutcome, StorageUnavailable, process_item, storage_retry_delay
from worker.runtime import delivery_runtime_of, segment_runtime_of
from worker.webhook_delivery import deliver


@shared_task(name=SEGMENT_ITEM_TASK, bind=True, max_retries=None)
def segment_item(self: Any, item_id: int) -> str:
    current = segment_runtime_of(self.app)
    started = time.monotonic()
    # The message wakes a worker; the item run is the one queued first.
    ran: list[int] = []

    def taken_along(claim: Claim, outcome: ItemOutcome) -> None:
        released = outcome == ItemOutcome.RELEASED
        shown = "storage_retry" if released else outcome.value
        observe_item(current.sessions, claim.item_id, shown, time.monotonic() - started)
        if released:
            # Storage failed this item of the batch, and its own message may
            # be spent (another worker found it taken): send one for when its
            # retry is due. A second message for it skips (not due, or taken).
            segment_item.apply_async((claim.item_id,), countdown=storage_retry_delay(claim.attempt))

    with log_context(item_id=item_id):
        try:
            outcome = process_item(
                current.sessions,
                current.storage,
                current.engine,
                item_id,
                lease_seconds=current.lease_seconds,
                max_attempts=current.max_attempts,
                limits=current.limits,
                batch_wait_ms=current.batch_wait_ms,
                taken_along=taken_along,
                announce_job_change=current.job_changes.announce,
                claimed=lambda claim: ran.append(claim.item_id),
            )
        except StorageUnavailable as exc:
            ITEMS.labels("storage_retry").inc()
            # The item is back in the queue; process_item counts the attempts and
            # fails the item once they run out, so this retry loop is bounded.
            raise self.retry(countdown=exc.retry_in_seconds, exc=exc) from exc
        observe_item(
            current.sessions, ran[0] if ran else item_id, outcome.value, time.monotonic() - started
        )
    return outcome.value


@shared_task(name=DELIVER_WEBHOOK_TASK, bind=True, ignore_result=True)
def deliver_webhook(self: Any, delivery_id: int) -> str:
    """One attempt; a failed one is retried by the dispatcher when the
    schedule says, not by Celery, so the schedule survives a lost message."""
    current = delivery_runtime_of(self.app)
    outcome = deliver(current.sessions, delivery_id, current.rules).value
    WEBHOOK_ATTEMPTS.labels(outcome).inc()
    return outcome
