"""Faults on loopback with real processes: a `segq worker` (Celery prefork)
against Postgres, Redis and moto's S3, killed, flushed and fed the same item
twice. Each test ends with the same check over everything it submitted:
every item finished exactly once in effect (one result, one set of stored
objects), none lost."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.models import ItemStatus, Job, JobItem, JobStatus
from core.queue import enqueue_items
from core.settings import Settings
from tests.conftest import REDIS_URL, TEST_BUCKET, Tenant
from tests.images import png_bytes, scene_prompt_body

REPO = Path(__file__).resolve().parent.parent
LEASE_SECONDS = 3
MAX_ATTEMPTS = 3
pytestmark = pytest.mark.slow


class Worker:
    """A `segq worker` process: Celery's main process and its pool."""

    def __init__(self, env: dict[str, str], concurrency: int, log: Path) -> None:
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                "worker",
                f"--concurrency={concurrency}",
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


@pytest.fixture
def start_worker(
    settings: Settings, tmp_path: Path, storage: Any, celery_app: Celery
) -> Iterator[Callable[[int], Worker]]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SEGQ_DATA_DIR": str(tmp_path / "worker-data"),
        "SEGQ_DATABASE_URL": settings.database_url,
        "SEGQ_BROKER_URL": settings.broker_url,
        "SEGQ_STORAGE_URL": f"s3://{TEST_BUCKET}/{storage.prefix.rstrip('/')}",
        "SEGQ_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "SEGQ_MODEL": "grabcut",
        "SEGQ_LEASE_SECONDS": str(LEASE_SECONDS),
        "SEGQ_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "SEGQ_REPUBLISH_AFTER_SECONDS": "4",
        "SEGQ_RECONCILE_INTERVAL_SECONDS": "1",
    }
    workers: list[Worker] = []

    def start(concurrency: int = 1) -> Worker:
        worker = Worker(env, concurrency, tmp_path / "worker.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def submit(tenant: Tenant, images: int, size: tuple[int, int] = (900, 700)) -> int:
    ids = [tenant.upload(png_bytes(*size, seed=seed)).json["id"] for seed in range(images)]
    body = {**scene_prompt_body(ids[0]), "items": [{"fileId": i} for i in ids]}
    response = tenant.post_job(body)
    assert response.status_code == 200
    return int(response.json["jobId"])


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def running_items(sessions: sessionmaker[Session]) -> list[JobItem]:
    with sessions() as session:
        return list(session.scalars(select(JobItem).where(JobItem.status == ItemStatus.RUNNING)))


def all_finished(sessions: sessionmaker[Session]) -> bool:
    with sessions() as session:
        unfinished = session.scalar(
            select(func.count())
            .select_from(JobItem)
            .where(JobItem.status.in_([ItemStatus.QUEUED, ItemStatus.RUNNING]))
        )
        return unfinished == 0


def assert_each_item_done_once(
    sessions: sessionmaker[Session], storage: Any, expect_failed: int = 0
) -> None:
    """The closing check: nothing lost, nothing with two results."""
    with sessions() as session:
        items = list(session.scalars(select(JobItem)))
        jobs = list(session.scalars(select(Job)))
    assert items
    failed = [item for item in items if item.status == ItemStatus.FAILED]
    assert len(failed) == expect_failed, [(i.id, i.error_message) for i in failed]
    completed = [item for item in items if item.status == ItemStatus.COMPLETED]
    assert len(completed) + len(failed) == len(items), [(i.id, i.status) for i in items]
    for item in completed:
        assert item.result is not None and len(item.result["segments"]) == 1
        assert 1 <= item.attempt <= MAX_ATTEMPTS
    assert all(job.status in (JobStatus.COMPLETED, JobStatus.FAILED) for job in jobs)
    # One set of stored objects: exactly one mask per completed item, at its fixed key.
    s3 = boto3.client("s3", endpoint_url=storage._client.meta.endpoint_url)
    listed = s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=storage.prefix + "projects/")
    masks = sorted(o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(".png"))
    expected = sorted(
        storage.prefix + item.result["segments"][0]["maskKey"] for item in completed if item.result
    )
    assert masks == expected


def test_pool_process_killed_mid_item(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: Callable[[int], Worker],
) -> None:
    submit(tenant, images=6)
    worker = start_worker(1)
    wait_until(lambda: bool(running_items(sessions)), 60, "an item to start")
    victim = running_items(sessions)[0].id
    worker.kill_pool()
    wait_until(lambda: all_finished(sessions), 90, "every item to finish")
    assert_each_item_done_once(sessions, storage)
    with sessions() as session:
        item = session.get(JobItem, victim)
        assert item is not None and item.attempt >= 2  # the killed attempt, then another


