"""Connections are not pinged before use (core/db.py): a connection that
Postgres dropped fails its next statement. That must cost one answer or one
retry, never a lost item or a stuck process."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from celery import Celery
from sqlalchemy import Engine, text

from core.db import make_engine, make_session_factory
from core.storage import S3Storage
from tests.conftest import Tenant, grabcut_worker
from tests.images import jpeg_bytes, scene_prompt_body


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
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
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

    # The worker's connection is dead too: its claim fails, the task retries
    # a second later on a new connection. Without that retry the item would
    # wait for the reconciler (SEGQ_REPUBLISH_AFTER_SECONDS, minutes).
    second = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    assert wait_status(tenant, second, 15) == "Completed"
