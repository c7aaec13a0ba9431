"""What tests import by name: where the loopback services are, a tenant that
calls the API, and a real worker. The fixtures built on these are in
tests/conftest.py."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import redis
import requests
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import make_server

from segq.db import make_engine, make_session_factory
from segq.models import Job, JobItem, StoredFile
from segq.projects import create_project
from segq.settings import Settings
from segq.storage import ObjectStorage, S3Storage
from segq.worker.engines.base import SegmentationEngine
from segq.worker.item_inputs import ImageLimits

if TYPE_CHECKING:
    from segq.worker.pipeline import ItemOutcome

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


@contextmanager
def serving(app: Flask, port: int = 0) -> Iterator[str]:
    """``app`` served by werkzeug in a thread of this process on ``port`` of
    127.0.0.1 (0: any free one), for clients that need a real server:
    browsers, requests, the CLI, peers' SDKs. Yields its root URL."""
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


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


def item_ids(tenant: Tenant, job_id: int) -> list[int]:
    """The ids of job ``job_id``'s items, in item order."""
    sessions = tenant.client.application.extensions["segq"].sessions
    with sessions() as session:
        return list(
            session.scalars(
                select(JobItem.id).where(JobItem.job_id == job_id).order_by(JobItem.position)
            )
        )


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
    limits: ImageLimits = TEST_LIMITS,
    outage_seconds: int | None = None,
) -> Iterator[None]:
    """A real Celery worker (solo pool, in a thread of this process) running
    the GrabCut engine on ``sessions`` and ``storage``, taking images
    within ``limits``; with ``outage_seconds``, its storage breaker has
    that bound and it records its heartbeat and pauses as a worker does."""
    from segq.worker.engines.grabcut import GrabCutEngine

    with engine_worker(
        celery_app, sessions, storage, GrabCutEngine(), max_attempts, limits, outage_seconds
    ):
        yield


@contextmanager
def engine_worker(
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    engine: SegmentationEngine,
    max_attempts: int = 5,
    limits: ImageLimits = TEST_LIMITS,
    outage_seconds: int | None = None,
) -> Iterator[None]:
    """grabcut_worker with any engine (a tiny SAM, for one)."""
    from celery.contrib.testing.worker import start_worker

    import segq.worker.tasks  # noqa: F401  (registers the shared tasks on celery_app)
    from segq.worker.dependency_breaker import DependencyBreaker
    from segq.worker.heartbeat import WorkerHeartbeat
    from segq.worker.runtime import SegmentRuntime, WorkerRuntime, attach_runtime

    heartbeat = None
    breaker = None
    if outage_seconds is not None:
        heartbeat = WorkerHeartbeat(sessions, engine.name)
        heartbeat.start()
        breaker = DependencyBreaker(
            "storage",
            storage.check,
            outage_seconds=outage_seconds,
            on_change=heartbeat.paused,
            # A test's outage lasts seconds: resume within one of its end.
            probe_max_seconds=1.0,
        )
    segment = SegmentRuntime(
        sessions,
        storage,
        engine,
        lease_seconds=60,
        limits=limits,
        max_attempts=max_attempts,
        breaker=breaker,
    )
    attach_runtime(celery_app, WorkerRuntime(segment=segment))
    # start_worker sets the root logger's level (to ERROR) for good; later
    # tests that read warnings with caplog must find it as it was.
    root_level = logging.root.level
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            yield
    finally:
        attach_runtime(celery_app, None)
        logging.root.setLevel(root_level)
        if heartbeat is not None:
            heartbeat.stop()


