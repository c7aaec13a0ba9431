"""Waiting for a job without polling: what ``Prefer: wait=N`` asks for, and
the one source in each API process that says when a job may have changed.

A waiter never holds a database connection while it waits: it reads the
job's progress (status and number of finished items), lets go of the
connection, and asks the process's ``JobChangeFeed`` to be called when the
job may have moved past that. The feed hears the workers' announcements
(segq/job_changes.py) on one Redis pub/sub subscription per process, and
every ``recheck_seconds`` reads the progress of every watched job in one
query, so a lost announcement delays a waiter by at most that long and
several API processes need nothing from each other.

On the HTTP server a waiting request is parked by the server (api/parking.py)
and holds no thread either (``wait_for_job``); ``wait_until_finished`` is
the blocking form, for code that runs in a thread anyway. How many
requests of a process may wait at once is bounded by
SEGQ_MAX_WAITING_REQUESTS (``WaitingRequests``), not by its threads.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from segq.api.context import close_db, db, services
from segq.api.parking import Parking, park, server_draining
from segq.job_changes import JOB_CHANGES_CHANNEL
from segq.models import ItemStatus, Job, JobItem, JobStatus

log = logging.getLogger(__name__)

#: The longest ``Prefer: wait`` honoured; longer asks are clamped to it.
MAX_WAIT_SECONDS = 60
#: How long the feed waits before it tries Redis again after losing it.
RESUBSCRIBE_SECONDS = 1.0

#: The environ key that carries a waiting request's place (WaitingPlace)
#: to the runs of it that resume its wait (api/parking.py).
WAITING_PLACE_ENVIRON_KEY = "segq.waiting_place"

#: Item statuses that count as finished in a job's progress.
FINISHED_ITEM_STATUSES = (ItemStatus.COMPLETED, ItemStatus.FAILED, ItemStatus.CANCELED)


class JobProgress(NamedTuple):
    """What a waiter has seen of a job: a change of either is news."""

    status: str
    finished_items: int

    @property
    def finished(self) -> bool:
        return JobStatus(self.status).finished


def progress_of(session: Session, job_ids: Collection[int]) -> dict[int, JobProgress]:
    """The progress of each of ``job_ids`` that exists, in one query."""
    if not job_ids:
        return {}
    finished = func.count(case((JobItem.status.in_(FINISHED_ITEM_STATUSES), 1)))
    rows = session.execute(
        select(Job.id, Job.status, finished)
        .outerjoin(JobItem, JobItem.job_id == Job.id)
        .where(Job.id.in_(list(job_ids)))
        .group_by(Job.id, Job.status)
    )
    return {job_id: JobProgress(status, count) for job_id, status, count in rows}


@dataclass
class _Watch:
    job_id: int
    seen: JobProgress
    on_change: Callable[[], None]


class JobChangeFeed:
    """Calls waiters back when the job they watch may have changed.

    One per API process, built with the app and started by the first watch
    (a process that never waits runs no thread and no subscription)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        redis_url: str | None,
        recheck_seconds: float,
    ) -> None:
        self._sessions = sessions
        self._redis_url = redis_url
        self._recheck_seconds = recheck_seconds
        self._lock = threading.Lock()
        self._watches: dict[int, _Watch] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    @property
    def watching(self) -> int:
        """How many watches are waiting to be called."""
        return len(self._watches)

    def watch(
        self, job_id: int, seen: JobProgress, on_change: Callable[[], None]
    ) -> Callable[[], None]:
        """Call ``on_change`` once, from the feed's thread, when ``job_id`` may
        have moved past ``seen``: at an announcement of it, or when a
        re-check finds it changed. Returns a function that cancels the
        watch (harmless after the call). ``on_change`` must be quick: it
        wakes the waiter and returns."""
        token = next(self._tokens)
        with self._lock:
            self._watches[token] = _Watch(job_id, seen, on_change)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="segq-job-change-feed", daemon=True
                )
                self._thread.start()

        def cancel() -> None:
            with self._lock:
                self._watches.pop(token, None)

        return cancel

    def _fire(self, chosen: Callable[[_Watch], bool]) -> None:
        with self._lock:
            due = [token for token, watch in self._watches.items() if chosen(watch)]
            fired = [self._watches.pop(token) for token in due]
        for watch in fired:
            try:
                watch.on_change()
            except Exception:
                log.exception("a waiter of job %s failed to wake", watch.job_id)

    def _run(self) -> None:
        subscription = None
        next_recheck = time.monotonic() + self._recheck_seconds
        while True:
            if subscription is None and self._redis_url is not None:
                subscription = self._subscribe()
            timeout = max(0.0, next_recheck - time.monotonic())
            if subscription is None:
                time.sleep(timeout)
            else:
                try:
                    message = subscription.get_message(
                        ignore_subscribe_messages=True, timeout=timeout
                    )
                except (redis.RedisError, OSError) as exc:
                    log.warning("lost the job-change subscription: %s", exc)
                    subscription = None
                    time.sleep(min(timeout, RESUBSCRIBE_SECONDS))
                    message = None
                if message is not None:
                    self._announced(message.get("data"))
            if time.monotonic() >= next_recheck:
                self._recheck()
                next_recheck = time.monotonic() + self._recheck_seconds

    def _subscribe(self) -> redis.client.PubSub | None:
        assert self._redis_url is not None
        try:
            client = redis.Redis.from_url(
                self._redis_url, socket_connect_timeout=2, health_check_interval=30
            )
            subscription: redis.client.PubSub = client.pubsub()  # type: ignore[no-untyped-call]
            subscription.subscribe(JOB_CHANGES_CHANNEL)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot subscribe to job changes (re-checks go on): %s", exc)
            return None
        # Whatever was announced before the subscription took is caught up
        # with by looking at every watched job now.
        self._recheck()
        return subscription

    def _announced(self, data: object) -> None:
        try:
            job_id = int(data)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return
        self._fire(lambda watch: watch.job_id == job_id)

    def _recheck(self) -> None:
        with self._lock:
            job_ids = {watch.job_id for watch in self._watches.values()}
        if not job_ids:
            return
        try:
            with self._sessions() as session:
                now = progress_of(session, job_ids)
        except Exception as exc:
            log.warning("cannot re-check the jobs waited on: %s", exc)
            return
        # A job that is gone is news too: its waiter answers 404.
        self._fire(lambda watch: now.get(watch.job_id) != watch.seen)


