"""Faults on loopback with real processes: a `segq worker` (Celery prefork)
against Postgres, Redis and moto's S3, killed, flushed, fed the same item
twice and cut off from the network. Each test ends with the same check over
everything it submitted: every item finished exactly once in effect (one
result, one set of stored objects, no more engine runs than attempts),
none lost."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import boto3
import pytest
import redis
import requests
from celery import Celery
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.db import make_engine, make_session_factory
from segq.fault_points import API_AFTER_COMMIT
from segq.models import ItemStatus, Job, JobItem, JobStatus
from segq.queue import enqueue_items
from segq.schema_migrations import upgrade_to_head
from segq.settings import Settings
from tests.support.harness import (
    REDIS_URL,
    REPO,
    TEST_BUCKET,
    Tenant,
    Worker,
    free_port,
    make_tenant,
    segq_env,
)
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.probed_worker import engine_runs
from tests.support.tcp_proxy import TcpProxy
from tests.support.tiny_sam import save_tiny_sam_checkpoint

LEASE_SECONDS = 3
MAX_ATTEMPTS = 3
pytestmark = pytest.mark.slow


class StartWorker(Protocol):
    def __call__(self, concurrency: int = 1, **env: str) -> Worker: ...


@pytest.fixture
def engine_runs_file(tmp_path: Path) -> Path:
    return tmp_path / "engine-runs"


@pytest.fixture
def start_worker(
    settings: Settings, tmp_path: Path, storage: Any, celery_app: Celery, engine_runs_file: Path
) -> Iterator[StartWorker]:
    env = {
        **segq_env(settings, storage, tmp_path / "worker-data"),
        "SEGQ_MODEL": "grabcut",
        "SEGQ_LEASE_SECONDS": str(LEASE_SECONDS),
        "SEGQ_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "SEGQ_REPUBLISH_AFTER_SECONDS": "4",
        "SEGQ_RECONCILE_INTERVAL_SECONDS": "1",
        "SEGQ_PROBE_RUNS": str(engine_runs_file),
    }
    workers: list[Worker] = []

    def start(concurrency: int = 1, **overrides: str) -> Worker:
        log = tmp_path / f"worker-{len(workers)}.log"
        worker = Worker({**env, **overrides}, concurrency, log)
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
    sessions: sessionmaker[Session], storage: Any, runs_file: Path, expect_failed: int = 0
) -> dict[int, int]:
    """The closing check: nothing lost, nothing with two results, no engine
    run without an attempt of its own. Returns the engine runs per item."""
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
    # Stored objects cannot show an item run twice (a repeat may write the
    # same bytes, and a winner deletes earlier attempts' objects): the
    # engine's own count can. Each run needs a claim, which counts an attempt.
    runs = engine_runs(runs_file)
    assert set(runs) <= {item.id for item in items}
    for item in items:
        assert runs.get(item.id, 0) <= item.attempt, (item.id, runs.get(item.id), item.attempt)
    for item in completed:
        assert runs.get(item.id, 0) >= 1
    return runs


def test_pool_process_killed_mid_item(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: StartWorker,
    engine_runs_file: Path,
) -> None:
    submit(tenant, images=6)
    worker = start_worker(1)
    wait_until(lambda: bool(running_items(sessions)), 60, "an item to start")
    victim = running_items(sessions)[0].id
    worker.kill_pool()
    wait_until(lambda: all_finished(sessions), 90, "every item to finish")
    assert_each_item_done_once(sessions, storage, engine_runs_file)
    with sessions() as session:
        item = session.get(JobItem, victim)
        assert item is not None and item.attempt >= 2  # the killed attempt, then another


@pytest.mark.model
def test_pool_process_killed_mid_batch(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: StartWorker,
    engine_runs_file: Path,
    tmp_path: Path,
) -> None:
    """A SAM worker that encodes four items' images as one batch, killed
    once it holds the batch's four claims and before it encodes them (a
    gate holds it there): each of the four is taken again, and every item
    finishes once."""
    checkpoint = save_tiny_sam_checkpoint(tmp_path / "tiny.pth")
    gate = tmp_path / "batch-may-encode"
    submit(tenant, images=6, size=(200, 150))
    worker = start_worker(
        1,
        SEGQ_MODEL="sam_vit_b",
        SEGQ_MODEL_CHECKPOINT=str(checkpoint),
        SEGQ_PROBE_TINY_SAM="1",
        SEGQ_ENGINE_BATCH="4",
        SEGQ_ENGINE_BATCH_WAIT_MS="0",
        SEGQ_PROBE_GATE=str(gate),
    )
    # One pool process holding four items at once: one batch.
    wait_until(lambda: len(running_items(sessions)) == 4, 90, "a batch of four to be claimed")
    batch = {item.id for item in running_items(sessions)}
    worker.kill_pool()
    gate.touch()
    wait_until(lambda: all_finished(sessions), 90, "every item to finish")
    runs = assert_each_item_done_once(sessions, storage, engine_runs_file)
    with sessions() as session:
        for item_id in batch:
            item = session.get_one(JobItem, item_id)
            assert item.attempt >= 2, item_id  # the killed attempt, then another
            assert runs[item_id] == 1  # the killed attempt never segmented it
    log = worker.log_path.read_bytes()
    # The kill is the only error: no batch or item failed on its own.
    assert b"failed in the pipeline" not in log and b"encoding a batch" not in log


def test_whole_worker_killed_then_replaced(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: StartWorker,
    engine_runs_file: Path,
) -> None:
    submit(tenant, images=5)
    first = start_worker(1)
    wait_until(lambda: bool(running_items(sessions)), 60, "an item to start")
    first.kill()
    start_worker(1)
    wait_until(lambda: all_finished(sessions), 90, "every item to finish")
    assert_each_item_done_once(sessions, storage, engine_runs_file)


def test_broker_loses_every_message(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: StartWorker,
    engine_runs_file: Path,
) -> None:
    submit(tenant, images=6)
    start_worker(1)
    wait_until(lambda: bool(running_items(sessions)), 60, "an item to start")
    redis.Redis.from_url(REDIS_URL).flushdb()  # queued and unacknowledged messages alike
    wait_until(lambda: all_finished(sessions), 90, "every item to finish")
    assert_each_item_done_once(sessions, storage, engine_runs_file)


def test_the_same_item_delivered_many_times_at_once(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    celery_app: Celery,
    start_worker: StartWorker,
    engine_runs_file: Path,
) -> None:
    job_id = submit(tenant, images=2, size=(400, 300))
    with sessions() as session:
        item_ids = list(session.scalars(select(JobItem.id).where(JobItem.job_id == job_id)))
    enqueue_items(celery_app, item_ids * 5)  # five more copies of each
    start_worker(2)
    wait_until(lambda: all_finished(sessions), 90, "every item to finish")
    runs = assert_each_item_done_once(sessions, storage, engine_runs_file)
    with sessions() as session:
        assert [item.attempt for item in session.scalars(select(JobItem))] == [1, 1]
    assert sorted(runs.values()) == [1, 1]  # six messages each, one engine run each


def test_poison_item_fails_after_bounded_attempts_while_others_finish(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: StartWorker,
    engine_runs_file: Path,
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
    assert_each_item_done_once(sessions, storage, engine_runs_file, expect_failed=1)
    with sessions() as session:
        item = session.get(JobItem, poison)
        assert item is not None and item.attempt == MAX_ATTEMPTS
        assert item.error_message is not None and "worker died" in item.error_message
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.COMPLETED  # the others succeeded


def s3_objects(storage: Any, under: str) -> dict[str, bytes]:
    """The objects stored under ``under`` (a key prefix within the test's
    storage), with their bytes. An object deleted between the listing and
    its read (a worker cleaning up meanwhile) is left out."""
    s3 = boto3.client("s3", endpoint_url=storage._client.meta.endpoint_url)
    listed = s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=storage.prefix + under)
    found: dict[str, bytes] = {}
    for entry in listed.get("Contents", []):
        try:
            body = s3.get_object(Bucket=TEST_BUCKET, Key=entry["Key"])["Body"].read()
        except s3.exceptions.NoSuchKey:
            continue
        found[entry["Key"].removeprefix(storage.prefix)] = body
    return found


def test_a_worker_cut_off_from_postgres_and_redis_cannot_replace_the_winners_result(
    tenant: Tenant,
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: StartWorker,
    engine_runs_file: Path,
    tmp_path: Path,
) -> None:
    """A partition, not a crash: the first worker keeps running, cut off
    from Postgres and Redis (its connections hang, nothing is closed) but
    not from storage. Its lease runs out, a second worker completes the
    item; then the first writes its masks and, when the network comes back,
    tries to complete. Its completion is refused (the attempt is fenced),
    the winner's objects are untouched, and the loser's are deleted."""
    job_id = submit(tenant, images=1, size=(400, 300))
    with sessions() as session:
        item_id = session.scalars(select(JobItem.id).where(JobItem.job_id == job_id)).one()
    database = urlparse(settings.database_url)
    broker = urlparse(settings.broker_url)
    assert database.hostname and database.port and broker.hostname and broker.port
    gate = tmp_path / "cut-off-worker-may-finish"
    with (
        TcpProxy(database.hostname, database.port) as db_link,
        TcpProxy(broker.hostname, broker.port) as broker_link,
    ):
        cut_off = start_worker(
            1,
            SEGQ_DATABASE_URL=db_link.url_for(settings.database_url, database.netloc),
            SEGQ_BROKER_URL=broker_link.url_for(settings.broker_url, broker.netloc),
            SEGQ_PROBE_GATE=str(gate),
            SEGQ_PROBE_INVERT="1",  # its masks differ from the winner's
        )
        wait_until(lambda: bool(running_items(sessions)), 60, "the first attempt to start")
        db_link.cut()
        broker_link.cut()

        start_worker(1)
        wait_until(lambda: all_finished(sessions), 60, "the second worker to complete the item")
        with sessions() as session:
            won = session.get_one(JobItem, item_id)
        assert (won.status, won.attempt) == (ItemStatus.COMPLETED, 2)
        assert won.result is not None
        winners_key = won.result["segments"][0]["maskKey"]
        item_prefix = winners_key.split("/items/")[0] + f"/items/{item_id}/"
        winners_objects = s3_objects(storage, item_prefix)
        assert list(winners_objects) == [winners_key]

        # The cut-off attempt finishes its work and writes its masks, while
        # its connections to Postgres and Redis still hang.
        gate.touch()
        wait_until(
            lambda: s3_objects(storage, item_prefix) != winners_objects,
            30,
            "the cut-off attempt to write its masks",
        )
        during = s3_objects(storage, item_prefix)
        assert during[winners_key] == winners_objects[winners_key], "the winner's mask was replaced"
        assert len(during) == 2

        db_link.heal()
        broker_link.heal()
        # Its completion is refused, and it deletes the objects it wrote.
        wait_until(
            lambda: s3_objects(storage, item_prefix) == winners_objects,
            30,
            "the cut-off attempt to give up its objects",
        )
    assert b"attempt 1 lost its lease" in cut_off.log_path.read_bytes()
    with sessions() as session:
        after = session.get_one(JobItem, item_id)
    assert (after.status, after.attempt, after.result, after.finished_time) == (
        won.status,
        won.attempt,
        won.result,
        won.finished_time,
    )
    runs = assert_each_item_done_once(sessions, storage, engine_runs_file)
    assert runs == {item_id: 2}


def test_an_api_process_killed_between_commit_and_publish(
    tenant: Tenant,
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Any,
    start_worker: StartWorker,
    engine_runs_file: Path,
    tmp_path: Path,
) -> None:
    """A real API process (gunicorn) SIGKILLed right after committing a job,
    before publishing it (a fault point the test arms): the client gets no
    answer, the items stay marked as sent with no message anywhere. The
    reconciler finds them at its first pass once the queue is empty, not
    after SEGQ_REPUBLISH_AFTER_SECONDS."""
    file_id = tenant.upload(png_bytes(400, 300)).json["id"]
    port = free_port()
    api_log = (tmp_path / "api.log").open("ab")
    api = subprocess.Popen(
        [sys.executable, "-m", "segq.cli.main", "serve", f"--port={port}", "--workers=1"],
        env={
            **segq_env(settings, storage, tmp_path / "api-data"),
            "SEGQ_TEST_FAULT_POINT": API_AFTER_COMMIT,
        },
        cwd=REPO,
        stdout=api_log,
        stderr=subprocess.STDOUT,
    )
    try:
        root = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(f"{root}/healthz"), 30, "the API to serve")
        with pytest.raises(requests.ConnectionError):
            requests.post(
                f"{root}/api/v1/projects/{tenant.name}/context/vision/segment",
                json=scene_prompt_body(file_id),
                headers=tenant.headers,
                timeout=30,
            )
        killed = time.monotonic()
    finally:
        api.terminate()
        api.wait(timeout=30)
        api_log.close()
    with sessions() as session:
        [item] = session.scalars(select(JobItem)).all()
    assert (item.status, item.attempt) == (ItemStatus.QUEUED, 0)
    assert item.published_time is not None  # it died before it could say otherwise
    assert redis.Redis.from_url(REDIS_URL).llen("segq.segment") == 0

    start_worker(1, SEGQ_REPUBLISH_AFTER_SECONDS="300")
    wait_until(lambda: all_finished(sessions), 60, "the item to finish")
    assert time.monotonic() - killed < 60  # well within the 300 s republish delay
    assert_each_item_done_once(sessions, storage, engine_runs_file)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:  # not listening yet, or still starting
        return False


class PostgresCluster:
    """A PostgreSQL cluster of the test's own (initdb into a temporary
    folder, on a free port), so the test can stop it: never the machine's.
    Run as the ``postgres`` user when the tests run as root, which
    PostgreSQL refuses to run as."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        pg_ctl = str(found[-1]) if found else shutil.which("pg_ctl")
        if pg_ctl is None:
            pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
        self.bin = Path(pg_ctl).parent
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.data = Path(tempfile.mkdtemp(prefix="segq-test-pg-"))
        if self.as_user:
            shutil.chown(self.data, "postgres", "postgres")
        self.port = free_port()
        self.admin_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / program), *args],
            check=True,
            timeout=60,
            capture_output=True,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.data / "log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    yield cluster
    cluster.remove()


