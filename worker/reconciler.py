"""Re-publishes what the broker lost. Postgres knows every unfinished item;
the broker only carries wake-up calls, and those can vanish (a Redis restart
without persistence, an API that died between commit and publish, a worker
killed holding a message). Each pass:

- items Running whose lease ran out (their worker died) go back to Queued,
  or fail once they have used up their attempts;
- items Queued whose last wake-up call is older than ``republish_after``
  get a new one;
- items never claimed whose wake-up call was sent more than a few seconds
  ago, while the queue holds no message at all, get a new one at once:
  their message is gone (an API that died between its commit and its
  publish, a broker that lost it). Behind a backlog they wait for it to
  drain, as their messages would have.

Extra wake-up calls are harmless: a claim skips what is not its to run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, or_, select, text
from sqlalchemy.orm import Session, sessionmaker

from segq.clock import now_ms
from segq.models import ItemStatus, Job, JobItem, JobStatus
from worker.claims import fail_abandoned_item

log = logging.getLogger(__name__)

#: Items handled per pass; a larger backlog is worked through pass by pass.
ITEMS_PER_PASS = 1000
#: Any constant: the key of the Postgres advisory lock one pass holds, so
#: that many workers running reconcilers make one pass at a time.
ADVISORY_LOCK_KEY = 0x5E6_0001
#: A worker claims an item within milliseconds of taking its message; an
#: item never claimed this long after its message was sent, while the queue
#: is empty, has lost it. (An item whose storage failed waits for a retry
#: message that its worker holds back, outside the queue; those have been
#: claimed, and are left to ``republish_after``.)
UNCLAIMED_GRACE_SECONDS = 5


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
    republish_after_seconds: int,
    max_attempts: int,
    unclaimed_grace_seconds: int = UNCLAIMED_GRACE_SECONDS,
) -> Pass:
    """One pass; ``messages_waiting`` counts the messages in the queue that
    no worker has taken yet."""
    # Counted before the items are read: every message sent before this
    # moment has been taken by a worker if the count is zero.
    queue_empty = messages_waiting() == 0
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
                item.published_time = None  # published below
                requeued += 1
        stale = now - republish_after_seconds * 1000
        message_lost = [JobItem.published_time.is_(None), JobItem.published_time < stale]
        if queue_empty:
            message_lost.append(
                and_(
                    JobItem.attempt == 0,
                    JobItem.published_time < now - unclaimed_grace_seconds * 1000,
                )
            )
        due = session.scalars(
            select(JobItem)
            .where(JobItem.status == ItemStatus.QUEUED, or_(*message_lost))
            .order_by(JobItem.id)
            .limit(ITEMS_PER_PASS)
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
