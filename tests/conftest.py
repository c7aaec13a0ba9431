"""Test fixtures against real services on loopback: PostgreSQL (a database of
its own, migrated once), Redis (as the Celery broker) and an S3 HTTP server
(moto in server mode)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from segq.db import make_engine, make_session_factory
from segq.migrations import upgrade_to_head
from segq.models import Base
from segq.projects import create_project
from segq.queue import make_celery
from segq.settings import Settings
from segq.storage import S3Storage
from worker.item_inputs import ImageLimits

POSTGRES_ADMIN_URL = os.environ.get(
    "SEGQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
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


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh Postgres database for this test session, at the latest migration."""
    name = f"segq_test_{uuid.uuid4().hex[:8]}"
    # pre-ping: a test restarts Postgres, and pooled connections die with it.
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def db_engine(database_url: str) -> Iterator[Engine]:
    # The tests' own engine pings before use, unlike production's (segq/db.py):
    # some tests restart Postgres or drop its connections, and every later
    # test must start from a working pool.
    engine = create_engine(database_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(db_engine: Engine) -> sessionmaker[Session]:
    """A session factory on a database emptied before each test (the worker
    and the API use other connections, so savepoint rollback cannot isolate)."""
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    with db_engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return make_session_factory(db_engine)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto serving the S3 API over HTTP on loopback."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=TEST_BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _aws_test_credentials() -> None:
    # boto3 reads these; moto accepts any. Never real credentials in tests.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def storage(s3_endpoint: str) -> S3Storage:
    # A prefix per test keeps tests' objects apart in the one bucket.
    return S3Storage(TEST_BUCKET, f"t-{uuid.uuid4().hex[:8]}", endpoint_url=s3_endpoint)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, s3_endpoint: str) -> Settings:
    base = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path / "data")})
    return replace(
        base,
        database_url=database_url,
        broker_url=REDIS_URL,
        storage_url=f"s3://{TEST_BUCKET}",
        s3_endpoint_url=s3_endpoint,
        max_upload_bytes=2 * 1024 * 1024,
        max_image_pixels=4_000_000,
        max_items_per_job=50,
    )


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    app = make_celery(
        settings.broker_url, broker_folder=settings.broker_folder, time_limit_seconds=60
    )
    yield app
    app.close()
    client.flushdb()
    client.close()


@pytest.fixture
def app(
    settings: Settings, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> Flask:
    return create_app(settings, storage=storage, celery=celery_app)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


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


@pytest.fixture
def tenant(client: FlaskClient, sessions: sessionmaker[Session]) -> Tenant:
    return make_tenant(client, sessions, "acme")


@pytest.fixture
def other_tenant(client: FlaskClient, sessions: sessionmaker[Session]) -> Tenant:
    return make_tenant(client, sessions, "globex")


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
