"""What tests import by name: where the loopback services are, a tenant that
calls the API, and a real worker. The fixtures built on these are in
tests/conftest.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from segq.models import Job, JobItem, StoredFile
from segq.projects import create_project
from segq.storage import S3Storage
from worker.item_inputs import ImageLimits

REDIS_URL = os.environ.get("SEGQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TEST_BUCKET = "segq-test"
#: Workers in tests: the test settings' pixel bound, and no URL fetching
#: unless a test gives its own policy.
TEST_LIMITS = ImageLimits(max_pixels=4_000_000, fetch_policy=None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Tenant:
    """A project with its key, and helpers to call the API as it."""

    def __init__(self, client: FlaskClient, name: str, key: str) -> None:
        self.client = client
        self.name = name
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"}

    def url(self, path: str) -> str:
        return f"/api/v1/projects/{self.name}{path}"

    def upload(self, data: bytes, filename: str = "image.png", **fields: str) -> Any:
        from io import BytesIO

        return self.client.post(
            self.url("/files"),
            data={"file": (BytesIO(data), filename), **fields},
            headers=self.headers,
            content_type="multipart/form-data",
        )

    def post_job(self, body: Any, headers: dict[str, str] | None = None) -> Any:
        return self.client.post(
            self.url("/context/vision/segment"),
            json=body,
            headers={**self.headers, **(headers or {})},
        )

    def get_job(self, job_id: int) -> Any:
        return self.client.get(self.url(f"/context/vision/segment/{job_id}"), headers=self.headers)


def make_tenant(client: FlaskClient, sessions: sessionmaker[Session], name: str) -> Tenant:
    with sessions.begin() as session:
        _, key = create_project(session, name)
    return Tenant(client, name, key)


@contextmanager
def grabcut_worker(
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    max_attempts: int = 5,
) -> Iterator[None]:
    """A real Celery worker (solo pool, in a thread of this process) running
    the GrabCut engine on ``sessions`` and ``storage``."""
    from celery.contrib.testing.worker import start_worker

    import worker.tasks  # noqa: F401  (registers the shared tasks on celery_app)
    from worker.engines.grabcut import GrabCutEngine
    from worker.runtime import SegmentRuntime, WorkerRuntime, attach_runtime

    segment = SegmentRuntime(
        sessions,
        storage,
        GrabCutEngine(),
        lease_seconds=60,
        limits=TEST_LIMITS,
        max_attempts=max_attempts,
    )
    attach_runtime(celery_app, WorkerRuntime(segment=segment))
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            yield
    finally:
        attach_runtime(celery_app, None)


#: The repository, where subprocesses of the tests run.
REPO = Path(__file__).resolve().parent.parent


class Worker:
    """A `segq worker` process: Celery's main process and its pool, with its
    engine probed (tests/probed_worker.py)."""

    def __init__(
        self, env: dict[str, str], concurrency: int, log: Path, queues: str = "segment,webhooks"
    ) -> None:
        self.log_path = log
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.probed_worker",
                "worker",
                f"--concurrency={concurrency}",
                f"--queues={queues}",
                "--loglevel=WARNING",
            ],
            env=env,
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def pool_pids(self) -> list[int]:
        found = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [int(pid) for pid in found]

    def kill_pool(self) -> None:
        """SIGKILL the pool processes (Celery's main process forks new ones)."""
        for pid in self.pool_pids():
            # A pool process may exit between pgrep and kill.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        for pid in [*self.pool_pids(), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def count_files(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(StoredFile)) or 0


def count_jobs(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with sessions() as session:
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
        items = session.scalar(select(func.count()).select_from(JobItem)) or 0
        return jobs, items


def queued_messages() -> int:
    """Item messages waiting in the broker's segment queue."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.llen("segq.segment"))
    finally:
        client.close()


#: Bodies that are not JSON segq reads, each a 400.
MALFORMED_JSON_BODIES = {
    "nan": b'{"items": [{"fileId": 1}], "points": [{"x": NaN, "y": 0.5}]}',
    "infinity": b'{"items": [{"fileId": 1}], "points": [{"x": Infinity, "y": 0.5}]}',
    "overflow": b'{"items": [{"fileId": 1}], "points": [{"x": 1e999, "y": 0.5}]}',
    "truncated": b'{"items": [',
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "not-object": b'"just a string"',
    "not-utf8": b"\xff\xfe not utf-8",
}


def assert_job_refused(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    body: dict[str, Any],
    status: int,
    mentions: str,
) -> None:
    """POSTing ``body`` as a job is refused with ``status``, a message that
    says ``mentions``, and nothing stored or queued."""
    response = tenant.post_job(body)
    assert response.status_code == status, response.json
    assert mentions in response.json["error"]["message"]
    assert count_jobs(sessions) == (0, 0)
    assert queued_messages() == 0
