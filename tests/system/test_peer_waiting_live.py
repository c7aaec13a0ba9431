"""The peers' synchronous routes against `segq serve` (one process, where a
waiting call is parked in the event loop) and a `segq worker`, with
Livepeer's and Moondream's own clients (livepeer-ai, moondream): many
concurrent calls each answered with one job, a call repeated by the SDK's
retry getting the first call's job, and a call refused for a full park
(SEGQ_MAX_WAITING_REQUESTS) leaving no job. The worker's engine waits for
a gate file, so a test decides when jobs may finish."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import moondream as md
import pytest
import requests
from celery import Celery
from livepeer_ai import Livepeer
from livepeer_ai.models import errors
from livepeer_ai.utils import BackoffStrategy, RetryConfig
from moondream.types import Base64EncodedImage
from sqlalchemy.orm import Session, sessionmaker

from segq.projects import create_project
from tests.support.harness import (
    REDIS_URL,
    REPO,
    TEST_BUCKET,
    Worker,
    count_jobs,
    free_port,
    stop_process,
    wait_until_healthy,
)
from tests.support.images import png_bytes

pytestmark = pytest.mark.slow

#: Small images: GrabCut answers each in a few milliseconds.
WIDTH, HEIGHT = 64, 48
PNG = png_bytes(WIDTH, HEIGHT)
CONCURRENT_CALLS = 50
#: The tight server's bounds: two waiting calls, each for at most this long.
TIGHT_PLACES = 2
TIGHT_PEER_WAIT_SECONDS = 4
SERVE = [sys.executable, "-m", "segq.cli.main", "serve", "--workers", "1", "--threads", "4"]


@dataclass(frozen=True)
class Servers:
    #: `segq serve` with its default settings.
    roomy: str
    #: `segq serve` with SEGQ_MAX_WAITING_REQUESTS=2, SEGQ_PEER_WAIT_SECONDS=4.
    tight: str
    gate: Path

    def open_gate(self) -> None:
        self.gate.touch()

    def close_gate(self) -> None:
        self.gate.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def servers(
    database_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    """Two one-process `segq serve`s on one database, and a GrabCut
    `segq worker` whose engine waits for a gate file before each item."""
    folder = tmp_path_factory.mktemp("peer-waiting")
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("SEGQ_")},
        "PYTHONPATH": str(REPO),
        "SEGQ_DATA_DIR": str(folder / "data"),
        "SEGQ_DATABASE_URL": database_url,
        "SEGQ_BROKER_URL": REDIS_URL,
        "SEGQ_STORAGE_URL": f"s3://{TEST_BUCKET}/peer-waiting-{uuid.uuid4().hex[:8]}",
        "SEGQ_S3_ENDPOINT_URL": s3_endpoint,
        "SEGQ_MODEL": "grabcut",
    }
    tight_env = {
        **env,
        "SEGQ_MAX_WAITING_REQUESTS": str(TIGHT_PLACES),
        "SEGQ_PEER_WAIT_SECONDS": str(TIGHT_PEER_WAIT_SECONDS),
    }
    gate = folder / "gate"
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    for name, server_env in (("roomy", env), ("tight", tight_env)):
        port = free_port()
        log = folder / f"{name}.log"
        with log.open("ab") as output:
            process = subprocess.Popen(
                [*SERVE, "--port", str(port)],
                env=server_env,
                cwd=REPO,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        started.append((f"http://127.0.0.1:{port}", process, log))
    worker = Worker({**env, "SEGQ_PROBE_GATE": str(gate)}, 2, folder / "worker.log")
    try:
        for url, process, log in started:
            wait_until_healthy(url, process, log)
        yield Servers(started[0][0], started[1][0], gate)
    finally:
        gate.touch()
        worker.stop()
        for _, process, _ in started:
            stop_process(process)


@pytest.fixture
def key(servers: Servers, sessions: sessionmaker[Session], celery_app: Celery) -> Iterator[str]:
    """A project's key on an emptied database and Redis; the gate is closed,
    and opened at the end so the worker drains what the test left."""
    servers.close_gate()
    with sessions.begin() as session:
        _, project_key = create_project(session, "acme")
    yield project_key
    servers.open_gate()


class LivepeerCaller:
    """segment_anything2 calls with the SDK, as its users make them; every
    HTTP status the SDK received, in order."""

    def __init__(self, base_url: str, key: str, *, retries: RetryConfig | None = None) -> None:
        self.statuses: list[int] = []
        self._lock = threading.Lock()
        self._base_url = base_url
        self._key = key
        self._retries = retries

    def _heard(self, answer: httpx.Response) -> None:
        with self._lock:
            self.statuses.append(answer.status_code)

    def call(self, box: list[int], *, timeout_ms: int = 60_000) -> Any:
        http = httpx.Client(event_hooks={"response": [self._heard]})
        extra: dict[str, Any] = {} if self._retries is None else {"retry_config": self._retries}
        with Livepeer(
            http_bearer=self._key,
            server_url=self._base_url,
            timeout_ms=timeout_ms,
            client=http,
            **extra,
        ) as lp:
            request = {
                "image": {"file_name": "scene.png", "content": PNG},
                "box": json.dumps(box),
                "multimask_output": False,
            }
            return lp.generate.segment_anything2(request=request).masks_response


def box_of_call(index: int) -> list[int]:
    """A box around the scene's ellipse, one pixel apart per call: every
    call asks for a job of its own."""
    return [8 + index % 10, 6 + index // 10, 56, 42]


def in_threads(count: int, call: Callable[[int], Any]) -> tuple[list[Any], list[threading.Thread]]:
    """Start ``call(i)`` for each i in threads; its results (or the exception
    it raised) land in the returned list once the threads are joined."""
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            results[index] = call(index)
        except Exception as exc:  # kept for the test's assertion
            results[index] = exc

    threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(count)]
    for thread in threads:
        thread.start()
    return results, threads


def wait_for_jobs(sessions: sessionmaker[Session], count: int, timeout: float = 30) -> None:
    give_up = time.monotonic() + timeout
    while count_jobs(sessions)[0] < count:
        assert time.monotonic() < give_up, count_jobs(sessions)
        time.sleep(0.05)


def assert_mask_answer(answer: Any) -> None:
    masks = json.loads(answer.masks)
    assert len(masks) == 1
    assert len(masks[0]) == HEIGHT and len(masks[0][0]) == WIDTH
    assert any(value == 1.0 for row in masks[0] for value in row)
    assert len(json.loads(answer.scores)) == 1


def test_fifty_concurrent_livepeer_calls_are_all_answered_by_one_process(
    servers: Servers, key: str, sessions: sessionmaker[Session]
) -> None:
    """With default settings, one process of four threads keeps 50 calls
    waiting at once (every job made while none can finish) and stays free
    for other requests; each call is answered, with one job each."""
    caller = LivepeerCaller(servers.roomy, key)
    results, threads = in_threads(CONCURRENT_CALLS, lambda i: caller.call(box_of_call(i)))
    wait_for_jobs(sessions, CONCURRENT_CALLS)
    started = time.monotonic()
    assert requests.get(f"{servers.roomy}/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 1.0
    servers.open_gate()
    for thread in threads:
        thread.join(timeout=90)
    for answer in results:
        assert not isinstance(answer, BaseException), answer
        assert_mask_answer(answer)
    assert caller.statuses == [200] * CONCURRENT_CALLS
    assert count_jobs(sessions) == (CONCURRENT_CALLS, CONCURRENT_CALLS)


def test_the_sdks_retry_after_a_504_gets_the_first_calls_job(
    servers: Servers, key: str, sessions: sessionmaker[Session]
) -> None:
    """The job outlasts SEGQ_PEER_WAIT_SECONDS: 504, and the SDK's retry
    (the same call again) waits for that job instead of making another."""
    retries = RetryConfig("backoff", BackoffStrategy(500, 1000, 1.5, 60_000), False)
    caller = LivepeerCaller(servers.tight, key, retries=retries)
    opener = threading.Timer(TIGHT_PEER_WAIT_SECONDS + 1.5, servers.open_gate)
    opener.start()
    try:
        answer = caller.call(box_of_call(0))
    finally:
        opener.cancel()
    assert_mask_answer(answer)
    assert caller.statuses[0] == 504
    assert caller.statuses[-1] == 200
    assert count_jobs(sessions) == (1, 1)
    # Once finished too, within the window: the same job, answered at once.
    started = time.monotonic()
    assert_mask_answer(LivepeerCaller(servers.tight, key).call(box_of_call(0)))
    assert time.monotonic() - started < TIGHT_PEER_WAIT_SECONDS
    assert count_jobs(sessions) == (1, 1)
    # Another box is another call.
    assert_mask_answer(LivepeerCaller(servers.tight, key).call(box_of_call(1)))
    assert count_jobs(sessions) == (2, 2)


def test_a_call_refused_for_a_full_park_makes_no_job(
    servers: Servers, key: str, sessions: sessionmaker[Session]
) -> None:
    caller = LivepeerCaller(servers.tight, key)
    results, threads = in_threads(TIGHT_PLACES, lambda i: caller.call(box_of_call(i)))
    wait_for_jobs(sessions, TIGHT_PLACES)
    with pytest.raises(errors.SDKError) as refused:
        caller.call(box_of_call(TIGHT_PLACES))
    assert refused.value.status_code == 503
    assert "SEGQ_MAX_WAITING_REQUESTS" in refused.value.body
    assert "no job was made" in refused.value.body
    assert refused.value.raw_response is not None
    assert refused.value.raw_response.headers["Retry-After"] == "1"
    assert count_jobs(sessions) == (TIGHT_PLACES, TIGHT_PLACES)
    servers.open_gate()
    for thread in threads:
        thread.join(timeout=30)
    for answer in results:
        assert not isinstance(answer, BaseException), answer
    # The places were let go of with the answers.
    assert_mask_answer(caller.call(box_of_call(TIGHT_PLACES)))
    assert count_jobs(sessions) == (TIGHT_PLACES + 1, TIGHT_PLACES + 1)


def test_a_client_that_gives_up_lets_go_of_its_place(
    servers: Servers, key: str, sessions: sessionmaker[Session]
) -> None:
    """Clients that time out while parked free their places at once: the
    places of the tight server are all there for the next calls."""
    caller = LivepeerCaller(servers.tight, key)
    quitters, threads = in_threads(
        TIGHT_PLACES, lambda i: caller.call(box_of_call(i), timeout_ms=1000)
    )
    for thread in threads:
        thread.join(timeout=30)
    assert all(isinstance(result, errors.SDKError | httpx.TimeoutException) for result in quitters)
    time.sleep(0.5)  # the server notices the closed connections
    stayers, threads = in_threads(
        TIGHT_PLACES, lambda i: caller.call(box_of_call(TIGHT_PLACES + i))
    )
    wait_for_jobs(sessions, 2 * TIGHT_PLACES)
    servers.open_gate()
    for thread in threads:
        thread.join(timeout=30)
    for answer in stayers:
        assert not isinstance(answer, BaseException), answer
        assert_mask_answer(answer)


def test_moondream_calls_park_and_a_repeated_one_gets_the_same_job(
    servers: Servers, key: str, sessions: sessionmaker[Session]
) -> None:
    client = md.vl(endpoint=f"{servers.roomy}/v1", api_key=key)
    # The same image in another media type is the same image.
    image_as_png = "data:image/png;base64," + base64.b64encode(PNG).decode()
    image_untyped = "data:;base64," + base64.b64encode(PNG).decode()
    refs = [[0.2, 0.15, 0.8, 0.85]]
    results, threads = in_threads(
        2,
        lambda i: client.segment(
            Base64EncodedImage(image_url=(image_as_png, image_untyped)[i]),
            "ellipse",
            spatial_refs=refs,
        ),
    )
    wait_for_jobs(sessions, 1)
    # Whether the second call comes while the job runs or once it is done,
    # within the window it gets the same job.
    time.sleep(0.5)
    servers.open_gate()
    for thread in threads:
        thread.join(timeout=30)
    first, second = results
    assert not isinstance(first, BaseException), first
    assert first == second
    assert first["path"].startswith("M")
    assert count_jobs(sessions) == (1, 1)
