"""The real HTTP server (`segq serve`) on loopback, spoken to over raw
sockets: slow and stalled clients, and the requests the server refuses
itself before the app sees them."""

from __future__ import annotations

import contextlib
import io
import json
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import max_request_bytes
from segq.api.json_body import max_job_body_bytes
from segq.projects import create_project
from segq.settings import Settings
from tests.support.database import count_files, count_jobs
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.live_processes import (
    ServedApi,
    loopback_env,
    served_api,
)
from tests.support.refusals import MALFORMED_JSON_BODIES

#: Short, so the test sees slow clients cut off; production's is 120 s.
DEADLINE_SECONDS = 4
#: The largest upload the server under test takes; bodies up to this plus
#: the multipart overhead reach the app, larger ones are refused by waitress.
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
#: The app's own bound on JSON bodies (api/json_body.py).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(
    database_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedApi]:
    """`segq serve` with two processes, as deployed, on Postgres, Redis and moto."""
    folder = tmp_path_factory.mktemp("serve")
    settings = {
        "SEGQ_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "SEGQ_REQUEST_DEADLINE_SECONDS": str(DEADLINE_SECONDS),
    }
    env = loopback_env(folder, database_url, s3_endpoint, settings)
    with served_api(env, folder, workers=2) as served:
        yield served


@dataclass(frozen=True)
class Key:
    project: str
    headers: dict[str, str]


@pytest.fixture
def key(sessions: sessionmaker[Session], celery_app: Any) -> Key:
    """A project in the emptied database (and an emptied Redis database,
    where the server publishes)."""
    with sessions.begin() as session:
        _, secret = create_project(session, "acme")
    return Key("acme", {"Authorization": f"Bearer {secret}"})


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def envelope(self) -> dict[str, Any]:
        """The error envelope, checked: JSON, its code the status, a message,
        the request's id, and never sniffed as anything else."""
        assert self.headers.get("content-type") == "application/json", self
        assert self.headers.get("x-content-type-options") == "nosniff", self
        assert "default-src 'none'" in self.headers.get("content-security-policy", ""), self
        error: dict[str, Any] = json.loads(self.body)["error"]
        assert error["code"] == self.status, self
        assert isinstance(error["message"], str) and error["message"], self
        assert len(self.headers.get("x-request-id", "")) >= 16, self
        return error


def parse_answer(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    return Answer(int(status_line.split(" ")[1]), headers, body[:length])


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or resets) the
    connection, or 15 s pass."""
    sock.settimeout(15)
    received = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def exchange(server: ServedApi, head: bytes, body: bytes = b"", *, chunked: bool = False) -> Answer:
    """One request written as given. The server may answer and close before
    the body is all sent; sending then stops and the answer is read."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
            if chunked:
                for start in range(0, len(body), 65536):
                    piece = body[start : start + 65536]
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sock.sendall(b"0\r\n\r\n")
            else:
                sock.sendall(body)
        raw = read_answer(sock)
    assert raw, f"no answer; server log:\n{server.log.read_text()[-3000:]}"
    return parse_answer(raw)