def test_postgres_restart_under_load(
    own_postgres: PostgresCluster,
    settings: Settings,
    storage: Any,
    celery_app: Celery,
    start_worker: StartWorker,
    engine_runs_file: Path,
) -> None:
    """While Postgres is down the API answers 503 with Retry-After; afterwards
    API and worker carry on by themselves and every item finishes."""
    admin = create_engine(own_postgres.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text('CREATE DATABASE "segq"'))
    admin.dispose()
    database_url = own_postgres.admin_url.rsplit("/", 1)[0] + "/segq"
    upgrade_to_head(make_engine(database_url))
    # pre-ping for the test's own reads, which must work right after the restart.
    db_engine = create_engine(database_url, pool_pre_ping=True)
    sessions = make_session_factory(db_engine)
    app = create_app(
        replace(settings, database_url=database_url), storage=storage, celery=celery_app
    )
    tenant = make_tenant(app.test_client(), sessions, "acme")

    job_id = submit(tenant, images=6)
    start_worker(1, SEGQ_DATABASE_URL=database_url)
    wait_until(lambda: bool(running_items(sessions)), 60, "an item to start")
    own_postgres.stop()
    try:
        down = tenant.get_job(job_id)
        assert down.status_code == 503
        assert down.json["error"]["code"] == 503
        assert int(down.headers["Retry-After"]) > 0
        posted = tenant.post_job(scene_prompt_body(1))
        assert posted.status_code == 503
        time.sleep(2)  # the worker meets the outage too
    finally:
        own_postgres.start()
    wait_until(lambda: tenant.get_job(job_id).status_code == 200, 30, "the API to recover")
    wait_until(lambda: all_finished(sessions), 120, "every item to finish")
    assert_each_item_done_once(sessions, storage, engine_runs_file)
    db_engine.dispose()