def requested_wait_seconds(prefer_headers: Iterable[str]) -> int | None:
    """The seconds asked for by ``Prefer: wait=N`` (RFC 7240), clamped to
    ``MAX_WAIT_SECONDS``; a bare ``wait`` asks for the most. None when no
    valid ``wait`` preference is given: RFC 7240 has a server ignore a
    preference it does not understand, so a malformed one is not an error."""
    for header in prefer_headers:
        for preference in header.split(","):
            token, _, value = preference.split(";")[0].strip().partition("=")
            if token.strip().lower() != "wait":
                continue
            value = value.strip().strip('"')
            if not value:
                return MAX_WAIT_SECONDS
            if not value.isascii() or not value.isdigit():
                return None
            return min(int(value), MAX_WAIT_SECONDS)
    return None


@dataclass(frozen=True)
class Wait:
    """A request's wait: ``seconds`` as applied, until ``deadline`` (monotonic)."""

    seconds: int
    deadline: float

    @classmethod
    def starting_now(cls, seconds: int) -> Wait:
        return cls(seconds, time.monotonic() + seconds)

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def wait_for_change(feed: JobChangeFeed, job_id: int, seen: JobProgress, timeout_s: float) -> None:
    """Block this thread until ``job_id`` may have moved past ``seen``, or
    ``timeout_s`` passes. Holds no database connection."""
    changed = threading.Event()
    cancel = feed.watch(job_id, seen, changed.set)
    try:
        changed.wait(timeout_s)
    finally:
        cancel()


def wait_in_thread_until_finished(
    feed: JobChangeFeed, sessions: sessionmaker[Session], job_id: int, timeout_s: float
) -> bool:
    """``wait_until_finished`` with the feed and sessions given."""
    give_up = time.monotonic() + timeout_s
    while True:
        # A session of its own, closed before waiting: the connection goes
        # back to the pool for the whole wait.
        with sessions() as session:
            progress = progress_of(session, [job_id]).get(job_id)
        if progress is None:
            return False
        if progress.finished:
            return True
        remaining = give_up - time.monotonic()
        if remaining <= 0:
            return False
        wait_for_change(feed, job_id, progress, remaining)


