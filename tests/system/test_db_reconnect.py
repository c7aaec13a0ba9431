"""Connections are not pinged before use (segq/db.py): a connection that
Postgres dropped fails its next statement. That must cost one answer or one
retry, never a lost item or a stuck process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, select, text

from segq.db import make_engine, make_session_factory
from segq.models import ItemStatus, JobItem
from segq.storage import S3Storage
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.pipeline import ItemOutcome, process_item
from tests.support.harness import TEST_LIMITS, Tenant, grabcut_worker
from tests.support.images import jpeg_bytes, scene_prompt_body


@pytest.fixture
def worker_engine(database_url: str) -> Iterator[Engine]:
    """The worker's own engine, built as production builds it (no pre-ping)."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def running_worker(celery_app: Celery, worker_engine: Engine, storage: S3Storage) -> Iterator[None]:
    with grabcut_worker(celery_app, make_session_factory(worker_engine), storage):
        yield


def drop_every_other_connection(engine: Engine) -> int:
    """What a Postgres restart does to pooled connections, without the restart."""
    with engine.connect() as connection:
        dropped = connection.execute(
            text(
                # Waits (up to 5 s) until each backend is gone.
                "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    return int(dropped)


def wait_status(tenant: Tenant, job_id: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        response = tenant.get_job(job_id)
        status = response.json["status"]
        if status in ("Completed", "Failed", "Canceled"):
            return str(status)
        time.sleep(0.1)
    return status


def test_dropped_connections_cost_one_503_and_one_prompt_retry(
    tenant: Tenant, running_worker: None, db_engine: Engine
) -> None:
    file_id = tenant.upload(jpeg_bytes(120, 90)).json["id"]
    first = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    # Both the API and the worker now hold a pooled connection.
    assert wait_status(tenant, first, 30) == "Completed"

    assert drop_every_other_connection(db_engine) >= 2

    # The API's connection is dead: that request is answered 503 with
    # Retry-After, and the pool reconnects for the next one.
    refused = tenant.get_job(first)
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) > 0
    assert tenant.get_job(first).status_code == 200

    # The worker's connection is dead too: its claim fails once and runs
    # again on a new connection. Without that the item would wait for the
    # reconciler (SEGQ_REPUBLISH_AFTER_SECONDS, minutes).
    second = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    assert wait_status(tenant, second, 15) == "Completed"


def test_connections_dropped_mid_item_do_not_cost_its_result(
    tenant: Tenant, worker_engine: Engine, db_engine: Engine, storage: S3Storage
) -> None:
    """The worker's connection dies while the engine runs: the completion
    meets the dead connection first, and must still land (else the result
    is dropped and the item waits for its lease to run out)."""
    file_id = tenant.upload(jpeg_bytes(120, 90)).json["id"]
    job_id = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    sessions = make_session_factory(worker_engine)
    with sessions() as session:
        [item_id] = session.scalars(select(JobItem.id).where(JobItem.job_id == job_id))
    dropped: list[int] = []

    class DroppingEngine(GrabCutEngine):
        def segment(self, *args: Any, **kwargs: Any) -> Any:
            dropped.append(drop_every_other_connection(db_engine))
            return super().segment(*args, **kwargs)

    outcome = process_item(
        sessions,
        storage,
        DroppingEngine(),
        item_id,
        lease_seconds=60,
        max_attempts=3,
        limits=TEST_LIMITS,
    ).outcome
    assert dropped and dropped[0] >= 1  # the claim's connection, back in the pool
    assert outcome == ItemOutcome.COMPLETED
    with sessions() as session:
        item = session.get_one(JobItem, item_id)
        assert (item.status, item.attempt) == (ItemStatus.COMPLETED, 1)
