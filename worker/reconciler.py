"""Re-publishes what the broker lost. Postgres knows every unfinished item;
the broker only carries wake-up calls, and those can vanish (a Redis restart
without persistence, an API that died between commit and publish, a worker
killed holding a message). Each pass:

- items Running whose lease ran out (their worker died) go back to Queued,
  or fail once they have used up their attempts;
- as many wake-up calls are sent as the queue lacks: any message wakes a
  worker for the item queued first (worker/claims.py, claim_next_item), so
  what must hold is one message in the queue per queued item, not one per
  item by name. Items queued again, or sent too recently to be sure their
  message has arrived, are what is counted against the queue's length.

A long backlog therefore costs no message beyond one per item, however long
it waits; extra wake-up calls (a worker's held message coming back, a
publish racing the count) are harmless: a message that finds nothing to
run is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session, sessionmaker

from segq.clock import now_ms
from segq.models import ItemStatus, Job, JobItem, JobStatus
from segq.worker.claims import fail_abandoned_item

log = logging.getLogger(__name__)

#: Items handled per pass; a larger backlog is worked through pass by pass.
ITEMS_PER_PASS = 1000
#: Any constant: the key of the Postgres advisory lock one pass holds, so
#: that many workers running reconcilers make one pass at a time.
ADVISORY_LOCK_KEY = 0x5E6_0001
#: How long after an item's message was sent it is counted against the
#: queue: until then its message may still be on its way (an API
#: publishing a large job) and is not taken for lost. (An item whose
#: storage failed waits for a retry message that its worker holds back,
#: outside the queue, until the retry is due: it is counted from then.)
MESSAGE_GRACE_SECONDS = 5


@dataclass(frozen=True)
class Pass:
    republished: int
    requeued: int
    failed: int


def reconcile(
    sessions: sessionmaker[Session],
    publish: Callable[[Sequence[int]], None],
    messages_waiting: Callable[[], int],
    *,
    max_attempts: int,
    grace_seconds: int = MESSAGE_GRACE_SECONDS,
) -> Pass:
    """One pass; ``messages_waiting`` counts the messages in the queue that
    no worker has taken yet."""
    # Counted before the items are read: a message taken meanwhile claims an
    # item, so the items read can only be fewer, never more, than counted.
    waiting = messages_waiting()
    now = now_ms()
    requeued = failed = 0
    with sessions.begin() as session:
        if not _take_pass_lock(session):
            return Pass(0, 0, 0)
        expired = session.execute(
            select(JobItem.id, JobItem.job_id)
            .where(JobItem.status == ItemStatus.RUNNING, JobItem.lease_expires_time < now)
            .order_by(JobItem.id)
            .limit(ITEMS_PER_PASS)
        ).all()
        for item_id, job_id in expired:
            # The job's row, then the item's: the order every writer uses.
            job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
            item = session.scalar(select(JobItem).where(JobItem.id == item_id).with_for_update())
            assert job is not None
            assert item is not None
            if item.status != ItemStatus.RUNNING or (item.lease_expires_time or 0) >= now:
                continue  # renewed or finished meanwhile
            if job.status == JobStatus.CANCELED:
                item.status = ItemStatus.CANCELED
                item.finished_time = now
            elif item.attempt >= max_attempts:
                fail_abandoned_item(session, item, now)
                failed += 1
            else:
                item.status = ItemStatus.QUEUED
                item.lease_expires_time = None
                item.published_time = None  # counted at once, below
                requeued += 1
        session.flush()
        # Items that should each have a message in the queue by now.
        settled = or_(
            JobItem.published_time.is_(None),
            JobItem.published_time <= now - grace_seconds * 1000,
        )
        expected = session.scalar(
            select(func.count())
            .select_from(JobItem)
            .where(JobItem.status == ItemStatus.QUEUED, settled)
        )
        missing = min((expected or 0) - waiting, ITEMS_PER_PASS)
        item_ids: list[int] = []
        if missing > 0:
            # Named by the items that waited longest (never sent first); a
            # message wakes a worker for whichever is first in the queue.
            due = session.scalars(
                select(JobItem)
                .where(JobItem.status == ItemStatus.QUEUED, settled)
                .order_by(JobItem.published_time.asc().nulls_first(), JobItem.id)
                .limit(missing)
                .with_for_update(skip_locked=True)
            ).all()
            for item in due:
                item.published_time = now
            item_ids = [item.id for item in due]
    # After the commit, like the API: a worker may run before this returns.
    if item_ids:
        publish(item_ids)
    if item_ids or failed:
        log.info(
            "reconciler: republished %d, requeued %d, failed %d", len(item_ids), requeued, failed
        )
    return Pass(len(item_ids), requeued, failed)


def _take_pass_lock(session: Session) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return True  # SQLite serializes writers anyway
    # Transaction-scoped: released at commit.
    locked = session.scalar(
        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY}
    )
    return bool(locked)