def wait_until_finished(job_id: int, timeout_s: float) -> bool:
    """Block the calling thread until the job reaches a final status (True)
    or ``timeout_s`` passes (False; also for a job that does not exist).

    Called inside a request of the app (it uses the app's feed and
    sessions). It holds no database connection while it waits; the caller
    should not either: commit or close the request's session first. It
    holds its thread, so it takes a place among the process's waiting
    requests that may block (``WaitingRequests``): with none free it raises
    NoWaitingSlot at once. A request's route waits with ``wait_for_job``."""
    found = services()
    place = found.waiting_requests.reserve(parkable=False)
    if place is None:
        raise NoWaitingSlot(found.waiting_requests.refusal())
    try:
        return wait_in_thread_until_finished(found.job_changes, found.sessions, job_id, timeout_s)
    finally:
        place.release()


def wait_for_job(
    job_id: int, wait: Wait, resume_environ: Mapping[str, Any], place: WaitingPlace
) -> bool:
    """Wait for ``job_id`` to finish, at most until ``wait``'s deadline, the
    one way every route waits for a job (native ``Prefer: wait``, the
    peers' synchronous routes and Replicate's ``Prefer: wait``).

    True: the request is parked (api/parking.py), holding no thread and no
    database connection; the view returns any response (it is dropped),
    and the server runs the request again, its environ changed by
    ``resume_environ``, when the job may have changed or the deadline
    comes; ``place`` is let go of when the request is done with. False:
    answer now: the job is finished or gone, the wait is over, the process
    is draining, or (where the server cannot park) this thread waited."""
    progress = progress_of(db(), [job_id]).get(job_id)
    if progress is None or progress.finished or wait.remaining <= 0 or server_draining():
        return False
    # The request's session goes back to the pool for the whole wait.
    close_db()
    feed = services().job_changes
    parking = Parking(
        watch=lambda parked: feed.watch(job_id, progress, parked.wake),
        deadline=wait.deadline,
        environ=resume_environ,
        stream=False,
        release=place.release,
    )
    if park(parking):
        return True
    wait_in_thread_until_finished(feed, services().sessions, job_id, wait.remaining)
    return False


class NoWaitingSlot(Exception):
    """As many requests of this process as may wait are already waiting."""


class WaitingPlace:
    """One request's place among its process's waiting requests, held from
    before its job is made until it is answered or its client leaves."""

    def __init__(self, owner: WaitingRequests, *, parkable: bool) -> None:
        self._owner = owner
        self._parkable = parkable
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        """Let the place go; harmless after the first call."""
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._owner._let_go(parkable=self._parkable)


class WaitingRequests:
    """How many requests of this process may wait for a job at once
    (SEGQ_MAX_WAITING_REQUESTS): parked ones hold a connection each and
    nothing else. Where the server cannot park (another WSGI server,
    Flask's test client), a waiting request holds its thread, so at most
    ``blocking_limit`` of them may wait, leaving the rest of the threads
    free for every other request, health checks included.

    A place is taken before the job is made: a request refused for want
    of one leaves no job behind."""

    def __init__(self, limit: int, blocking_limit: int) -> None:
        self.limit = limit
        self.blocking_limit = blocking_limit
        self._lock = threading.Lock()
        self._waiting = 0
        self._blocking = 0

    @property
    def waiting(self) -> int:
        """How many places are held now."""
        return self._waiting

    def reserve(self, *, parkable: bool) -> WaitingPlace | None:
        """A place for a request that will park (``parkable``) or block its
        thread; None when every place of that kind is taken."""
        with self._lock:
            if self._waiting >= self.limit:
                return None
            if not parkable and self._blocking >= self.blocking_limit:
                return None
            self._waiting += 1
            if not parkable:
                self._blocking += 1
        return WaitingPlace(self, parkable=parkable)

    def refusal(self) -> str:
        """Why a request found no place, for its 503."""
        return (
            f"{self.limit} requests of this server process are already waiting for their "
            "jobs (SEGQ_MAX_WAITING_REQUESTS); no job was made: retry shortly"
        )

    def _let_go(self, *, parkable: bool) -> None:
        with self._lock:
            self._waiting -= 1
            if not parkable:
                self._blocking -= 1


def blocking_wait_slots(request_threads: int | None) -> int:
    """Half the process's request threads (at least one); 4 where the
    server's thread count is unknown (Flask's test client, another WSGI
    server)."""
    return 4 if request_threads is None else max(1, request_threads // 2)
