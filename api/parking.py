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

Where the app runs without this server (Flask's test client, a WSGI server
of another kind), ``park`` returns False and the view waits in its thread.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import request
from waitress.channel import HTTPChannel
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

#: Watch(on_change) -> cancel: arranges one call of on_change when the
#: request may have something new to answer.
Watch = Callable[[Callable[[], None]], Callable[[], None]]


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


class ParkingChannel(HTTPChannel):  # type: ignore[misc]
    """A connection whose request may be parked between runs of the app."""

    #: The task of the parked request: set from its first parking until it
    #: is answered, including while it runs again.
    parked_task: ParkingTask | None = None
    #: Set while the parked request is queued or running again.
    waking = False
    deadline = 0.0
    _cancel_watch: Callable[[], None] | None = None

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
            self.deadline = parking.deadline
            # Renewed while parked: waitress closes connections idle for
            # its channel_timeout, and a parked one is not idle.
            self.last_activity = time.time()
            self.waking = False
        # Watched only now: a wake-up before waitress has taken the request
        # off its queue (in super().service()) would put it back too early.
        cancel = parking.watch(self.wake)
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

    def wake_if_due(self, now: float) -> None:
        """Called by the server's maintenance in the event loop."""
        if self.parked_task is None or self.waking:
            return
        if not self.connected:
            self._abandon()
        elif now >= self.deadline:
            self.wake()
        else:
            self.last_activity = time.time()

    def _abandon(self) -> None:
        """The client left while its request was parked."""
        with self.park_lock:
            if self.parked_task is None or self.waking:
                return
            self.parked_task = None
            cancel, self._cancel_watch = self._cancel_watch, None
        if cancel is not None:
            cancel()
        self.handle_close()

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
