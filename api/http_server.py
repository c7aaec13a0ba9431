"""Serving the API over HTTP: gunicorn's processes, each running waitress.

gunicorn forks the processes (``--workers``), watches them and replaces any
that dies; the app is built in each process after the fork. Inside each
process waitress serves HTTP: its event loop reads every request whole,
headers and body (spooled to a temporary file past 512 KiB), before one of
its threads (``--threads``) runs the app. A slow or stalled client therefore
holds a connection, not a thread, unlike gunicorn's own sync and gthread
workers, whose threads read the body while the app waits for it.

What is added here goes through waitress's own extension points:

- waitress closes a connection only after ``channel_timeout`` seconds
  without a byte, so a client that drips one byte a second keeps its
  request open for ever. ``DeadlineServer`` gives each request a deadline
  for arriving whole, counted from its first byte, and answers 408 when it
  passes.
- a request that waits (``Prefer: wait``, an event stream) is parked in
  the event loop between runs of the app, holding no thread
  (api/parking.py); the maintenance below wakes those whose deadline came
  and drops those whose client left.
- a chunked body is refused (413) once its chunks declare more than the
  body bound, not once that much has arrived (``DeclaredSizeParser``).
- the answers waitress gives itself (a malformed request line or header,
  headers over ``MAX_HEADER_BYTES``, a body over the app's bound, the
  deadline) carry segq's error envelope and an ``X-Request-Id``, as the
  app's own errors do.
- a process told to stop (SIGTERM: a reload, a scale-down, a pod's end)
  drains before it exits (``WaitressWorker._drain``): it stops accepting
  (the listening socket stays open in gunicorn's other processes, so
  connections waiting in the backlog go to them), closes its idle
  keep-alive connections at once, answers every request it has begun to
  read, and a parked one, with ``Connection: close``, and exits once no
  connection is left, or when the grace period
  (``SEGQ_SHUTDOWN_GRACE_SECONDS``) runs out. Closing a connection in
  the middle of a request is what a client sees as a reset.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
import uuid
from dataclasses import replace
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.workers.base import Worker
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import Error, RequestEntityTooLarge, ServerNotImplemented

from segq.api.app import create_app, max_request_bytes
from segq.api.parking import DRAINING_ENVIRON_KEY, ParkingChannel, ParkingTask
from segq.api.response_policies import DATA_POLICY, NOSNIFF
from segq.logs import configure_logging
from segq.settings import Settings

#: The request line and headers together. A request that needs more is not
#: one of segq's (keys and ids are short).
MAX_HEADER_BYTES = 64 * 1024
#: How often the deadlines are checked, so a request is cut off at most this
#: long after its deadline.
DEADLINE_CHECK_SECONDS = 1
#: Descriptors beyond one per connection: listening sockets, the event
#: loop's wake-up pipe, bodies spooled to files, database and Redis pools.
SPARE_DESCRIPTORS = 256
#: How long the event loop waits for a socket before it tells gunicorn's
#: arbiter that the process is alive.
LOOP_SECONDS = 1.0
#: While draining, how long a connection accepted just before may stay
#: silent: its request is most likely on its way.
SILENT_CONNECTION_SECONDS = 2.0
#: The drain ends this long before gunicorn's graceful timeout, at which the
#: arbiter kills the process, so the last answers are flushed first.
DRAIN_MARGIN_SECONDS = 1.0

# waitress and gunicorn ship no type information, so their classes are Any to
# mypy and each subclass below says it knows.


class RequestTimeout(Error):  # type: ignore[misc]
    code = 408
    reason = "Request Timeout"


class EnvelopeErrorTask(ErrorTask):  # type: ignore[misc]
    """The answers waitress gives itself, in segq's error envelope."""

    def execute(self) -> None:
        error = self.request.error
        code, reason = error.code, error.reason
        if isinstance(error, ServerNotImplemented):
            # A Transfer-Encoding other than chunked: the client's request
            # is what segq refuses, and segq answers no request with a 5xx.
            code, reason = 400, "Bad Request"
        body = json.dumps({"error": {"code": code, "message": f"{reason}: {error.body}"}}).encode()
        self.status = f"{code} {reason}"
        self.response_headers.extend(
            [
                ("Content-Type", "application/json"),
                ("X-Request-Id", uuid.uuid4().hex),
                # What the app adds to its own answers (api/response_policies.py).
                ("X-Content-Type-Options", NOSNIFF),
                ("Content-Security-Policy", DATA_POLICY),
            ]
        )
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class DeclaredSizeParser(HTTPRequestParser):  # type: ignore[misc]
    """waitress's request parser, refusing a chunked body as soon as its
    chunks declare more than the body bound, as a Content-Length over it
    is refused. waitress counts the bytes that have arrived only, so a
    client declaring a chunk past the bound and sending it slowly (or not
    at all) held its connection until the deadline, for a 408."""

    # waitress's attributes this class reads, for mypy.
    completed: bool
    chunked: bool

    def received(self, data: bytes) -> int:
        consumed: int = super().received(data)
        body = self.body_rcv
        if self.chunked and not self.completed and body is not None:
            # What the body holds, and what its current chunk still promises.
            declared = len(body) + body.chunk_remainder
            limit = self.adj.max_request_body_size
            if declared >= limit:
                self.error = RequestEntityTooLarge(
                    f"a chunk declares a body of {declared} bytes or more; "
                    f"exceeds max_body of {limit}"
                )
                self.completed = True
        return consumed