def run_job_item(
    sessions: sessionmaker[Session], storage: ObjectStorage, engine: SegmentationEngine, job_id: int
) -> tuple[ItemOutcome, JobItem]:
    """The one item of job ``job_id`` processed here, as a worker task would
    (test limits, a minute's lease, three attempts): its outcome and the item
    as it then stands."""
    from segq.worker.pipeline import process_item

    with sessions() as session:
        [item_id] = session.scalars(select(JobItem.id).where(JobItem.job_id == job_id))
    outcome = process_item(
        sessions, storage, engine, item_id, lease_seconds=60, max_attempts=3, limits=TEST_LIMITS
    ).outcome
    with sessions() as session:
        item = session.get(JobItem, item_id)
        assert item is not None
        return outcome, item


def stored_mask(storage: S3Storage, key: str) -> npt.NDArray[np.bool_]:
    """The mask PNG stored under ``key``, as True where it is white."""
    pixels: npt.NDArray[np.uint8] = np.asarray(Image.open(io.BytesIO(storage.get(key))))
    return np.equal(pixels, 255)


#: The repository, where subprocesses of the tests run.
REPO = Path(__file__).resolve().parents[2]


def segq_env(settings: Settings, storage: S3Storage, data_dir: Path) -> dict[str, str]:
    """The environment of a `segq` subprocess (API or worker) on this test's
    Postgres and Redis (``settings``) and its place in the test bucket
    (``storage``), keeping its own files under ``data_dir``."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SEGQ_DATA_DIR": str(data_dir),
        "SEGQ_DATABASE_URL": settings.database_url,
        "SEGQ_BROKER_URL": settings.broker_url,
        "SEGQ_STORAGE_URL": f"s3://{TEST_BUCKET}/{storage.prefix.rstrip('/')}",
        "SEGQ_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
    }


class Worker:
    """A `segq worker` process: Celery's main process and its pool, with its
    engine probed (tests/support/probed_worker.py)."""

    def __init__(
        self, env: dict[str, str], concurrency: int, log: Path, queues: str = "segment,webhooks"
    ) -> None:
        self.log_path = log
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.probed_worker",
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


def wait_until_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 90
) -> None:
    """Until ``process`` (a `segq serve`) answers /healthz at ``url``; fails
    with the end of its ``log`` if it exits or takes over ``timeout`` s."""
    give_up = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < give_up, log.read_text()[-3000:]
        # Connections wait in the backlog while the processes build the app.
        with contextlib.suppress(requests.ConnectionError, requests.Timeout):
            if requests.get(f"{url}/healthz", timeout=2).ok:
                return
        time.sleep(0.2)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not exited within 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class LiveSegq:
    """`segq serve` and `segq worker` as separate processes, as users run
    them, configured only through ``env`` (the SEGQ_* variables): its root
    URL is ``url``, projects are made in its database with ``new_project``."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = {
            **{name: value for name, value in os.environ.items() if not name.startswith("SEGQ_")},
            "PYTHONPATH": str(REPO),
            "SEGQ_DATA_DIR": str(folder / "data"),
            **env,
        }
        self.folder = folder
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        subprocess.run(
            [sys.executable, "-m", "segq.cli.main", "migrate"],
            env=self.env,
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.api_log = folder / "serve.log"
        with self.api_log.open("ab") as output:
            self.api = subprocess.Popen(
                [sys.executable, "-m", "segq.cli.main", "serve", f"--port={port}", "--workers=1"],
                env=self.env,
                cwd=REPO,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.worker = Worker(self.env, concurrency=1, log=folder / "worker.log")
        wait_until_healthy(self.url, self.api, self.api_log)

    @contextmanager
    def database(self) -> Iterator[sessionmaker[Session]]:
        """Sessions on the deployment's database."""
        from segq.settings import Settings

        engine = make_engine(Settings.from_env(self.env).database_url)
        try:
            yield make_session_factory(engine)
        finally:
            engine.dispose()

    def new_project(self, name: str) -> str:
        """Create project ``name`` in the deployment's database; its API key."""
        with self.database() as sessions, sessions.begin() as session:
            _, key = create_project(session, name)
        return key

    def stop(self) -> None:
        self.worker.stop()
        stop_process(self.api)


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