def request_head(
    method: str,
    path: str,
    headers: dict[str, str],
    *,
    length: int | None = None,
    extra: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    return "\r\n".join(lines).encode() + b"\r\n" + extra + b"\r\n"


def test_slow_clients_hold_connections_not_the_api(server: ServedApi, key: Key) -> None:
    """200 connections that send headers and then stall or drip their body
    one byte every two seconds: the API answers within a second meanwhile,
    and the server cuts each of them off at the request deadline."""
    base = f"{server.url}/api/v1/projects/{key.project}"
    uploaded = requests.post(
        f"{base}/files", files={"file": ("a.png", png_bytes())}, headers=key.headers, timeout=10
    )
    assert uploaded.status_code == 201, uploaded.text
    file_id = uploaded.json()["id"]

    # No key needed: the body never arrives, so the app never sees them.
    head = request_head("POST", f"/api/v1/projects/{key.project}/files", {}, length=10_000)
    stalled: list[socket.socket] = []
    dripping: list[socket.socket] = []
    opened = time.monotonic()
    for index in range(200):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(head + b"x")
        (dripping if index % 2 else stalled).append(sock)
    stop_dripping = threading.Event()
    drips_refused: list[float] = []

    def drip() -> None:
        # Bounded: at most 15 rounds, one byte per connection every 2 s.
        for _ in range(15):
            for sock in dripping:
                try:
                    sock.send(b"x")
                except OSError:
                    drips_refused.append(time.monotonic() - opened)
            if stop_dripping.wait(2):
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        time.sleep(0.5)

        def timed(method: str, url: str, **kwargs: Any) -> requests.Response:
            started = time.monotonic()
            response = requests.request(method, url, timeout=5, **kwargs)
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, f"{method} {url} took {elapsed:.2f} s"
            return response

        assert timed("GET", f"{server.url}/healthz").status_code == 200
        created = timed(
            "POST",
            f"{base}/context/vision/segment",
            json=scene_prompt_body(file_id),
            headers=key.headers,
        )
        assert created.status_code == 200, created.text
        job = timed(
            "GET", f"{base}/context/vision/segment/{created.json()['jobId']}", headers=key.headers
        )
        assert job.status_code == 200 and job.json()["status"] == "Queued", job.text
        assert time.monotonic() - opened < DEADLINE_SECONDS - 1, "too slow to test the deadline"

        # Every one of the 200 is cut off by the deadline (checked each
        # second), neither before it nor long after.
        closed = wait_closed([*stalled, *dripping], opened, limit=DEADLINE_SECONDS + 10)
    finally:
        stop_dripping.set()
        dripper.join(timeout=5)
        for sock in [*stalled, *dripping]:
            sock.close()
    assert len(closed) == 200, f"{200 - len(closed)} connections still open"
    times = sorted(at for at, _ in closed.values())
    assert times[0] >= DEADLINE_SECONDS - 0.5, times[:5]
    assert times[-1] <= DEADLINE_SECONDS + 3, times[-5:]
    assert not drips_refused, drips_refused[:5]
    # The stalled ones, with nothing left unread, are told why.
    for sock in stalled:
        answer = parse_answer(closed[sock][1])
        assert answer.status == 408, answer
        assert "within 4 seconds" in answer.envelope()["message"]
    # The server still serves.
    assert requests.get(f"{server.url}/healthz", timeout=1).status_code == 200


def wait_closed(
    sockets: list[socket.socket], since: float, *, limit: float
) -> dict[socket.socket, tuple[float, bytes]]:
    """For each connection the server closed (or reset) within ``limit``
    seconds of ``since``: when, in seconds after ``since``, and what it sent."""
    received = {sock: b"" for sock in sockets}
    closed: dict[socket.socket, tuple[float, bytes]] = {}
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, data=sock)
        while len(closed) < len(sockets) and time.monotonic() - since < limit:
            for selected, _ in selector.select(timeout=0.5):
                sock = selected.data
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                received[sock] += chunk
                if not chunk:
                    closed[sock] = (time.monotonic() - since, received[sock])
                    selector.unregister(sock)
    return closed


#: Requests that waitress refuses before the app sees them, and the status
#: each gets (in the envelope). Bad bytes are refused by RFC 9110's field
#: grammar; obs-text (bytes 0x80-0xFF) is allowed there and reaches the app.
REFUSED_BY_THE_SERVER = {
    "header-too-large": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        431,
    ),
    "too-many-headers": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-Header-%d: v\r\n" % n for n in range(5000))
        + b"\r\n",
        431,
    ),
    "request-line-too-long": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 431),
    "nul-in-a-header": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Id: a\x00b\r\n\r\n", 400),
    "control-byte-in-a-header": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Id: a\x01b\r\n\r\n", 400),
    "space-in-a-header-name": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX Id: ab\r\n\r\n", 400),
    "bare-lf-in-a-header": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Id: a\nb\r\n\r\n", 400),
    "not-http": (b"HELLO\r\n\r\n", 400),
    "unknown-transfer-coding": (
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
    ),
    "body-declared-too-large": (
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999\r\n\r\n",
        413,
    ),
}


@pytest.mark.parametrize(
    ("raw", "status"), REFUSED_BY_THE_SERVER.values(), ids=REFUSED_BY_THE_SERVER.keys()
)
def test_the_servers_own_refusals_use_the_envelope(
    server: ServedApi, raw: bytes, status: int
) -> None:
    answer = exchange(server, raw)
    assert answer.status == status, answer
    answer.envelope()


def test_high_bytes_in_a_header_reach_the_app(server: ServedApi) -> None:
    answer = exchange(
        server, b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Id: caf\xe9\r\nConnection: close\r\n\r\n"
    )
    assert answer.status == 200, answer