class DrainingTask(ParkingTask):
    """A request's task that, once its process drains, closes the
    connection after the answer and tells the app to answer now."""

    def get_environment(self) -> dict[str, Any]:
        environ = super().get_environment()
        if self.channel.server.draining:
            environ[DRAINING_ENVIRON_KEY] = True
        return environ

    def build_response_header(self) -> bytes:
        if self.channel.server.draining:
            self.set_close_on_finish()
        header: bytes = super().build_response_header()
        return header


class DeadlineChannel(ParkingChannel):
    """A connection that remembers when the request it is reading began,
    and whose request may be parked while it waits."""

    error_task_class = EnvelopeErrorTask
    parser_class = DeclaredSizeParser
    request_started = 0.0
    #: Requests whose first byte came on this connection.
    requests_begun = 0

    def task_class(self, channel: ParkingChannel, request: Any) -> ParkingTask:
        return self.parked_task or DrainingTask(channel, request)

    def received(self, data: bytes) -> bool:
        # waitress makes a new parser for each request; a parser that was
        # not there before this data is a request whose first byte is in it.
        before = self.request
        now = time.monotonic()
        result: bool = super().received(data)
        if self.request is not None and self.request is not before:
            self.request_started = now
            self.requests_begun += 1
        return result

    def idle(self) -> bool:
        """No request read in part, queued, running, parked or being sent,
        and none arrived but not yet read."""
        if (
            self.request is not None
            or self.requests
            or self.total_outbufs_len
            or self.parked_task is not None
        ):
            return False
        # Closing a socket with unread bytes resets the connection: bytes
        # waiting are a request the event loop reads next, and answers.
        try:
            waiting = self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return True  # already broken: nothing to answer
        return not waiting


class DeadlineServer(TcpWSGIServer):  # type: ignore[misc]
    """waitress's TCP server, cutting off requests that do not arrive whole
    within ``deadline_seconds`` of their first byte."""

    channel_class = DeadlineChannel
    deadline_seconds = 120
    #: Set when the process begins to drain before it exits.
    draining = False

    def maintenance(self, now: int) -> None:
        monotonic_now = time.monotonic()
        cutoff = monotonic_now - self.deadline_seconds
        for channel in list(self.active_channels.values()):
            if isinstance(channel, DeadlineChannel):
                self._enforce_deadline(channel, cutoff)
                channel.wake_if_due(monotonic_now)
        # After the deadlines: waitress's own check closes idle connections
        # at once, and a stalled request is idle too, but it gets its 408.
        super().maintenance(now)

    def _enforce_deadline(self, channel: DeadlineChannel, cutoff: float) -> None:
        with channel.requests_lock:
            request = channel.request
            # A channel with requests queued is waiting for the app, not the client.
            if request is None or channel.requests or channel.request_started > cutoff:
                return
            # Completed with an error, the request takes the path waitress
            # gives a malformed one: a thread answers it, then the
            # connection closes and the buffered part of the body goes.
            request.error = RequestTimeout(
                f"the request did not arrive whole within {self.deadline_seconds} seconds"
            )
            request.completed = True
            channel.request = None
            channel.requests.append(request)
        self.add_task(channel)


