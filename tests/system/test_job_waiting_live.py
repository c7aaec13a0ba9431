"""Waiting without polling against `segq serve` (waitress, where waiting
requests are parked in the event loop) and a `segq worker`: ``Prefer:
wait=N`` on a job's POST and GET, the job's server-sent event stream,
tenancy on both, and that waiting holds no thread and no database
connection. tests/api/test_job_waiting.py has the embedded app."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from celery import Celery
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from segq.projects import create_project
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.live_processes import (
    Worker,
    loopback_env,
    served_api,
)

pytestmark = pytest.mark.slow

#: Long, so that a live test that answers sooner was woken by the worker's
#: announcement, not by the re-check.
LIVE_RECHECK_SECONDS = 30


@dataclass(frozen=True)
class Live:
    url: str
    gate: Path
    log: Path
    storage_url: str

    def open_gate(self) -> None:
        self.gate.touch()

    def close_gate(self) -> None:
        self.gate.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def live(
    database_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    """`segq serve` (two processes of two threads each) and a GrabCut
    `segq worker` whose engine waits for a gate file before each item."""
    folder = tmp_path_factory.mktemp("waiting")
    settings = {"SEGQ_MODEL": "grabcut", "SEGQ_WAIT_RECHECK_SECONDS": str(LIVE_RECHECK_SECONDS)}
    env = loopback_env(folder, database_url, s3_endpoint, settings)
    gate = folder / "gate"
    worker = Worker({**env, "SEGQ_PROBE_GATE": str(gate)}, 1, folder / "worker.log")
    try:
        with served_api(env, folder, workers=2, threads=2) as served:
            yield Live(served.url, gate, served.log, env["SEGQ_STORAGE_URL"])
    finally:
        gate.touch()
        worker.stop()


@dataclass(frozen=True)
class Client:
    """A project on the live server, called with requests."""

    base: str
    headers: dict[str, str]

    def upload(self, seed: int = 0) -> int:
        answer = requests.post(
            f"{self.base}/files",
            files={"file": ("image.png", png_bytes(seed=seed))},
            headers=self.headers,
            timeout=10,
        )
        assert answer.status_code == 201, answer.text
        return int(answer.json()["id"])

    def job_body(self, images: int = 1) -> dict[str, Any]:
        ids = [self.upload(seed) for seed in range(images)]
        return {**scene_prompt_body(ids[0]), "items": [{"fileId": i} for i in ids]}

    def post(self, body: dict[str, Any], **headers: str) -> requests.Response:
        return requests.post(
            f"{self.base}/context/vision/segment",
            json=body,
            headers={**self.headers, **headers},
            timeout=90,
        )

    def get(self, path: str, **headers: str) -> requests.Response:
        return requests.get(
            f"{self.base}/context/vision/segment{path}",
            headers={**self.headers, **headers},
            timeout=90,
            # Event streams are read as they come.
            stream=path.endswith("/events"),
        )


def _client(live: Live, sessions: sessionmaker[Session], name: str) -> Client:
    with sessions.begin() as session:
        _, key = create_project(session, name)
    return Client(f"{live.url}/api/v1/projects/{name}", {"Authorization": f"Bearer {key}"})


@pytest.fixture
def acme(live: Live, sessions: sessionmaker[Session], celery_app: Celery) -> Iterator[Client]:
    """A project on an emptied database and Redis; the gate is closed, and
    opened at the end so the worker drains what the test left."""
    live.close_gate()
    yield _client(live, sessions, "acme")
    live.open_gate()


def _finish(live: Live, client: Client, job_id: int) -> dict[str, Any]:
    live.open_gate()
    answer = client.get(f"/{job_id}", Prefer="wait=30")
    assert answer.json()["status"] == "Completed", answer.text
    return dict(answer.json())


def test_prefer_wait_on_post_answers_the_finished_job(live: Live, acme: Client) -> None:
    body = acme.job_body()
    live.open_gate()
    started = time.monotonic()
    answer = acme.post(body, Prefer="wait=30")
    elapsed = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert job["status"] == "Completed"
    assert job["items"][0]["segments"][0]["mask"]["url"]
    assert answer.headers["Preference-Applied"] == "wait=30"
    assert answer.headers["Location"].endswith(f"/context/vision/segment/{job['jobId']}")
    assert "Retry-After" not in answer.headers
    # Woken by the worker's announcement, not by the 30 s re-check.
    assert elapsed < LIVE_RECHECK_SECONDS / 2


def test_prefer_wait_times_out_with_the_job_as_it_is(live: Live, acme: Client) -> None:
    body = acme.job_body()
    started = time.monotonic()
    answer = acme.post(body, Prefer="wait=2")
    elapsed = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] in ("Queued", "Running")
    assert answer.headers["Preference-Applied"] == "wait=2"
    assert answer.headers["Retry-After"] == "1"
    assert 2 <= elapsed < 5
    _finish(live, acme, answer.json()["jobId"])


def test_prefer_wait_on_get_wakes_when_the_job_finishes(live: Live, acme: Client) -> None:
    job_id = acme.post(acme.job_body()).json()["jobId"]
    opener = threading.Timer(1.5, live.open_gate)
    opener.start()
    started = time.monotonic()
    answer = acme.get(f"/{job_id}", Prefer="respond-async, wait=40")
    elapsed = time.monotonic() - started
    opener.join()
    assert answer.json()["status"] == "Completed", answer.text
    assert answer.headers["Preference-Applied"] == "wait=40"
    assert "Location" not in answer.headers
    assert 1.5 <= elapsed < LIVE_RECHECK_SECONDS / 2


def test_a_parked_get_answers_the_page_it_asked_for_and_304_to_its_tag(
    live: Live, acme: Client
) -> None:
    job_id = acme.post(acme.job_body(images=2)).json()["jobId"]
    answer = acme.get(f"/{job_id}?itemsLimit=1", Prefer="wait=1")
    assert answer.headers["Preference-Applied"] == "wait=1"
    page = answer.json()
    assert len(page["items"]) == 1 and page["nextItemsCursor"], page
    unchanged = acme.get(
        f"/{job_id}?itemsLimit=1", Prefer="wait=1", **{"If-None-Match": answer.headers["ETag"]}
    )
    assert unchanged.status_code == 304 and unchanged.content == b""
    _finish(live, acme, job_id)


def _read_events(response: requests.Response) -> list[dict[str, Any]]:
    """Every event of a stream, until the server ends it."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if "data" in current:
                events.append(current)
            current = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            current[field] = value
    return events


