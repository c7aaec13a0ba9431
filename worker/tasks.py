"""Thin Celery tasks around the pipeline and webhook delivery. Shared tasks,
so whichever Celery app a process builds (the worker's, a test's) carries
them; each runs with the runtime attached to its app (``worker.runtime``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import shared_task
from sqlalchemy.exc import DBAPIError

from segq.clock import now_ms
from segq.db import database_unreachable
from segq.logs import log_context
from segq.queue import DELIVER_WEBHOOK_TASK, SEGMENT_ITEM_TASK
from segq.worker.claims import fail_waiting_item
from segq.worker.metrics import ITEMS, WEBHOOK_ATTEMPTS, observe_item
from segq.worker.pipeline import (
    ItemOutcome,
    ItemRun,
    StorageUnavailable,
    process_item,
    storage_retry_delay,
)
from segq.worker.runtime import SegmentRuntime, delivery_runtime_of, segment_runtime_of
from segq.worker.webhook_delivery import deliver

#: The longest a task holds its message while storage is down before it
#: sends the message again and takes the next one: well inside any item
#: time limit, and short enough that a warm shutdown of a paused worker
#: waits no longer than this for it.
PAUSE_SLICE_SECONDS = 5


@shared_task(name=SEGMENT_ITEM_TASK, bind=True, max_retries=None)
def segment_item(self: Any, item_id: int) -> str:
    current = segment_runtime_of(self.app)
    started = time.monotonic()

    def taken_along(run: ItemRun) -> None:
        claim, outcome = run.claim, run.outcome
        assert claim is not None  # an item taken along was claimed
        released = outcome == ItemOutcome.RELEASED
        shown = "storage_retry" if released else outcome.value
        observe_item(run, shown, time.monotonic() - started)
        if released:
            # Storage failed this item of the batch, and its own message may
            # be spent (another worker found it taken): send one for when its
            # retry is due. A second message for it skips (not due, or taken).
            segment_item.apply_async((claim.item_id,), countdown=storage_retry_delay(claim.attempt))
        elif outcome == ItemOutcome.PAUSED:
            # Storage is down: the item waits in the queue, its attempt given back.
            segment_item.apply_async((claim.item_id,))

    with log_context(item_id=item_id):
        try:
            return _segment_item(self, current, item_id, started, taken_along)
        except DBAPIError as exc:
            if not database_unreachable(exc):
                raise
            # The database is down: no row can change, so no attempt is
            # spent (one in flight keeps its lease, which runs out as a dead
            # worker's would). This process takes nothing until it answers,
            # and says so once, not with a traceback per message.
            current.database_breaker.trip(str(exc).splitlines()[0])
            segment_item.apply_async((item_id,))
            return ItemOutcome.PAUSED.value


def _segment_item(
    task: Any,
    current: SegmentRuntime,
    item_id: int,
    started: float,
    taken_along: Callable[[ItemRun], None],
) -> str:
    # The message wakes a worker; the item run is the one queued first.
    if not current.database_breaker.wait_until_closed(PAUSE_SLICE_SECONDS):
        segment_item.apply_async((item_id,))
        return ItemOutcome.PAUSED.value
    waited = _wait_for_storage(current, item_id)
    if waited is not None:
        if waited != ItemOutcome.PAUSED:
            ITEMS.labels(waited.value).inc()
        return waited.value
    try:
        run = process_item(
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
            breaker=current.storage_breaker,
        )
    except StorageUnavailable as exc:
        ITEMS.labels("storage_retry").inc()
        # The item is back in the queue; process_item counts the attempts and
        # fails the item once they run out, so this retry loop is bounded.
        raise task.retry(countdown=exc.retry_in_seconds, exc=exc) from exc
    current.database_breaker.confirm()  # its rows were written: the database works
    observe_item(run, run.outcome.value, time.monotonic() - started)
    if run.outcome == ItemOutcome.PAUSED:
        segment_item.apply_async((item_id,))
    return run.outcome.value


def _wait_for_storage(current: SegmentRuntime, item_id: int) -> ItemOutcome | None:
    """None once storage answers (or was never down). While it is down,
    this process takes no items: the task holds its message up to
    PAUSE_SLICE_SECONDS, then sends it again (PAUSED: the item keeps its
    place in Postgres and its attempts) or, once the outage has outlasted
    its bound for the item, fails the item (FAILED), naming storage and
    the time; SKIPPED when the item no longer waits."""
    breaker = current.storage_breaker
    pause = breaker.pause
    if pause is None:
        return None
    bound_ms = breaker.outage_seconds * 1000
    until_bound = (pause.since + bound_ms - now_ms()) / 1000
    if breaker.wait_until_closed(min(PAUSE_SLICE_SECONDS, max(until_bound, 0.0))):
        return None
    now = now_ms()
    if now - pause.since >= bound_ms:
        waited = fail_waiting_item(
            current.sessions, item_id, breaker.outage_message(now), created_by=now - bound_ms
        )
        if waited.failed_job_id is not None:
            current.job_changes.announce(waited.failed_job_id)
            return ItemOutcome.FAILED
        if not waited.still_waiting:
            return ItemOutcome.SKIPPED
    segment_item.apply_async((item_id,))
    return ItemOutcome.PAUSED


@shared_task(name=DELIVER_WEBHOOK_TASK, bind=True, ignore_result=True)
def deliver_webhook(self: Any, delivery_id: int) -> str:
    """One attempt; a failed one is retried by the dispatcher when the
    schedule says, not by Celery, so the schedule survives a lost message."""
    current = delivery_runtime_of(self.app)
    outcome = deliver(current.sessions, delivery_id, current.rules).value
    WEBHOOK_ATTEMPTS.labels(outcome).inc()
    return outcome
