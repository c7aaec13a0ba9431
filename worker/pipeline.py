"""The work of one item, as plain functions: claim, segment, store, complete.

Delivery is at least once, so every step is safe to repeat: a claim names
its attempt and takes a lease, objects go to keys of their attempt, and a
completion lands only while its attempt still holds the lease.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
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
from segq.db import once_more_if_disconnected
from segq.images import ImageRefused, decode_image
from segq.job_document import render_item_event
from segq.models import ItemStatus, Job, JobItem, JobStatus, StoredFile
from segq.storage import ObjectNotFound, ObjectStorage, StorageError
from segq.url_guard import FetchFailed, FetchPolicy, UrlRefused, fetch
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
from worker.engines.base import Candidate, Prompt, SegmentationEngine
from worker.masks import (
    encode_png,
    mask_area,
    mask_bounding_box,
    mask_polygons,
    mask_rle,
    polygons_svg_path,
)

log = logging.getLogger(__name__)


class ItemFailure(Exception):
    """The item cannot succeed, however often it is tried; the message is
    shown to the client as the item's errorMessage."""


class StorageUnavailable(Exception):
    """Storage failed this attempt; the item was put back in the queue."""


class Outcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    #: Nothing to do: the item is finished, canceled, or another attempt holds it.
    SKIPPED = "skipped"
    #: This attempt lost its lease before completing; its result was dropped.
    LEASE_LOST = "lease_lost"


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


