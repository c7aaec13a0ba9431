"""Database engine and sessions: Postgres in production, SQLite when embedded."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    # a worker's item makes two. A connection that died (Postgres restarted,
    # a proxy dropped it) fails its next statement instead, and SQLAlchemy
    # then discards every connection of the pool opened before the failure:
    # one failure per engine, plus one per connection in use at the time.
    # The API answers it with 503 and Retry-After (api/errors.py); the
    # worker runs its transactions through once_more_if_disconnected.
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


def database_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is down (a connection that died,
    one that could not be made, a server shutting down), not that one
    statement failed (a deadlock, a constraint)."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover (installed with segq)
        return False
    orig = exc.orig
    return isinstance(orig, psycopg.OperationalError) and (
        # Raised by the client (no server answer), or SQLSTATE classes 08
        # (connection exception) and 57P (operator intervention: shutdown).
        orig.sqlstate is None or orig.sqlstate.startswith(("08", "57P"))
    )


def once_more_if_disconnected(transaction: Callable[[], T]) -> T:
    """Run ``transaction``; if it failed because its pooled connection had
    died, run it once more (the pool has reconnected by then).

    Only for transactions that are safe to repeat: a dead connection fails
    at its first statement, so the failed run changed nothing, except when
    the connection died while committing, and then the repeat must find the
    work done and do nothing (the worker's transactions are guarded so)."""
    try:
        return transaction()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        log.warning("a database connection had died; running the transaction once more")
        return transaction()