def test_event_stream_order_bodies_resume_and_end(
    live: Live, acme: Client, sessions: sessionmaker[Session]
) -> None:
    job_id = acme.post(acme.job_body(images=2)).json()["jobId"]
    # The first event (the job started) comes while the worker waits at the gate.
    with acme.get(f"/{job_id}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        lines = stream.iter_lines(decode_unicode=True)
        first = [next(lines) for _ in range(5)]
    assert first[0] == "retry: 2000"
    assert first[2:5] == ["id: 1", "event: job.started", first[4]]
    assert json.loads(first[4].removeprefix("data: "))["type"] == "job.started"
    live.open_gate()
    started = time.monotonic()
    with acme.get(f"/{job_id}/events", **{"Last-Event-ID": "1"}) as stream:
        events = _read_events(stream)
    assert time.monotonic() - started < LIVE_RECHECK_SECONDS / 2
    assert [(e["id"], e["event"]) for e in events] == [
        ("2", "item.completed"),
        ("3", "item.completed"),
        ("4", "job.completed"),
    ]
    bodies = [json.loads(e["data"]) for e in events]
    assert [b["type"] for b in bodies] == [e["event"] for e in events]
    first_item, second_item, end = bodies
    assert len(first_item["data"]["items"]) == 1
    assert first_item["data"]["progress"] == {"total": 2, "completed": 1, "failed": 0}
    assert second_item["data"]["progress"] == {"total": 2, "completed": 2, "failed": 0}
    assert end["data"]["status"] == "Completed"
    assert len(end["data"]["items"]) == 2
    for body in bodies:
        for item in body["data"]["items"]:
            mask = item["segments"][0]["mask"]
            assert "url" not in mask
            assert mask["format"] == "image/png"
    # A finished job's stream is all of it at once, then the end.
    with acme.get(f"/{job_id}/events", **{"Last-Event-ID": "3"}) as stream:
        assert [e["id"] for e in _read_events(stream)] == ["4"]


def test_waiting_and_streams_keep_tenancy(
    live: Live, acme: Client, sessions: sessionmaker[Session]
) -> None:
    globex = _client(live, sessions, "globex")
    job_id = acme.post(acme.job_body()).json()["jobId"]
    absent = job_id + 1000
    for path in (f"/{job_id}", f"/{job_id}/events"):
        theirs = globex.get(path, Prefer="wait=5")
        nothing = globex.get(path.replace(str(job_id), str(absent)), Prefer="wait=5")
        assert theirs.status_code == nothing.status_code == 404
        assert theirs.json()["error"]["message"] == f"job {job_id} not found"
        assert nothing.json()["error"]["message"] == f"job {absent} not found"
        unsigned = requests.get(f"{acme.base}/context/vision/segment{path}", timeout=10)
        assert unsigned.status_code == 401
        elsewhere = requests.get(
            f"{globex.base}/context/vision/segment{path}", headers=acme.headers, timeout=10
        )
        assert elsewhere.status_code == 403
    bad = acme.get(f"/{job_id}/events", **{"Last-Event-ID": "one"})
    assert bad.status_code == 400
    assert "Last-Event-ID" in bad.json()["error"]["message"]
    _finish(live, acme, job_id)


def _send_raw(url: str, path: str, headers: dict[str, str]) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return connection


def _read_raw_answer(connection: socket.socket) -> bytes:
    received = b""
    with connection:
        while b"\r\n\r\n" not in received:
            chunk = connection.recv(65536)
            assert chunk, received
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        while len(body) < length:
            body += connection.recv(65536)
    return body


def test_a_request_pipelined_behind_a_waiting_one_is_answered_after_it(
    live: Live, acme: Client
) -> None:
    job_id = acme.post(acme.job_body()).json()["jobId"]
    host, port = live.url.removeprefix("http://").split(":")
    auth = acme.headers["Authorization"]
    path = f"/api/v1/projects/acme/context/vision/segment/{job_id}"
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nPrefer: wait=2\r\n\r\n"
            f"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    first, second = received.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and b"Preference-Applied: wait=2" in first
    assert b'"status":"Queued"' in first.replace(b" ", b"") or b'"Running"' in first
    assert second.startswith(b"200")
    assert b"segment" not in second
    _finish(live, acme, job_id)


def _server_connections(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(
            session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            or 0
        )


def test_waiting_requests_hold_no_thread_and_no_connection(
    live: Live, acme: Client, sessions: sessionmaker[Session]
) -> None:
    """Two processes of two threads: 50 requests waiting on a job (and 10
    event streams) leave every thread free for a plain GET, and hold no
    database connection."""
    job_id = acme.post(acme.job_body()).json()["jobId"]
    path = f"/api/v1/projects/acme/context/vision/segment/{job_id}"
    baseline_connections = _server_connections(sessions)
    waiting = [_send_raw(live.url, path, {**acme.headers, "Prefer": "wait=40"}) for _ in range(50)]
    streams = [_send_raw(live.url, f"{path}/events", acme.headers) for _ in range(10)]
    time.sleep(1.5)
    for _ in range(10):
        started = time.monotonic()
        plain = requests.get(f"{live.url}{path}", headers=acme.headers, timeout=5)
        assert plain.status_code == 200
        assert plain.json()["status"] in ("Queued", "Running")
        assert time.monotonic() - started < 1.0
    # Each process's pool may keep the connections its threads and its feed
    # used, never one per waiting request.
    assert _server_connections(sessions) <= baseline_connections + 6
    live.open_gate()
    for connection in waiting:
        answer = json.loads(_read_raw_answer(connection))
        assert answer["status"] == "Completed"
    for connection in streams:
        with connection:
            received = b""
            while b"0\r\n\r\n" not in received[-16:]:
                chunk = connection.recv(65536)
                assert chunk, received
                received += chunk
        assert b"event: job.completed" in received
