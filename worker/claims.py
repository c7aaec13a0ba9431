"""An item's row through one attempt, in SQL: the claim that starts the
attempt and takes its lease, the renewal and release of that lease, the
completion or failure that lands only while the attempt holds it, and the
roll-up of the item's job once none of its items is left to run.

Every write of an attempt names the attempt, so a repeated message, a
repeated transaction or an attempt that lost its lease changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    Connection,
    CursorResult,
    Exists,
    and_,
    bindparam,
    case,
    func,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from segq.clock import now_ms
from segq.contract import StoredResult
from segq.job_document import render_item_event
from segq.job_text import render_result_text
from segq.models import ItemStatus, Job, JobItem, JobStatus, StoredFile
from segq.webhook_events import (
    ITEM_COMPLETED,
    ITEM_FAILED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_STARTED,
    record_event,
    wants,
    whole_job_data,
)
from segq.worker.item_stages import Stage, timed_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    item_id: int
    attempt: int
    job_id: int
    project_id: int
    file_key: str | None
    #: Set for items given as a URL: the worker fetches the image itself.
    source_url: str | None
    prompt: dict[str, Any]
    options: dict[str, Any]
    #: How long a first attempt waited in the queue (published to started);
    #: None for a later attempt.
    queue_wait_ms: int | None = None


def _queue_wait_ms(
    attempt: int, published_time: int | None, started_time: int | None
) -> int | None:
    if attempt != 1 or published_time is None or started_time is None:
        return None
    return max(0, started_time - published_time)


#: How early a message sent with a retry's countdown may claim its item.
RETRY_LEEWAY_MS = 1000
#: How many of the first-queued items a wake-up message reads at a time,
#: and tries in order: workers woken at once each end up with the next one.
CLAIM_CANDIDATES = 8
#: How many times it reads them again when other claims took all it read.
CLAIM_ROUNDS = 4


def claim_next_item(
    sessions: sessionmaker[Session],
    woken_for: int,
    *,
    lease_seconds: int,
    engine_name: str,
    max_attempts: int,
) -> Claim | None:
    """Take the item a wake-up message should run: the runnable queued item
    queued first, whichever item the message names, else that item.

    Messages are wake-up calls, one per queued item, and any one serves any
    item: the queue's order is Postgres's, not the broker's. Ids are handed
    out as items are queued and an item keeps its id when it is queued
    again (its worker died, storage failed), so it keeps its place instead
    of going behind the backlog with its new message. The message's own
    item is the fallback: one Running whose lease ran out, say."""
    for _ in range(CLAIM_ROUNDS):
        with _reading(sessions) as connection:
            first_queued = list(
                connection.scalars(
                    _FIRST_QUEUED,
                    {"max_attempts": max_attempts, "due_by": now_ms(), "count": CLAIM_CANDIDATES},
                )
            )
        for item_id in first_queued:
            # Queued when read: if not ours now, another claim took it.
            claim = claim_item(
                sessions,
                item_id,
                lease_seconds=lease_seconds,
                engine_name=engine_name,
                max_attempts=max_attempts,
                settle=False,
            )
            if claim is not None:
                return claim
        if len(first_queued) < CLAIM_CANDIDATES:
            break
    return claim_item(
        sessions,
        woken_for,
        lease_seconds=lease_seconds,
        engine_name=engine_name,
        max_attempts=max_attempts,
    )


def _reading(sessions: sessionmaker[Session]) -> Connection:
    """A connection of ``sessions``' pool for reads outside a transaction:
    a candidate list needs no snapshot (each candidate is then claimed in a
    transaction of its own), and without one it costs its statement's round
    trip alone, not a BEGIN and a ROLLBACK around it."""
    bind = sessions.kw["bind"]
    return cast(Connection, bind.connect().execution_options(isolation_level="AUTOCOMMIT"))


def claim_item(
    sessions: sessionmaker[Session],
    item_id: int,
    *,
    lease_seconds: int,
    engine_name: str,
    max_attempts: int,
    settle: bool = True,
) -> Claim | None:
    """Take the item for one attempt, or None if it is not ours to run.

    An item found Running with its lease run out was abandoned by a worker
    that died; after ``max_attempts`` such attempts it is failed rather than
    tried again (an image that kills its worker must not kill them all).
    ``settle``: find out why an item is not runnable (canceled, out of
    attempts); needless for one seen queued that another claim took first."""
    with sessions.begin() as session:
        now = now_ms()
        # The job's row before the item's, as every writer takes them (see
        # cancel), so they cannot deadlock: the first claim of a job takes
        # it to start the job; every claim holds it in share mode while it
        # takes the item, so a cancel either comes before or waits.
        started = session.execute(
            _START_JOB_OF_ITEM, {"item_id": item_id, "engine": engine_name, "now": now}
        ).one_or_none()
        # Read again: that statement may have waited for the job's row (a
        # cancel, a roll-up), and the lease is counted from now.
        now = now_ms()
        taken = session.execute(
            _TAKE_RUNNABLE_ITEM,
            {
                "item_id": item_id,
                "now": now,
                "due_by": now + RETRY_LEEWAY_MS,
                "max_attempts": max_attempts,
                "lease_expires_time": now + lease_seconds * 1000,
                "engine": engine_name,
            },
        ).one_or_none()
        if taken is not None:
            # Loaded only to render the event, if its webhook wants it.
            if started is not None and wants(started.webhook, JOB_STARTED):
                job = session.get_one(Job, taken.job_id)
                record_event(session, job, JOB_STARTED, now, lambda: whole_job_data(session, job))
            return Claim(
                item_id=item_id,
                attempt=taken.attempt,
                job_id=taken.job_id,
                project_id=taken.project_id,
                file_key=taken.storage_key,
                source_url=taken.file_ref.get("fileUrl"),
                prompt=dict(taken.prompt),
                options=dict(taken.options),
                queue_wait_ms=_queue_wait_ms(
                    taken.attempt, taken.published_time, taken.started_time
                ),
            )
        if started is not None:
            # Every item of a Queued job is Queued at attempt 0: runnable.
            raise RuntimeError(f"item {item_id} of queued job {started.id} was not runnable")
    # Not runnable as it stands. Find out why in a transaction of its own,
    # which takes the rows for update (the one above held the job's only
    # in share mode, and a lock is not upgraded: two such would deadlock).
    if settle:
        _settle_unrunnable_item(sessions, item_id, max_attempts)
    return None


def _settle_unrunnable_item(
    sessions: sessionmaker[Session], item_id: int, max_attempts: int
) -> None:
    """Cancel the item of a canceled job, fail one that workers kept dying
    on; leave alone one that is finished or held by a live attempt."""
    with sessions.begin() as session:
        job = session.scalar(_LOCK_JOB_OF_ITEM, {"item_id": item_id})
        if job is None:
            log.warning("item %s does not exist", item_id)
            return
        item = session.scalar(select(JobItem).where(JobItem.id == item_id).with_for_update())
        assert item is not None
        now = now_ms()
        if ItemStatus(item.status).finished:
            return
        if job.status == JobStatus.CANCELED:
            item.status = ItemStatus.CANCELED
            item.finished_time = now
            return
        if item.status == ItemStatus.RUNNING and (item.lease_expires_time or 0) > now:
            return
        if item.attempt >= max_attempts:
            fail_abandoned_item(session, item, now)
        # Otherwise it became runnable only after the claim looked: the
        # attempt that held it released it (which takes no job lock) and
        # sends it again.


# The statements every item runs, built once: SQLAlchemy then reuses their
# compiled SQL without rebuilding and re-hashing them per item, which on a
# busy worker costs more than the round trips. Values come as parameters.

_LOCK_JOB_OF_ITEM = (
    select(Job)
    .where(
        Job.id == select(JobItem.job_id).where(JobItem.id == bindparam("item_id")).scalar_subquery()
    )
    .with_for_update()
)

_LOCK_JOB = select(Job).where(Job.id == bindparam("job_id")).with_for_update()

#: Queued -> Running at a job's first claim; no row once the job has started.
_START_JOB_OF_ITEM = (
    update(Job)
    .where(
        Job.id
        == select(JobItem.job_id).where(JobItem.id == bindparam("item_id")).scalar_subquery(),
        Job.status == JobStatus.QUEUED,
    )
    .values(
        status=JobStatus.RUNNING,
        engine=bindparam("engine"),
        start_time=bindparam("now"),
        status_time=bindparam("now"),
    )
    .returning(Job.id, Job.webhook)
    .execution_options(synchronize_session=False)
)


def _of_items_job(column: Any) -> Any:
    """A column of the item's job, for RETURNING (SQLite returns only the
    updated table's columns, or subqueries)."""
    return select(column).where(Job.id == JobItem.job_id).scalar_subquery().label(column.key)