def claim_item(
    sessions: sessionmaker[Session],
    item_id: int,
    *,
    lease_seconds: int,
    engine_name: str,
    max_attempts: int,
) -> Claim | None:
    """Take the item for one attempt, or None if it is not ours to run.

    An item found Running with its lease run out was abandoned by a worker
    that died; after ``max_attempts`` such attempts it is failed rather than
    tried again (an image that kills its worker must not kill them all)."""
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
            )
        if started is not None:
            # Every item of a Queued job is Queued at attempt 0: runnable.
            raise RuntimeError(f"item {item_id} of queued job {started.id} was not runnable")
    # Not runnable as it stands. Find out why in a transaction of its own,
    # which takes the rows for update (the one above held the job's only
    # in share mode, and a lock is not upgraded: two such would deadlock).
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
_TAKE_RUNNABLE_ITEM = (
    update(JobItem)
    .where(
        JobItem.id == bindparam("item_id"),
        or_(
            JobItem.status == ItemStatus.QUEUED,
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
        JobItem.file_ref,
        select(StoredFile.storage_key)
        .where(StoredFile.id == JobItem.file_id)
        .scalar_subquery()
        .label("storage_key"),
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


@dataclass(frozen=True)
class ImageLimits:
    """What a worker accepts as an item's image."""

    max_pixels: int
    #: How URLs are fetched; None: items given as URLs fail.
    fetch_policy: FetchPolicy | None


def load_image(storage: ObjectStorage, claim: Claim, limits: ImageLimits) -> npt.NDArray[np.uint8]:
    """The item's image as displayed, (H, W, 3) uint8 RGB (``segq.images``)."""
    if claim.source_url is not None:
        if limits.fetch_policy is None:
            raise ItemFailure("this worker does not fetch URLs")
        try:
            data = fetch(claim.source_url, limits.fetch_policy)
        except (UrlRefused, FetchFailed) as exc:
            raise ItemFailure(f"fileUrl: {exc}") from None
    elif claim.file_key is None:
        raise ItemFailure("the file was deleted before the item ran")
    else:
        try:
            data = storage.get(claim.file_key)
        except ObjectNotFound:
            raise ItemFailure("the file's content is missing from storage") from None
    try:
        # Items given as URLs were never inspected by the API; stored files
        # were, but are bounded again under this worker's own limit.
        return decode_image(data, max_pixels=limits.max_pixels).pixels
    except ImageRefused as exc:
        raise ItemFailure(f"the image was refused: {exc}") from None


def pixel_prompt(prompt: dict[str, Any], width: int, height: int) -> Prompt:
    """The contract's normalized prompt in the image's pixel frame."""
    points = prompt.get("points") or []
    box = prompt.get("boundingBox")
    return Prompt(
        points=np.array(
            [[p["x"] * width, p["y"] * height] for p in points], dtype=np.float64
        ).reshape(-1, 2),
        labels=np.array([p["label"] for p in points], dtype=np.int64),
        box=(
            np.array(
                [
                    box["xMin"] * width,
                    box["yMin"] * height,
                    box["xMax"] * width,
                    box["yMax"] * height,
                ],
                dtype=np.float64,
            )
            if box
            else None
        ),
    )


#: Candidates an engine returns at most (multimask output).
MAX_CANDIDATES = 3


def mask_key(claim: Claim, index: int, attempt: int | None = None) -> str:
    """Per item, attempt and candidate. An attempt that lost its lease may
    still be running (its worker cut off from the database, not from
    storage): under a key of its own it can never replace the objects of
    the attempt that completed, whose keys the item's row records."""
    attempt = claim.attempt if attempt is None else attempt
    return (
        f"projects/{claim.project_id}/jobs/{claim.job_id}/items/{claim.item_id}"
        f"/attempt-{attempt}/mask-{index}.png"
    )


def _discard(storage: ObjectStorage, keys: list[str]) -> None:
    """Delete objects no row refers to; storage that fails leaves them as
    garbage, never as a result."""
    for key in keys:
        try:
            storage.delete(key)
        except StorageError:
            log.warning("could not delete %s; it is referred to by no item", key, exc_info=True)


def _objects_of(result: dict[str, Any] | None) -> list[str]:
    if result is None:
        return []
    return [segment["maskKey"] for segment in result["segments"] if "maskKey" in segment]


def _objects_of_earlier_attempts(claim: Claim) -> list[str]:
    """Where attempts before ``claim``'s may have left objects (a worker
    killed, or cut off, between its writes and its completion)."""
    return [
        mask_key(claim, index, attempt)
        for attempt in range(1, claim.attempt)
        for index in range(MAX_CANDIDATES)
    ]


def encode_result(
    claim: Claim,
    candidates: list[Candidate],
    storage: ObjectStorage,
    width: int,
    height: int,
) -> dict[str, Any]:
    """Store the masks and describe them as the item's result (keys, not URLs)."""
    outputs = set(claim.options.get("outputs") or ("polygons", "mask"))
    segments: list[dict[str, Any]] = []
    for index, candidate in enumerate(candidates):
        mask = candidate.mask
        box = mask_bounding_box(mask)
        segment: dict[str, Any] = {
            "score": round(float(candidate.score), 6),
            "boundingBox": (
                None
                if box is None
                else {"xMin": box[0], "yMin": box[1], "xMax": box[2], "yMax": box[3]}
            ),
            "area": mask_area(mask),
        }
        rings = mask_polygons(mask) if outputs & {"polygons", "svgPath"} else []
        if "polygons" in outputs:
            segment["polygons"] = [
                {"vertices": [list(v) for v in ring.vertices], "isHole": ring.is_hole}
                for ring in rings
            ]
        if "svgPath" in outputs:
            segment["svgPath"] = polygons_svg_path(rings, width, height)
        if "rle" in outputs:
            segment["rle"] = mask_rle(mask)
        if "mask" in outputs:
            key = mask_key(claim, index)
            storage.put(key, encode_png(mask), "image/png")
            segment["maskKey"] = key
        segments.append(segment)
    return {"width": width, "height": height, "segments": segments}


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
    result: dict[str, Any] | None,
    error_message: str | None = None,
) -> bool:
    """Complete (with ``result``) or fail (with ``error_message``) the item,
    only if ``claim`` still holds it; then roll the job up. False when the
    lease was lost to another attempt."""
    status = ItemStatus.COMPLETED if result is not None else ItemStatus.FAILED
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


class LeaseKeeper:
    """Renews the leases of the items this process is running, every third
    of their length, so a short lease covers a long item and a dead
    worker's item is free again within one lease.

    One thread per process for every item it runs: starting and joining a
    thread per item cost two context switches on every item's path."""

    def __init__(self) -> None:
        self._forget_all()
        # A forked child has none of the parent's threads, and none of its
        # items: it starts empty (and not with a lock held at the fork).
        os.register_at_fork(after_in_child=self._forget_all)

    def _forget_all(self) -> None:
        self._wake = threading.Condition()
        self._held: dict[tuple[int, int], _HeldLease] = {}
        self._thread: threading.Thread | None = None

    def hold(self, sessions: sessionmaker[Session], claim: Claim, lease_seconds: int) -> None:
        with self._wake:
            self._start_thread_once()
            interval = lease_seconds / 3
            self._held[claim.item_id, claim.attempt] = _HeldLease(
                sessions, claim, lease_seconds, interval, time.monotonic() + interval
            )
            self._wake.notify()

    def let_go(self, claim: Claim) -> None:
        with self._wake:
            self._held.pop((claim.item_id, claim.attempt), None)

    def _start_thread_once(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [held for held in self._held.values() if held.next_time <= now]
                if not due:
                    next_time = min((held.next_time for held in self._held.values()), default=None)
                    self._wake.wait(None if next_time is None else next_time - now)
                    continue
                for held in due:
                    held.next_time = now + held.interval
            for held in due:
                self._renew(held)

    def _renew(self, held: _HeldLease) -> None:
        try:
            if not renew_lease(held.sessions, held.claim, held.lease_seconds):
                self.let_go(held.claim)  # another attempt has it, or it is finished
        except Exception:
            # The database may be back by the next beat; the completion
            # checks the lease anyway.
            log.warning("could not renew the lease of item %s", held.claim.item_id, exc_info=True)


@dataclass
class _HeldLease:
    sessions: sessionmaker[Session]
    claim: Claim
    lease_seconds: int
    interval: float
    next_time: float


_lease_keeper = LeaseKeeper()


@contextmanager
def lease_kept(sessions: sessionmaker[Session], claim: Claim, lease_seconds: int) -> Iterator[None]:
    """Keep ``claim``'s lease renewed while the body runs."""
    _lease_keeper.hold(sessions, claim, lease_seconds)
    try:
        yield
    finally:
        _lease_keeper.let_go(claim)


def release_item(sessions: sessionmaker[Session], claim: Claim) -> bool:
    """Give the item back to the queue, if ``claim`` still holds it."""
    with sessions.begin() as session:
        return _update_held_item(
            session,
            claim,
            status=ItemStatus.QUEUED,
            lease_expires_time=None,
            published_time=now_ms(),
        )


def process_item(
    sessions: sessionmaker[Session],
    storage: ObjectStorage,
    engine: SegmentationEngine,
    item_id: int,
    *,
    lease_seconds: int,
    max_attempts: int,
    limits: ImageLimits,
) -> Outcome:
    """Run one item end to end.

    Problems of the item itself fail it. A storage error puts it back in
    the queue and raises StorageUnavailable (the caller schedules a retry),
    until ``max_attempts`` attempts have been made; then the item fails.
    Database errors propagate: the lease runs out and the item is run again.
    """
    # Each transaction runs once more if its pooled connection had died
    # (segq/db.py): all three are guarded by the attempt, so a repeat after a
    # commit that did land finds the work done.
    claim = once_more_if_disconnected(
        lambda: claim_item(
            sessions,
            item_id,
            lease_seconds=lease_seconds,
            engine_name=engine.name,
            max_attempts=max_attempts,
        )
    )
    if claim is None:
        return Outcome.SKIPPED
    result: dict[str, Any] | None = None
    error_message: str | None = None
    try:
        with lease_kept(sessions, claim, lease_seconds):
            image = load_image(storage, claim, limits)
            height, width = image.shape[:2]
            candidates = engine.segment(
                image,
                pixel_prompt(claim.prompt, width, height),
                multimask=bool(claim.options.get("multimaskOutput")),
            )
            result = encode_result(claim, candidates, storage, width, height)
    except ItemFailure as failure:
        error_message = str(failure)
    except StorageError as exc:
        if claim.attempt < max_attempts:
            once_more_if_disconnected(lambda: release_item(sessions, claim))
            raise StorageUnavailable(str(exc)) from exc
        error_message = f"storage was unavailable for {claim.attempt} attempts: {exc}"
    except Exception as exc:
        # An engine or encoder bug would fail again on every attempt: fail
        # the item now, with what went wrong, and keep the worker serving.
        log.exception("item %s failed in the pipeline", claim.item_id)
        error_message = f"segmentation failed: {type(exc).__name__}: {str(exc)[:300]}"
    landed = once_more_if_disconnected(
        lambda: finish_item(sessions, claim, result=result, error_message=error_message)
    )
    if not landed:
        log.warning(
            "item %s: attempt %s lost its lease before completing; its result is dropped",
            claim.item_id,
            claim.attempt,
        )
        _discard(storage, _objects_of(result))
        return Outcome.LEASE_LOST
    if claim.attempt > 1:
        # Only retried items pay for this: one delete per key that an
        # earlier attempt may have written.
        _discard(storage, _objects_of_earlier_attempts(claim))
    return Outcome.COMPLETED if result is not None else Outcome.FAILED
