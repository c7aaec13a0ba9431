"""A job's progress as server-sent events: which events a job has had, in
what order, and how each is framed.

The events are read from the job's rows, not stored: ``job.started`` once
the job started, an ``item.completed`` or ``item.failed`` per finished item
in the order they finished, and the job's end (``job.completed``,
``job.failed``, ``job.canceled``). Bodies are the webhooks' (the job as GET
shows it, without mask URLs; an item event has only its item, beside the
progress it made). Events are in the order of their times, and an event's
id is its place in that order, from 1, so a client that reconnects with
``Last-Event-ID: n`` gets the events after the n-th. Items of a job finish
one at a time (each takes the job's row lock) and their ``finishedTime`` is
read under the lock, so a later event never lands before one already sent:
not even an item that was running when its job was canceled, which
finishes after ``job.canceled``.

What a stream costs is per event, not per item: each API process keeps one
``JobEventLog`` per job streamed, which reads only the items finished since
its last read and frames each event once, and a ``JobEventFanOut`` that, when
a job changes, reads it once and sends the new frames straight to every
parked stream of the job (``api/parking.py``'s push), without running the
app for each; changes that come faster than FAN_OUT_INTERVAL_SECONDS are
sent together. A stream runs the app (authentication, tenancy) when it
connects and once a minute (the server sends the keepalives between); a
client that reads slower than its stream is sent nothing more until its
next run catches it up from the log. The job's end is sent, and the stream
ended, by the fan-out too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session, sessionmaker

from segq.api.errors import ApiError
from segq.api.job_items import items_of
from segq.api.job_waiting import FINISHED_ITEM_STATUSES, JobChangeFeed, JobProgress
from segq.api.parked_request import Parked
from segq.job_document import render_item_event, render_job
from segq.models import ItemStatus, Job, JobItem, JobStatus
from segq.webhook_events import (
    ITEM_COMPLETED,
    ITEM_FAILED,
    JOB_CANCELED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_STARTED,
    event_body,
)

log = logging.getLogger(__name__)

#: A comment line sent when nothing happened for this long, so proxies keep
#: the stream open and the server learns of clients that left.
KEEPALIVE_SECONDS = 15.0
#: Keepalives the server sends by itself between two runs of a stream (a
#: run checks the client's key and the job's tenancy again): once a minute.
KEEPALIVES_PER_RUN = 3
#: What a stream sends while it has nothing else to send.
KEEPALIVE_FRAME = ": keepalive\n\n"
#: How long a client waits before reconnecting after the stream breaks.
RETRY_FRAME = "retry: 2000\n\n"
#: The least time between two sends of a job's new events to its streams.
FAN_OUT_INTERVAL_SECONDS = 1.0
#: Logs of jobs no stream of this process follows, kept for streams that
#: come back (the most recently used first); each holds its job's frames.
MAX_IDLE_LOGS = 32

_END_EVENTS = {
    JobStatus.COMPLETED: JOB_COMPLETED,
    JobStatus.FAILED: JOB_FAILED,
    JobStatus.CANCELED: JOB_CANCELED,
}
_EVENT_ITEM = (ItemStatus.COMPLETED, ItemStatus.FAILED)


@dataclass(frozen=True)
class LoggedEvent:
    number: int
    type: str
    #: The event as a stream sends it, framed once.
    frame: str


@dataclass
class JobEventLog:
    """One job's events as this process has read them, in order, each framed
    once. ``refresh`` reads only what changed since the last read."""

    job_id: int
    events: list[LoggedEvent] = field(default_factory=list)
    #: The job's progress as of the last read; None before the first.
    progress: JobProgress | None = None
    #: The job is gone (deleted).
    gone: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    _item_ids: set[int] = field(default_factory=set)
    _last_finished_time: int | None = None
    _started: bool = False
    _ended: bool = False
    _counts: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.gone or (self.progress is not None and self.progress.finished)

    def frames_after(self, sent: int) -> str:
        return "".join(event.frame for event in self.events[sent:])

    def refresh(self, session: Session) -> None:
        """Read what changed since the last refresh; the caller holds ``lock``."""
        finished = func.count(case((JobItem.status.in_(FINISHED_ITEM_STATUSES), 1)))
        with_event = func.count(
            case((and_(JobItem.status.in_(_EVENT_ITEM), JobItem.finished_time.is_not(None)), 1))
        )
        row = session.execute(
            select(Job.status, finished, with_event)
            .outerjoin(JobItem, JobItem.job_id == Job.id)
            .where(Job.id == self.job_id)
            .group_by(Job.id, Job.status)
        ).first()
        if row is None:
            self.gone = True
            return
        status, finished_items, items_with_events = row
        progress = JobProgress(status, finished_items)
        if progress == self.progress:
            return
        job = session.get(Job, self.job_id, populate_existing=True)
        if job is None:
            self.gone = True
            return
        self._append(session, job, items_with_events)
        self.progress = progress

    def _append(self, session: Session, job: Job, items_with_events: int) -> None:
        if not self._counts:
            total = session.scalar(select(func.count()).where(JobItem.job_id == job.id)) or 0
            self._counts = {
                ItemStatus.COMPLETED: 0,
                ItemStatus.FAILED: 0,
                ItemStatus.RUNNING: total,
            }
        finished = self._newly_finished(session, items_with_events)
        # (time, then rank among events of the same millisecond), type, the
        # item of an item event (None: a job event, whose body is the job)
        found: list[tuple[tuple[int, int], str, JobItem | None]] = []
        if job.start_time is not None and not self._started:
            found.append(((job.start_time, 0), JOB_STARTED, None))
        for finished_item in finished:
            event = ITEM_COMPLETED if finished_item.status == ItemStatus.COMPLETED else ITEM_FAILED
            assert finished_item.finished_time is not None
            found.append(((finished_item.finished_time, 2), event, finished_item))
        end = _END_EVENTS.get(JobStatus(job.status))
        if end is not None and not self._ended:
            # A job completes or fails with its last item (after it, in the
            # same millisecond); a cancel comes before what finishes after it.
            rank = 1 if end == JOB_CANCELED else 3
            found.append(((job.status_time, rank), end, None))
        found.sort(key=lambda event: event[0])  # stable: items keep their order
        for (timestamp, _), event_type, item in found:
            if item is not None:
                self._counts[item.status] += 1
                self._counts[ItemStatus.RUNNING] -= 1
                self._item_ids.add(item.id)
                assert item.finished_time is not None
                self._last_finished_time = max(self._last_finished_time or 0, item.finished_time)
                # The progress as it was when this item finished.
                data = render_item_event(job, item, dict(self._counts))
            else:
                data = render_job(job, items_of(session, job), None)
                self._started = self._started or event_type == JOB_STARTED
                self._ended = self._ended or event_type in _END_EVENTS.values()
            number = len(self.events) + 1
            body = event_body(event_type, timestamp, data)
            self.events.append(
                LoggedEvent(
                    number, event_type, f"id: {number}\nevent: {event_type}\ndata: {body}\n\n"
                )
            )

    def _newly_finished(self, session: Session, items_with_events: int) -> list[JobItem]:
        """The job's items finished (completed or failed) that have no event
        yet, in the order they finished; ``items_with_events`` of them have
        finished in all."""
        finished = select(JobItem).where(
            JobItem.job_id == self.job_id,
            JobItem.status.in_(_EVENT_ITEM),
            JobItem.finished_time.is_not(None),
        )
        order = (JobItem.finished_time, JobItem.position)
        recent = finished
        if self._last_finished_time is not None:
            # Items finish one at a time under their job's lock, so the new
            # ones are at or after the last seen, unless clocks disagree:
            # the count tells, and then every finished item is read.
            recent = finished.where(JobItem.finished_time >= self._last_finished_time)
        found = [
            item
            for item in session.scalars(recent.order_by(*order))
            if item.id not in self._item_ids
        ]
        if items_with_events > len(self._item_ids) + len(found):
            found = [
                item
                for item in session.scalars(finished.order_by(*order))
                if item.id not in self._item_ids
            ]
        return found


def job_events(session: Session, job: Job) -> list[LoggedEvent]:
    """Every event ``job`` has had so far, in order, read afresh."""
    fresh = JobEventLog(job.id)
    with fresh.lock:
        fresh.refresh(session)
    return fresh.events


def last_event_id(header: str | None) -> int:
    """How many events the client has had: its ``Last-Event-ID``, 0 without one."""
    if header is None or header == "":
        return 0
    if not header.isascii() or not header.isdigit() or len(header) > 9:
        raise ApiError(400, "Last-Event-ID must be the id of an event of this stream")
    return int(header)


@dataclass
class _Follower:
    parked: Parked
    sent: int


class JobEventFanOut:
    """The event logs of the jobs this API process streams, and the one
    thread that, when a job changes, reads it once and pushes its new events
    to every stream of it that is parked here.

    One per API process, built with the app; its thread starts with the
    first stream that parks."""

    def __init__(self, sessions: sessionmaker[Session], feed: JobChangeFeed) -> None:
        self._sessions = sessions
        self._feed = feed
        self._lock = threading.Lock()
        self._logs: OrderedDict[int, JobEventLog] = OrderedDict()
        self._followers: dict[int, dict[int, _Follower]] = {}
        self._feed_watches: dict[int, Callable[[], None]] = {}
        #: Jobs to read and send, each with when (time.monotonic()).
        self._changed: dict[int, float] = {}
        self._last_sent: dict[int, float] = {}
        self._wakeup = threading.Condition(self._lock)
        self._tokens = iter(range(1, 2**63))
        self._thread: threading.Thread | None = None
        #: Refreshes of logs by the fan-out's thread, for tests.
        self.refreshes = 0

    @property
    def following(self) -> int:
        with self._lock:
            return sum(len(followers) for followers in self._followers.values())

    def log(self, job_id: int) -> JobEventLog:
        """The job's log, made if this process has none."""
        with self._lock:
            found = self._logs.get(job_id)
            if found is None:
                found = self._logs[job_id] = JobEventLog(job_id)
            self._logs.move_to_end(job_id)
            self._trim()
            return found

    def followed(self, job_id: int) -> bool:
        """Whether the fan-out keeps the job's log current (it has streams
        here and is watched): a stream's run need not read the job again."""
        with self._lock:
            return job_id in self._followers and job_id in self._feed_watches

    def follow(self, job_id: int, sent: int, parked: Parked) -> Callable[[], None]:
        """Push the job's events after the ``sent``-th to ``parked`` as they
        come, and wake it when the job ends or it cannot take them. Returns
        a function that stops that (harmless after a wake)."""
        token = next(self._tokens)
        with self._lock:
            self._followers.setdefault(job_id, {})[token] = _Follower(parked, sent)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="segq-job-event-fan-out", daemon=True
                )
                self._thread.start()
            job_log = self._logs.get(job_id)
            if job_id not in self._feed_watches or job_log is None or len(job_log.events) > sent:
                # The job is not watched yet, or the log holds events past
                # ``sent`` (it moved while the stream's run went on): look now.
                self._changed[job_id] = 0.0
                self._wakeup.notify()

        def stop() -> None:
            with self._lock:
                followers = self._followers.get(job_id, {})
                followers.pop(token, None)
                if not followers:
                    self._followers.pop(job_id, None)
                    self._last_sent.pop(job_id, None)
                    cancel = self._feed_watches.pop(job_id, None)
                    if cancel is not None:
                        cancel()
                    self._trim()

        return stop

    def _trim(self) -> None:
        """Drop the least recently used logs no stream follows, beyond
        MAX_IDLE_LOGS. The caller holds ``_lock``."""
        idle = [job_id for job_id in self._logs if job_id not in self._followers]
        for job_id in idle[: max(0, len(idle) - MAX_IDLE_LOGS)]:
            del self._logs[job_id]

    def _announced(self, job_id: int) -> None:
        with self._lock:
            self._feed_watches.pop(job_id, None)
            # Changes that come faster than FAN_OUT_INTERVAL_SECONDS are
            # sent together: a job's streams cost per batch, not per item.
            due = self._last_sent.get(job_id, 0.0) + FAN_OUT_INTERVAL_SECONDS
            self._changed[job_id] = min(self._changed.get(job_id, due), due)
            self._wakeup.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    due = min(self._changed.items(), key=lambda job: job[1], default=None)
                    if due is not None and due[1] <= now:
                        break
                    self._wakeup.wait(None if due is None else due[1] - now)
                job_id = due[0]
                del self._changed[job_id]
                self._last_sent[job_id] = now
            try:
                self._send(job_id)
            except Exception:
                log.exception("could not send the events of job %s", job_id)
                self._wake_all(job_id)

    def _send(self, job_id: int) -> None:
        job_log = self.log(job_id)
        with job_log.lock:
            with self._sessions() as session:
                job_log.refresh(session)
            self.refreshes += 1
            count = len(job_log.events)
            finished, progress = job_log.finished, job_log.progress
            with self._lock:
                followers = list(self._followers.get(job_id, {}).items())
                if finished:
                    self._followers.pop(job_id, None)
            # Most streams of a job have had the same events: framed once.
            encoded: dict[int, bytes] = {}
            for token, follower in followers:
                frames = encoded.get(follower.sent)
                if frames is None:
                    frames = encoded[follower.sent] = job_log.frames_after(follower.sent).encode()
                if finished:
                    # The rest and the end, without a run of the app; one
                    # that is running or due answers for itself.
                    follower.parked.end(frames)
                elif follower.sent >= count:
                    continue
                elif follower.parked.push(frames, {"HTTP_LAST_EVENT_ID": str(count)}):
                    follower.sent = count
                else:
                    # Gone, waking, or reading slower than its stream: its
                    # next run catches up from Last-Event-ID.
                    self._unfollow(job_id, token)
                    follower.parked.wake()
        with self._lock:
            cancel = self._feed_watches.pop(job_id, None) if finished else None
            if not finished and job_id in self._followers and job_id not in self._feed_watches:
                assert progress is not None
                self._feed_watches[job_id] = self._feed.watch(
                    job_id, progress, lambda: self._announced(job_id)
                )
        if cancel is not None:
            cancel()

    def _unfollow(self, job_id: int, token: int) -> None:
        with self._lock:
            self._followers.get(job_id, {}).pop(token, None)

    def _wake_all(self, job_id: int) -> None:
        with self._lock:
            followers = self._followers.pop(job_id, {})
            cancel = self._feed_watches.pop(job_id, None)
        if cancel is not None:
            cancel()
        for follower in followers.values():
            follower.parked.wake()