class WaitressWorker(Worker):  # type: ignore[misc]
    """A gunicorn worker process that serves its listening sockets with
    waitress: gunicorn's ``threads`` are waitress's threads and its
    ``worker_connections`` bounds the open connections of this process."""

    def run(self) -> None:
        settings = Settings.from_env()
        _allow_descriptors(self.cfg.worker_connections + SPARE_DESCRIPTORS)
        adjustments = Adjustments(
            threads=self.cfg.threads,
            connection_limit=self.cfg.worker_connections,
            backlog=self.cfg.backlog,
            # Idle connections (no request under way) close after as long.
            channel_timeout=settings.request_deadline_seconds,
            cleanup_interval=DEADLINE_CHECK_SECONDS,
            max_request_header_size=MAX_HEADER_BYTES,
            # waitress refuses a body of this size or more; the app's bound
            # (Flask's MAX_CONTENT_LENGTH) is inclusive.
            max_request_body_size=max_request_bytes(settings) + 1,
            # select() cannot watch descriptors past 1024.
            asyncore_use_poll=True,
            ident="segq",
        )
        socket_map: dict[int, Any] = {}
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(adjustments.threads)
        servers = []
        for listener in self.sockets:
            sock = listener.sock
            server = DeadlineServer(
                self.wsgi,
                socket_map,
                _sock=sock,
                dispatcher=dispatcher,
                adj=adjustments,
                sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()),
                bind_socket=False,
            )
            server.deadline_seconds = settings.request_deadline_seconds
            servers.append(server)
        while self.alive and self.ppid == os.getppid():
            self.notify()
            wasyncore.loop(timeout=LOOP_SECONDS, use_poll=True, map=socket_map, count=1)
        self._drain(servers, socket_map)
        dispatcher.shutdown()

    def _drain(self, servers: list[DeadlineServer], socket_map: dict[int, Any]) -> None:
        """Stop accepting and close every connection without losing a
        request: idle keep-alive ones at once, the others once answered
        (with ``Connection: close``), within the grace period."""
        started = time.monotonic()
        give_up = started + max(0.0, self.cfg.graceful_timeout - DRAIN_MARGIN_SECONDS)
        for server in servers:
            server.accepting = False
            server.draining = True
            for channel in list(server.active_channels.values()):
                # A parked request runs again now and answers (the app sees
                # the server draining), rather than wait out its deadline.
                channel.wake()
        while time.monotonic() < give_up:
            open_connections = 0
            for server in servers:
                for channel in list(server.active_channels.values()):
                    open_connections += 1
                    if channel.idle() and (
                        channel.requests_begun
                        or time.monotonic() - started > SILENT_CONNECTION_SECONDS
                    ):
                        channel.handle_close()
            if not open_connections:
                return
            self.notify()
            wasyncore.loop(timeout=0.05, use_poll=True, map=socket_map, count=1)


def _allow_descriptors(needed: int) -> None:
    """Raise this process's open-file limit to ``needed`` where the hard
    limit allows: the usual soft limit, 1024, is fewer than the default
    connection bound, and accept() fails past it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        ceiling = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, ceiling), hard))


def settings_for_bind_address(settings: Settings, host: str, port: int) -> Settings:
    """Without SEGQ_PUBLIC_URL, links to local-disk objects name the address
    the API is bound to; a wildcard bind names no address clients can use,
    so links then stay relative to the API's root."""
    if settings.public_url is not None or host in ("0.0.0.0", "::", ""):  # noqa: S104
        return settings
    shown = f"[{host}]" if ":" in host else host
    return replace(settings, public_url=f"http://{shown}:{port}")


def serve(*, host: str, port: int, workers: int, threads: int, connections: int) -> None:
    """Run the API on ``host:port`` until the process is told to stop."""
    shutdown_grace_seconds = Settings.from_env().shutdown_grace_seconds

    class Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", threads)
            self.cfg.set("worker_connections", connections)
            self.cfg.set("worker_class", WaitressWorker)
            # How long a stopping process may drain before the arbiter kills it.
            self.cfg.set("graceful_timeout", shutdown_grace_seconds)
            # Its one default path would be shared by every segq serve on the
            # machine (tests, the demo, the bench); segq does not use it.
            self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            # Built in each process, after the fork.
            settings = settings_for_bind_address(Settings.from_env(), host, port)
            if settings.log_format is not None:
                configure_logging(settings.log_format, level=logging.INFO)
            return create_app(settings, request_threads=threads)

    Application().run()