#: Start an attempt at the item if it is runnable as it stands (Queued, or
#: Running with its lease run out, and attempts left) and its job is not
#: canceled; no row otherwise, with nothing changed. The job's row is held
#: in share mode (FOR SHARE) while the item's is taken: claims of one job do
#: not wait for each other, and a cancel (FOR UPDATE) waits for them or
#: they for it. What the attempt needs of the item and the job comes back.
#: A queued item that was tried before is runnable once its retry is due
#: (release_item), less the leeway a message sent with that countdown may
#: arrive early by. Only retries: an item never tried carries the API's
#: clock, which may differ from this worker's.
_RETRY_IS_DUE = or_(
    JobItem.attempt == 0,
    func.coalesce(JobItem.published_time, 0) <= bindparam("due_by"),
)

_TAKE_RUNNABLE_ITEM = (
    update(JobItem)
    .where(
        JobItem.id == bindparam("item_id"),
        or_(
            and_(JobItem.status == ItemStatus.QUEUED, _RETRY_IS_DUE),
            and_(
                JobItem.status == ItemStatus.RUNNING,
                func.coalesce(JobItem.lease_expires_time, 0) <= bindparam("now"),
            ),
        ),
        JobItem.attempt < bindparam("max_attempts"),
        select(Job.id)
        .where(Job.id == JobItem.job_id, Job.status != JobStatus.CANCELED)
        .with_for_update(read=True)
        .exists(),
    )
    .values(
        status=ItemStatus.RUNNING,
        attempt=JobItem.attempt + 1,
        lease_expires_time=bindparam("lease_expires_time"),
        started_time=func.coalesce(JobItem.started_time, bindparam("now")),
        engine=bindparam("engine"),
    )
    .returning(
        JobItem.attempt,
        JobItem.published_time,
        JobItem.started_time,
        JobItem.file_ref,
        # The version the item was created on, while its file exists (items
        # from before versions were pinned: the file's content now).
        case(
            (JobItem.file_id.is_(None), null()),
            else_=func.coalesce(
                JobItem.file_storage_key,
                select(StoredFile.storage_key)
                .where(StoredFile.id == JobItem.file_id)
                .scalar_subquery(),
            ),
        ).label("storage_key"),
        JobItem.job_id,
        _of_items_job(Job.project_id),
        _of_items_job(Job.prompt),
        _of_items_job(Job.options),
    )
    .execution_options(synchronize_session=False)
)


