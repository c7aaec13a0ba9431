"""Parking a request: a view that has to wait (``Prefer: wait``, an event
stream) hands the server a ``Parking`` instead of blocking its thread; the
server keeps the connection in its event loop, holding no thread and (the
request's session being closed at teardown) no database connection, and
runs the request again when the watch calls back or the deadline comes.

How a request is run again: through the whole app, as a request of its
own (authentication, tenancy, errors, teardown all apply), with the
original request's environ changed as the parking says and an empty body.
A parking either defers the answer (nothing of this run is sent; the run
that does not park answers the request), or streams it (this run's status,
headers and body are sent now, and each later run appends its body, until
a run does not park or does not answer 200, which ends the response).

The server side is waitress's, through its extension points: ``ParkingTask``
runs the app and keeps a parked request's state across runs, and
``ParkingChannel`` keeps the parked request and its connection, wakes it
(from the feed's thread or at the deadline), and holds back whatever the
client pipelines meanwhile until the parked request is answered.

A streamed answer can also grow without a run of the app: its watch may
``push`` more of it or ``end`` it (api/job_event_stream.py's fan-out does,
for every stream of a job at once), and the server sends its keepalive
itself when the deadline comes, up to ``keepalives`` times before a run.
Those writes happen in the event loop's thread, where waitress sends.

Where the app runs without this server (Flask's test client, a WSGI server
of another kind), ``park`` returns False and the view waits in its thread.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from flask import request
from waitress.channel import ClientDisconnected, HTTPChannel
from waitress.task import WSGITask

#: The environ key under which the server offers parking to the app.
PARK_ENVIRON_KEY = "segq.park"
#: The environ key that marks a run of a parked request (any value but None).
RESUMED_ENVIRON_KEY = "segq.resumed"
#: The environ key the server sets (True) while its process drains before
#: exiting: a request must be answered now, not parked; a wait answers
#: with the job as it is, an event stream ends (its client reconnects).
DRAINING_ENVIRON_KEY = "segq.draining"
#: What a client may send behind a parked request before the server stops
#: reading it (pipelined requests; they are served after the parked one).
MAX_HELD_INPUT_BYTES = 64 * 1024

#: What a parked streamed answer may have buffered, unsent, for ``push`` to
#: add to it: a client that reads slower is caught up by its next run instead.
MAX_PUSH_BACKLOG_BYTES = 256 * 1024


class Parked(Protocol):
    """A parked request, as its watch reaches it (from any thread)."""

    def wake(self) -> None:
        """Run the request again."""
        ...

    def push(self, data: bytes, environ: Mapping[str, Any]) -> bool:
        """Send ``data`` now as more of a streamed answer, and change the
        next run's environ as ``environ`` says; False when it cannot be sent
        now (see ParkingChannel.push), and the caller should wake it."""
        ...

    def end(self, data: bytes) -> bool:
        """End a streamed answer with ``data``, without running the app
        again; False when it is not parked now (a run of it is due, which
        answers for itself)."""
        ...


#: Watch(parked) -> cancel: arranges one call of parked.wake() (or, for a
#: streamed answer, calls of parked.push) when the request may have something
#: new to answer.
Watch = Callable[[Parked], Callable[[], None]]


@dataclass(frozen=True)
class Parking:
    """A view's request to be run again later instead of answered now."""

    watch: Watch
    #: time.monotonic() by which the request runs again, changed or not.
    deadline: float
    #: What to change in the request's environ for the next run.
    environ: Mapping[str, Any]
    #: True: send this run's answer now and append later runs' bodies.
    stream: bool
    #: For a streamed answer: what the server sends by itself when the
    #: deadline comes, renewing it as long again, ``keepalives`` times
    #: before the request runs again.
    keepalive: bytes | None = None
    keepalives: int = 0
    #: Called once when the parked request is done with: answered by a run
    #: that does not park, or given up because its client left. What the
    #: request holds while parked (a place among the waiting requests,
    #: api/job_waiting.py) is let go of here, whichever way it ends.
    release: Callable[[], None] | None = None


def park(parking: Parking) -> bool:
    """Ask the server to park the current request; False when it cannot, and
    the view must then wait in its own thread. The view still returns a
    response: for a deferred parking it is dropped; for a streamed one it is
    the start of the answer."""
    offer: Callable[[Parking], None] | None = request.environ.get(PARK_ENVIRON_KEY)
    if offer is None or server_draining():
        return False
    offer(parking)
    return True