def test_whole_worker_killed_then_replaced(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: Callable[[int], Worker],
) -> None:
    submit(tenant, images=5)
    first = start_worker(1)
    wait_until(lambda: bool(running_items(sessions)), 60, "an item to start")
    first.kill()
    start_worker(1)
    wait_until(lambda: all_finished(sessions), 90, "every item to finish")
    assert_each_item_done_once(sessions, storage)


def test_broker_loses_every_message(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: Callable[[int], Worker],
) -> None:
    submit(tenant, images=6)
    start_worker(1)
    wait_until(lambda: bool(running_items(sessions)), 60, "an item to start")
    redis.Redis.from_url(REDIS_URL).flushdb()  # queued and unacknowledged messages alike
    wait_until(lambda: all_finished(sessions), 90, "every item to finish")
    assert_each_item_done_once(sessions, storage)


def test_the_same_item_delivered_many_times_at_once(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    celery_app: Celery,
    start_worker: Callable[[int], Worker],
) -> None:
    job_id = submit(tenant, images=2, size=(400, 300))
    with sessions() as session:
        item_ids = list(session.scalars(select(JobItem.id).where(JobItem.job_id == job_id)))
    enqueue_items(celery_app, item_ids * 5)  # five more copies of each
    start_worker(2)
    wait_until(lambda: all_finished(sessions), 90, "every item to finish")
    assert_each_item_done_once(sessions, storage)
    with sessions() as session:
        assert [item.attempt for item in session.scalars(select(JobItem))] == [1, 1]


def test_poison_item_fails_after_bounded_attempts_while_others_finish(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: Callable[[int], Worker],
) -> None:
    """An image that kills its worker every time: here the test is the
    killer, taking down whichever pool process runs that item."""
    job_id = submit(tenant, images=4)
    with sessions() as session:
        poison = session.scalars(
            select(JobItem.id).where(JobItem.job_id == job_id).order_by(JobItem.position)
        ).first()
    worker = start_worker(1)
    deadline = time.monotonic() + 120
    while not all_finished(sessions):
        assert time.monotonic() < deadline, "items did not finish"
        if any(item.id == poison for item in running_items(sessions)):
            worker.kill_pool()
            wait_until(
                lambda: (
                    not any(
                        i.id == poison
                        and i.lease_expires_time
                        and i.lease_expires_time > time.time() * 1000
                        for i in running_items(sessions)
                    )
                ),
                30,
                "the lease to run out",
            )
        time.sleep(0.02)
    assert_each_item_done_once(sessions, storage, expect_failed=1)
    with sessions() as session:
        item = session.get(JobItem, poison)
        assert item is not None and item.attempt == MAX_ATTEMPTS
        assert item.error_message is not None and "worker died" in item.error_message
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.COMPLETED  # the others succeeded


def postgres_cluster() -> list[str]:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


needs_local_postgres = pytest.mark.skipif(
    not shutil.which("pg_ctlcluster") or not os.path.isdir("/etc/postgresql"),
    reason="needs the machine's own PostgreSQL cluster (pg_ctlcluster) to stop and start it",
)


@needs_local_postgres
def test_postgres_restart_under_load(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: Callable[[int], Worker],
) -> None:
    """While Postgres is down the API answers 503 with Retry-After; afterwards
    API and worker carry on by themselves and every item finishes."""
    job_id = submit(tenant, images=6)
    start_worker(1)
    wait_until(lambda: bool(running_items(sessions)), 60, "an item to start")
    subprocess.run([*postgres_cluster(), "stop", "-m", "fast"], check=True, timeout=60)
    try:
        down = tenant.get_job(job_id)
        assert down.status_code == 503
        assert down.json["error"]["code"] == 503
        assert int(down.headers["Retry-After"]) > 0
        posted = tenant.post_job(scene_prompt_body(1))
        assert posted.status_code == 503
        time.sleep(2)  # the worker meets the outage too
    finally:
        subprocess.run([*postgres_cluster(), "start"], check=True, timeout=60)
    wait_until(lambda: tenant.get_job(job_id).status_code == 200, 30, "the API to recover")
    wait_until(lambda: all_finished(sessions), 120, "every item to finish")
    assert_each_item_done_once(sessions, storage)