def _has_item_in(*statuses: ItemStatus) -> Exists:
    found = select(JobItem.id).where(
        JobItem.job_id == bindparam("job_id"), JobItem.status.in_(statuses)
    )
    return found.exists()


#: None while an item of the job is left to run; then Completed if any item
#: succeeded, Failed if none did. At most two index probes, not a count of
#: every item: this runs at every item's completion, and a job may have a
#: thousand items.
_JOB_OUTCOME = select(
    case(
        (_has_item_in(ItemStatus.QUEUED, ItemStatus.RUNNING), null()),
        (_has_item_in(ItemStatus.COMPLETED), literal(JobStatus.COMPLETED.value)),
        else_=literal(JobStatus.FAILED.value),
    )
)


def abandoned_message(attempts: int) -> str:
    return f"the worker died on each of {attempts} attempts to segment this image"


def fail_abandoned_item(session: Session, item: JobItem, now: int) -> None:
    """Fail an item that workers gave up on; the caller holds its row and its job's."""
    item.status = ItemStatus.FAILED
    item.error_message = abandoned_message(item.attempt)
    item.finished_time = now
    item.lease_expires_time = None
    _record_item_event(session, item.job_id, item.id, ItemStatus.FAILED, now)
    roll_up_job(session, item.job_id)


def _update_held_item(session: Session, claim: Claim, **values: Any) -> bool:
    """Update the item only while ``claim``'s attempt still holds it (Running,
    same attempt): the one guard every write of an attempt goes through."""
    result = cast(
        CursorResult[Any],
        session.execute(
            update(JobItem)
            .where(
                JobItem.id == claim.item_id,
                JobItem.attempt == claim.attempt,
                JobItem.status == ItemStatus.RUNNING,
            )
            .values(**values)
            # No session that calls this holds the item as an object, so
            # there is nothing to bring up to date (and that costs).
            .execution_options(synchronize_session=False)
        ),
    )
    return bool(result.rowcount)