def waits_without_thread() -> bool:
    """Whether a wait of the current request holds no thread: the server
    parks it, or (its process draining) answers it without waiting."""
    return request.environ.get(PARK_ENVIRON_KEY) is not None


def server_draining() -> bool:
    """The process serving this request is about to exit: answer now."""
    return bool(request.environ.get(DRAINING_ENVIRON_KEY))


# waitress ships no type information, so its classes are Any to mypy and
# each subclass below says it knows.


class ParkingTask(WSGITask):  # type: ignore[misc]
    """Runs the app for one request, once or, while it parks, several times."""

    # waitress's, typed here.
    status: str
    close_on_finish: bool
    complete: bool
    response_headers: list[tuple[str, str]]
    content_length: int | None
    content_bytes_written: int
    environ: dict[str, Any] | None

    runs = 0
    #: Set by the app (through the environ) during the current run.
    parking: Parking | None = None
    #: A streamed answer's status, once its headers are sent.
    sent_status: str | None = None
    close_at_end = False
    _first_environ: dict[str, Any] | None = None

    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()
        if self._first_environ is None:
            self._first_environ = dict(environ)
            environ[PARK_ENVIRON_KEY] = self._accept_parking
        return environ

    def _accept_parking(self, parking: Parking) -> None:
        self.parking = parking

    def service(self) -> None:
        try:
            if self.runs == 0:
                self.start()
            self.runs += 1
            self.parking = None
            ending = self.channel.take_ending()
            if ending is not None:
                # Ended by its watch (Parked.end): the rest, and the end.
                self.write(ending)
                self.close_on_finish = self.close_on_finish or self.close_at_end
                self.finish()
                return
            self.execute()
            if self.parking is not None and self._answer_continues():
                self._park()
                return
            self.close_on_finish = self.close_on_finish or self.close_at_end
            self.finish()
        except OSError:
            self.close_on_finish = True
            if self.channel.adj.log_socket_errors:
                raise

    def _answer_continues(self) -> bool:
        """A streamed answer goes on only while its runs answer as it began."""
        return self.sent_status is None or self.status == self.sent_status

    def _park(self) -> None:
        assert self.parking is not None
        assert self._first_environ is not None
        if self.parking.stream:
            self.sent_status = self.status
            # A streamed answer ends with the connection (waitress closes
            # after a chunked one); it must stay open while parked.
            self.close_at_end = self.close_at_end or self.close_on_finish
            self.close_on_finish = False
        else:
            # Nothing was sent: the next run answers from scratch.
            self.complete = False
            self.status = "200 OK"
            self.response_headers = []
            self.content_length = None
            self.content_bytes_written = 0
            self.close_on_finish = False
        self.environ = {
            **self._first_environ,
            **self.parking.environ,
            PARK_ENVIRON_KEY: self._accept_parking,
            RESUMED_ENVIRON_KEY: self.runs,
            # The body was read by the first run; later runs have none.
            "wsgi.input": io.BytesIO(),
            "CONTENT_LENGTH": "0",
        }
        for consumed in ("CONTENT_TYPE", "HTTP_CONTENT_ENCODING", "HTTP_TRANSFER_ENCODING"):
            self.environ.pop(consumed, None)
        self.channel.parked(self, self.parking)

    def execute(self) -> None:
        if self.sent_status is not None:
            # start_response again, for a run whose headers are already sent.
            self.complete = False
            self.content_length = None
        super().execute()

    def write(self, data: bytes) -> None:
        parking = self.parking
        if (parking is not None and not parking.stream and self.sent_status is None) or (
            self.sent_status is not None and self.status != self.sent_status
        ):
            # A deferred run's answer, or a failed run of a streamed one: not
            # sent; counted, so waitress sees no short answer.
            self.complete = True
            self.content_bytes_written += len(data)
            return
        super().write(data)


