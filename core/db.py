"""Database engine and sessions: Postgres in production, SQLite when embedded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker


def make_engine(database_url: str) -> Engine:
    if database_url.startswith("sqlite"):
        database = make_url(database_url).database
        if database and database != ":memory:":
            # A fresh embedded installation: the data directory may not exist yet.
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            database_url,
            # The API serves from several threads; each checks out its own connection.
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    if database_url.startswith("postgresql://"):
        # psycopg 3 is the driver segq ships with.
        database_url = "postgresql+psycopg://" + database_url.removeprefix("postgresql://")
    # No ping before each checkout: it is a round trip per transaction, and
    # a worker's item makes two. A connection that died (Postgres restarted)
    # fails its next statement instead; SQLAlchemy then discards every pooled
    # connection opened before the failure, so one statement per process
    # fails, not one per connection. The API answers it with 503 and
    # Retry-After (api/errors.py); the worker's task retries it
    # (worker/tasks.py).
    return create_engine(database_url, pool_size=10, max_overflow=20)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a worker writes; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