def finish_item(
    sessions: sessionmaker[Session],
    claim: Claim,
    *,
    result: StoredResult | None,
    error_message: str | None = None,
) -> bool:
    """Complete (with ``result``) or fail (with ``error_message``) the item,
    only if ``claim`` still holds it; then roll the job up. False when the
    lease was lost to another attempt."""
    status = ItemStatus.COMPLETED if result is not None else ItemStatus.FAILED
    # Rendered here, once, so that no GET of the job pays for it; before the
    # transaction, so that a noisy mask's 10^4 vertices are not written out
    # while the job's row is locked (every item of the job waits on it).
    with timed_stage(Stage.RENDER):
        rendered_result = None if result is None else render_result_text(result)
    with sessions.begin() as session:
        # Lock the job first: finishing items of one job take turns, so the
        # last one to finish sees every other item's final state. Loaded
        # whole and held in a variable (the session keeps unchanged objects
        # only weakly), so the roll-up finds it in the session, not by a query.
        job = session.scalar(_LOCK_JOB, {"job_id": claim.job_id})
        assert job is not None
        now = now_ms()
        changed = _update_held_item(
            session,
            claim,
            status=status,
            result=result,
            rendered_result=rendered_result,
            error_message=error_message,
            finished_time=now,
            lease_expires_time=None,
        )
        if not changed:
            return False
        _record_item_event(session, claim.job_id, claim.item_id, status, now)
        roll_up_job(session, claim.job_id)
    return True


def roll_up_job(session: Session, job_id: int) -> None:
    """Finish the job once no item is left to run: Completed if any item
    succeeded, Failed if none did. The caller holds the job's row lock."""
    job = session.get(Job, job_id)
    assert job is not None
    if JobStatus(job.status).finished:
        return
    outcome = _job_outcome(session, job_id)
    if outcome is None:
        return
    if outcome == JobStatus.FAILED:
        job.error_message = (
            session.scalar(
                select(JobItem.error_message)
                .where(JobItem.job_id == job_id, JobItem.error_message.is_not(None))
                .order_by(JobItem.position)
                .limit(1)
            )
            or "every item failed"
        )
    # Set after the reads above, so they do not flush it on their own.
    now = now_ms()
    job.status = outcome
    job.status_time = now
    event = JOB_COMPLETED if outcome == JobStatus.COMPLETED else JOB_FAILED
    record_event(session, job, event, now, lambda: whole_job_data(session, job))


def _record_item_event(
    session: Session, job_id: int, item_id: int, status: ItemStatus, now: int
) -> None:
    """item.completed or item.failed, for a job whose webhook asks for it.
    The caller holds the job's row, so the progress counted is this moment's."""
    job = session.get(Job, job_id)
    assert job is not None
    event = ITEM_COMPLETED if status == ItemStatus.COMPLETED else ITEM_FAILED

    def render() -> dict[str, Any]:
        item = session.get(JobItem, item_id)
        assert item is not None
        counts = session.execute(
            select(JobItem.status, func.count())
            .where(JobItem.job_id == job_id)
            .group_by(JobItem.status)
        )
        return render_item_event(job, item, {item_status: n for item_status, n in counts})

    record_event(session, job, event, now, render)


def _job_outcome(session: Session, job_id: int) -> JobStatus | None:
    outcome = session.scalar(_JOB_OUTCOME, {"job_id": job_id})
    return None if outcome is None else JobStatus(outcome)


def renew_lease(sessions: sessionmaker[Session], claim: Claim, lease_seconds: int) -> bool:
    """Push the lease out again; False once the attempt no longer holds it."""
    with sessions.begin() as session:
        return _update_held_item(session, claim, lease_expires_time=now_ms() + lease_seconds * 1000)