def jpeg_noise(size_bytes: int) -> bytes:
    """A valid image larger than ``size_bytes``: noise does not compress."""
    side = int(size_bytes**0.5) + 64
    buffer = io.BytesIO()
    Image.effect_noise((side, side), 100).convert("RGB").save(buffer, "JPEG", quality=100)
    assert len(buffer.getvalue()) > size_bytes
    return buffer.getvalue()


def multipart(image: bytes, boundary: str = "segqboundary") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_upload_is_413_and_stores_nothing(
    server: ServedApi, key: Key, sessions: sessionmaker[Session], chunked: bool
) -> None:
    body = multipart(jpeg_noise(MAX_UPLOAD_BYTES + 100 * 1024))
    headers = {**key.headers, "Content-Type": "multipart/form-data; boundary=segqboundary"}
    path = f"/api/v1/projects/{key.project}/files"
    head = request_head("POST", path, headers, length=None if chunked else len(body))
    answer = exchange(server, head, body, chunked=chunked)
    assert answer.status == 413, answer
    answer.envelope()
    assert count_files(sessions) == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_json_is_413_and_stores_nothing(
    server: ServedApi, key: Key, sessions: sessionmaker[Session], chunked: bool
) -> None:
    headers = {**key.headers, "Content-Type": "application/json"}
    path = f"/api/v1/projects/{key.project}/context/vision/segment"
    job_limit = max_job_body_bytes(MAX_UPLOAD_BYTES)

    def send(pad: int) -> Answer:
        body = json.dumps(
            {"items": [{"fileId": 1}], "points": [{"x": 0.5, "y": 0.5}], "pad": "x" * pad}
        ).encode()
        head = request_head("POST", path, headers, length=None if chunked else len(body))
        return exchange(server, head, body, chunked=chunked)

    # Over an upload's bound but within a job body's (it may hold an inline
    # image as large as an upload): the app reads it, and refuses the field.
    within = send(MAX_UPLOAD_BYTES + 1024)
    assert within.status == 400, within
    assert "pad" in within.envelope()["message"]
    # Over a job body's bound: refused, by the server or the app, in the envelope.
    over = send(job_limit + 1024)
    assert over.status == 413, over
    assert over.envelope()["code"] == 413
    assert count_jobs(sessions) == (0, 0)


#: The server's bound on bodies (segq.api.app.max_request_bytes), for the server under test.
MAX_REQUEST_BYTES = max_request_bytes(
    Settings.from_env({"SEGQ_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES)})
)


@pytest.mark.parametrize(
    "sizes",
    [[MAX_REQUEST_BYTES + 1], [1024, MAX_REQUEST_BYTES + 1 - 1024], [0xFFFFFFFFFFFF]],
    ids=["first-chunk", "a-later-chunk", "huge"],
)
def test_a_chunk_declared_past_the_body_bound_is_413_at_once(
    server: ServedApi, key: Key, sessions: sessionmaker[Session], sizes: list[int]
) -> None:
    """As a Content-Length past the bound is: refused on the declaration,
    without waiting for bytes the client may never send (which took the
    request deadline, then a 408)."""
    headers = {**key.headers, "Content-Type": "application/json"}
    head = request_head("POST", f"/api/v1/projects/{key.project}/files", headers)
    # Every chunk but the last sent whole; the last only declared and begun.
    body = b"".join(b"%x\r\n%s\r\n" % (size, b"x" * size) for size in sizes[:-1])
    body += b"%x\r\n{" % sizes[-1]
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sent = time.monotonic()
        sock.sendall(head + body)
        raw = read_answer(sock)
        # An upper bound only, far under the deadline the server would wait.
        assert time.monotonic() - sent < DEADLINE_SECONDS
    answer = parse_answer(raw)
    assert answer.status == 413, answer
    answer.envelope()
    assert count_files(sessions) == 0


@pytest.mark.parametrize("raw", MALFORMED_JSON_BODIES.values(), ids=MALFORMED_JSON_BODIES.keys())
def test_malformed_json_is_400_and_stores_nothing(
    server: ServedApi, key: Key, sessions: sessionmaker[Session], raw: bytes
) -> None:
    headers = {**key.headers, "Content-Type": "application/json"}
    path = f"/api/v1/projects/{key.project}/context/vision/segment"
    answer = exchange(server, request_head("POST", path, headers, length=len(raw)), raw)
    assert answer.status == 400, answer
    answer.envelope()
    assert count_jobs(sessions) == (0, 0)
