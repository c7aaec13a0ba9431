"""Test fixtures against real services on loopback: PostgreSQL (a database of
its own, migrated once), Redis (as the Celery broker) and an S3 HTTP server
(moto in server mode). What tests import by name lives in tests/support/."""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import boto3
import pytest
import redis
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.db import make_engine, make_session_factory
from segq.models import Base
from segq.queue import make_celery
from segq.schema_migrations import upgrade_to_head
from segq.settings import Settings
from segq.storage import S3Storage
from tests.support.browser import CHROMIUM, BrowserSession, chromium_session
from tests.support.services import REDIS_URL, TEST_BUCKET, free_port
from tests.support.tenants import Tenant, make_tenant, serving

POSTGRES_ADMIN_URL = os.environ.get(
    "SEGQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


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


@pytest.fixture(scope="session")
def _emptying(db_engine: Engine) -> list[str]:
    """What empties the database as a fresh one: every row deleted (children
    first) and every sequence restarted, so ids count from 1 again. What
    TRUNCATE ... RESTART IDENTITY does, at a tenth of its cost on tables
    this small: TRUNCATE makes new files for every table each time."""
    with db_engine.connect() as connection:
        sequences = connection.scalars(
            text("SELECT sequence_name FROM information_schema.sequences")
        ).all()
    return [
        *(f'DELETE FROM "{table.name}"' for table in reversed(Base.metadata.sorted_tables)),
        *(f'ALTER SEQUENCE "{sequence}" RESTART' for sequence in sequences),
    ]


@pytest.fixture
def sessions(db_engine: Engine, _emptying: list[str]) -> sessionmaker[Session]:
    """A session factory on a database emptied before each test (the worker
    and the API use other connections, so savepoint rollback cannot isolate)."""
    with db_engine.begin() as connection:
        for statement in _emptying:
            connection.execute(text(statement))
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


@pytest.fixture(scope="session")
def _s3_bucket(s3_endpoint: str) -> S3Storage:
    """The test bucket with its boto3 client, made once: a client costs tens
    of milliseconds to make, and is thread-safe to share."""
    return S3Storage(TEST_BUCKET, endpoint_url=s3_endpoint)


@pytest.fixture
def storage(_s3_bucket: S3Storage) -> S3Storage:
    # A prefix per test keeps tests' objects apart in the one bucket; the
    # copy shares the client (a test that patches it, patches it with
    # monkeypatch, which puts it back).
    per_test = copy.copy(_s3_bucket)
    per_test.prefix = f"t-{uuid.uuid4().hex[:8]}/"
    return per_test


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


@pytest.fixture
def tenant(client: FlaskClient, sessions: sessionmaker[Session]) -> Tenant:
    return make_tenant(client, sessions, "acme")


@pytest.fixture
def other_tenant(client: FlaskClient, sessions: sessionmaker[Session]) -> Tenant:
    return make_tenant(client, sessions, "globex")


@pytest.fixture
def live_server(app: Flask) -> Iterator[str]:
    """``app`` on a loopback port: its root URL."""
    with serving(app) as url:
        yield url


@pytest.fixture
def browser() -> Iterator[BrowserSession]:
    """Chromium for a page test (tests/support/browser.py). The rule of every
    browser test: the test fails if any page it opened logged a console
    error (a script error, a failed load, a Content-Security-Policy refusal)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with chromium_session() as session:
        yield session
        assert session.console_errors == [], "console errors:\n" + "\n".join(session.console_errors)