def release_item(
    sessions: sessionmaker[Session],
    claim: Claim,
    retry_in_seconds: int = 0,
    *,
    give_back_attempt: bool = False,
) -> bool:
    """Give the item back to the queue, if ``claim`` still holds it, to be
    run again no sooner than ``retry_in_seconds`` from now: its
    published_time is when its retry message is due, and until then
    neither a claim nor a batch takes it (a storage outage must cost an
    item one attempt per backoff, whoever holds a message for it).

    ``give_back_attempt``: the attempt did not count against the item (a
    dependency was down, not the item at fault); the next one takes its
    number again, and its keys, which nothing refers to yet."""
    extra = {"attempt": claim.attempt - 1} if give_back_attempt else {}
    with sessions.begin() as session:
        return _update_held_item(
            session,
            claim,
            status=ItemStatus.QUEUED,
            lease_expires_time=None,
            published_time=now_ms() + retry_in_seconds * 1000,
            **extra,
        )


#: Runnable queued items in the order they were queued (the (status, id)
#: index walks them in that order).
_FIRST_QUEUED = (
    select(JobItem.id)
    .where(
        JobItem.status == ItemStatus.QUEUED,
        JobItem.attempt < bindparam("max_attempts"),
        _RETRY_IS_DUE,
    )
    .order_by(JobItem.id)
    .limit(bindparam("count"))
)

#: Queued items of one job that a batch may take along, by position (the
#: (job_id, status) index finds them).
_QUEUED_OF_JOB = (
    select(JobItem.id)
    .where(
        JobItem.job_id == bindparam("job_id"),
        JobItem.status == ItemStatus.QUEUED,
        JobItem.id != bindparam("item_id"),
        JobItem.attempt < bindparam("max_attempts"),
        _RETRY_IS_DUE,
    )
    .order_by(JobItem.position)
    .limit(bindparam("count"))
)

#: Queued items of other jobs that this engine may run (jobs not started,
#: or started by this engine), first queued first, as claim_next_item
#: takes them (the (status, id) index finds them).
_QUEUED_ELSEWHERE = (
    select(JobItem.id)
    .join(Job, Job.id == JobItem.job_id)
    .where(
        JobItem.status == ItemStatus.QUEUED,
        JobItem.job_id != bindparam("job_id"),
        JobItem.attempt < bindparam("max_attempts"),
        _RETRY_IS_DUE,
        Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
        or_(Job.engine.is_(None), Job.engine == bindparam("engine")),
    )
    .order_by(JobItem.id)
    .limit(bindparam("count"))
)


def queued_company(
    sessions: sessionmaker[Session],
    claim: Claim,
    count: int,
    *,
    engine_name: str,
    max_attempts: int,
) -> list[int]:
    """Up to ``count`` queued items to run in one batch with ``claim``'s:
    its own job's first, then other jobs' that wait longest. Only
    candidates: each is then claimed as any item is, and one another
    worker took first is simply not ours. Items waiting out a retry's
    backoff are not candidates (release_item)."""
    with _reading(sessions) as connection:
        values = {
            "job_id": claim.job_id,
            "item_id": claim.item_id,
            "max_attempts": max_attempts,
            "count": count,
            "due_by": now_ms(),
        }
        found = list(connection.scalars(_QUEUED_OF_JOB, values))
        if len(found) < count:
            values["count"] = count - len(found)
            found += connection.scalars(_QUEUED_ELSEWHERE, {**values, "engine": engine_name})
        return found


@dataclass(frozen=True)
class WaitedOut:
    """What ``fail_waiting_item`` found."""

    #: The failed item's job; None when it was not failed.
    failed_job_id: int | None
    #: The item still waits to run (its job came after ``created_by``).
    still_waiting: bool


def fail_waiting_item(
    sessions: sessionmaker[Session], item_id: int, message: str, *, created_by: int
) -> WaitedOut:
    """Fail a queued item, no attempt holding it, that waited out a
    dependency's outage, if its job was created by ``created_by`` (epoch
    ms: a job that came later has not waited that long)."""
    with sessions.begin() as session:
        job = session.scalar(_LOCK_JOB_OF_ITEM, {"item_id": item_id})
        if job is None or JobStatus(job.status).finished:
            return WaitedOut(None, still_waiting=False)
        item = session.scalar(select(JobItem).where(JobItem.id == item_id).with_for_update())
        if item is None or item.status != ItemStatus.QUEUED:
            return WaitedOut(None, still_waiting=False)
        if job.created_time > created_by:
            return WaitedOut(None, still_waiting=True)
        now = now_ms()
        item.status = ItemStatus.FAILED
        item.error_message = message
        item.finished_time = now
        _record_item_event(session, job.id, item.id, ItemStatus.FAILED, now)
        roll_up_job(session, job.id)
        return WaitedOut(job.id, still_waiting=False)