class _LoopActions:
    """Actions for a server's event loop thread, run in the order queued."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: list[Callable[[], None]] = []

    def add(self, action: Callable[[], None]) -> bool:
        """Queue ``action``; True when the loop must be woken for it."""
        with self._lock:
            self._queued.append(action)
            return len(self._queued) == 1

    def run(self) -> None:
        """Run what is queued (waitress runs this holding its trigger's
        lock: an action must not pull the trigger)."""
        with self._lock:
            queued, self._queued = self._queued, []
        for action in queued:
            action()


class ParkingChannel(HTTPChannel):  # type: ignore[misc]
    """A connection whose request may be parked between runs of the app."""

    #: The task of the parked request: set from its first parking until it
    #: is answered, including while it runs again.
    parked_task: ParkingTask | None = None
    #: Set while the parked request is queued or running again.
    waking = False
    deadline = 0.0
    _cancel_watch: Callable[[], None] | None = None
    _ending: bytes | None = None
    _keepalive: bytes | None = None
    _keepalives_left = 0
    _keepalive_seconds = 0.0
    _release: Callable[[], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.park_lock = threading.RLock()
        self.held_input = bytearray()
        self.held_requests: list[Any] = []
        self._parked_now: Parking | None = None

    def task_class(self, channel: ParkingChannel, request: Any) -> ParkingTask:
        # waitress makes the task of each run through this: a parked
        # request's next run goes on with the task it parked in.
        return self.parked_task or ParkingTask(channel, request)

    def parked(self, task: ParkingTask, parking: Parking) -> None:
        """Called by ``task`` in its thread when its run parked."""
        with self.park_lock:
            self.parked_task = task
            self._parked_now = parking
            if parking.release is not None:
                self._release = parking.release
            # Not to be woken until waitress has finished this run's
            # bookkeeping (service() below clears it).
            self.waking = True
            with self.requests_lock:
                # Requests pipelined behind this one, already read, wait
                # until it is answered (waitress would run the next at once).
                self.held_requests.extend(self.requests[1:])
                del self.requests[1:]

    def service(self) -> None:
        super().service()
        with self.park_lock:
            parking, self._parked_now = self._parked_now, None
            if parking is None:
                self._answered()
                return
            if not self.connected:
                # The client left during this run: nothing would wake it.
                self.parked_task = None
                self.waking = False
                self._let_go()
                return
            self.deadline = parking.deadline
            self._keepalive = parking.keepalive
            self._keepalives_left = parking.keepalives
            self._keepalive_seconds = max(1.0, parking.deadline - time.monotonic())
            # Renewed while parked: waitress closes connections idle for
            # its channel_timeout, and a parked one is not idle.
            self.last_activity = time.time()
            self.waking = False
        # Watched only now: a wake-up before waitress has taken the request
        # off its queue (in super().service()) would put it back too early.
        cancel = parking.watch(self)
        with self.park_lock:
            if self.parked_task is None or self.waking:
                cancel()
            else:
                self._cancel_watch = cancel
        self.server.pull_trigger()

    def _answered(self) -> None:
        """The parked request (if any) got its answer: serve what the client
        sent behind it. The caller holds ``park_lock``."""
        if self.parked_task is None:
            return
        self.parked_task = None
        self._let_go()
        self.waking = False
        pipelined, self.held_requests = self.held_requests, []
        held, self.held_input = bytes(self.held_input), bytearray()
        if not self.connected or self.close_when_flushed:
            for behind in pipelined:
                behind.close()
            return
        if pipelined:
            with self.requests_lock:
                self.requests.extend(pipelined)
            self.server.add_task(self)
        if held:
            self.received(held)

    def wake(self) -> None:
        """Run the parked request again (from any thread)."""
        with self.park_lock:
            task = self.parked_task
            if task is None or self.waking or not self.connected:
                return
            self.waking = True
            cancel, self._cancel_watch = self._cancel_watch, None
            with self.requests_lock:
                self.requests.insert(0, task.request)
        if cancel is not None:
            cancel()
        self.server.add_task(self)

    def push(self, data: bytes, environ: Mapping[str, Any]) -> bool:
        """Append ``data`` to the parked streamed answer (from any thread),
        and change what its next run's environ says. The write happens in
        the event loop's thread: waitress sends a connection's output there
        without a lock while no task of it runs, so no other thread may add
        to it then. False, sending nothing, unless it is parked and
        streamed and its client is there; a client with more than
        MAX_PUSH_BACKLOG_BYTES waiting to be sent is woken instead, and its
        next run catches it up."""
        with self.park_lock:
            if not self._pushable():
                return False
        self._in_loop(partial(self._push_now, data, environ))
        return True

    def _in_loop(self, action: Callable[[], None]) -> None:
        """Run ``action`` in the event loop's thread, with every other action
        queued before the loop got to them: one wake-up of the loop (which
        looks at every connection) for a push to many streams."""
        actions: _LoopActions = self.server.__dict__.setdefault("segq_loop_actions", _LoopActions())
        if actions.add(action):
            self.server.trigger.pull_trigger(actions.run)

    def _pushable(self) -> bool:
        task = self.parked_task
        return not (
            task is None
            or self.waking
            or task.sent_status is None
            or task.environ is None
            or not self.connected
            or self.will_close
            or self.close_when_flushed
        )

    def _push_now(self, data: bytes, environ: Mapping[str, Any]) -> None:
        """``push``'s write, in the event loop's thread."""
        with self.park_lock:
            task = self.parked_task
            if not self._pushable():
                # Woken meanwhile (its run reads the environ as it was:
                # it sends this too), or gone.
                return
            assert task is not None
            assert task.environ is not None
            if self.total_outbufs_len <= MAX_PUSH_BACKLOG_BYTES:
                try:
                    task.write(data)
                except ClientDisconnected:
                    return
                task.environ.update(environ)
                self.last_activity = time.time()
                if self._keepalive is not None:
                    # A keepalive is for silence.
                    self.deadline = time.monotonic() + self._keepalive_seconds
                return
        self.wake()

    def end(self, data: bytes) -> bool:
        """End the parked streamed answer with ``data`` (from any thread):
        its task's next run sends it and finishes, without the app. Done in
        the event loop's thread, after what was pushed before it."""
        with self.park_lock:
            if not self._pushable():
                return False
        self._in_loop(partial(self._end_now, data))
        return True

    def _end_now(self, data: bytes) -> None:
        with self.park_lock:
            if not self._pushable():
                # A run is due or going on: it answers for itself.
                return
            self._ending = data
        self.wake()

    def take_ending(self) -> bytes | None:
        """What ``end`` left for the run starting now, once."""
        with self.park_lock:
            ending, self._ending = self._ending, None
            return ending

    def wake_if_due(self, now: float) -> None:
        """Called by the server's maintenance in the event loop."""
        if self.parked_task is None or self.waking:
            return
        if not self.connected:
            self._abandon()
        elif now >= self.deadline:
            if self._keepalives_left > 0 and self._send_keepalive():
                self._keepalives_left -= 1
                self.deadline = now + self._keepalive_seconds
            else:
                self.wake()
        else:
            self.last_activity = time.time()

    def _send_keepalive(self) -> bool:
        """Send the parking's keepalive, in the event loop's thread."""
        with self.park_lock:
            task = self.parked_task
            if (
                self._keepalive is None
                or task is None
                or not self._pushable()
                or self.total_outbufs_len > MAX_PUSH_BACKLOG_BYTES
            ):
                return False
            try:
                task.write(self._keepalive)
            except ClientDisconnected:
                return False
            self.last_activity = time.time()
            return True

    def _abandon(self) -> None:
        """The client left while its request was parked."""
        with self.park_lock:
            if self.parked_task is None or self.waking:
                return
            self.parked_task = None
            cancel, self._cancel_watch = self._cancel_watch, None
            self._let_go()
        if cancel is not None:
            cancel()
        self.handle_close()

    def _let_go(self) -> None:
        """Call the parked request's ``release``, once."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def handle_close(self) -> None:
        # However the connection ends (a failed write, the server's own
        # timeouts), a request parked on it is done with; one running
        # again now is let go of when its run ends (service).
        with self.park_lock:
            if self.parked_task is not None and not self.waking:
                self.parked_task = None
                cancel, self._cancel_watch = self._cancel_watch, None
                if cancel is not None:
                    cancel()
                self._let_go()
        super().handle_close()

    def received(self, data: bytes) -> bool:
        with self.park_lock:
            if self.parked_task is None:
                result: bool = super().received(data)
                return result
            if len(self.held_input) + len(data) > MAX_HELD_INPUT_BYTES:
                self.will_close = True
            else:
                self.held_input += data
            return True

    def readable(self) -> bool:
        if self.parked_task is not None and not self.waking:
            # Read while parked, to learn at once that the client has gone.
            return not (self.will_close or self.close_when_flushed or self.total_outbufs_len)
        readable: bool = super().readable()
        return readable

    def handle_read(self) -> None:
        super().handle_read()
        if not self.connected and self.parked_task is not None:
            self._abandon()
