"""What segmenting workers say of themselves, in Postgres: each process's
engine and heartbeat, a pause for a dependency that does not answer, a
start that failed. Workers write it (worker/dependency_breaker.py,
worker/runtime.py); the API reads it to say why work waits (/readyz,
/metrics, a job's ``waitingFor``) without importing the worker."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from segq.models import WorkerProcess

#: How often a live worker process renews its heartbeat.
HEARTBEAT_SECONDS = 10
#: A process whose heartbeat is older than this is gone.
LIVE_WITHIN_SECONDS = 3 * HEARTBEAT_SECONDS
#: How long a failed start is shown, and a gone process's row kept.
FORGET_AFTER_SECONDS = 3600


def this_process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def iso_time(epoch_ms: int) -> str:
    """``epoch_ms`` as people read it in a message: UTC, to the second."""
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_worker(
    session: Session,
    process_id: str,
    engine: str,
    now: int,
    *,
    paused_since: int | None = None,
    paused_dependency: str | None = None,
    paused_reason: str | None = None,
    start_failure: str | None = None,
) -> None:
    """Insert or replace what ``process_id`` says of itself as of ``now``."""
    values = {
        "engine": engine,
        "heartbeat_time": now,
        "paused_since": paused_since,
        "paused_dependency": paused_dependency,
        "paused_reason": paused_reason,
        "start_failure": start_failure,
    }
    insert = postgres_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(
        insert(WorkerProcess)
        .values(id=process_id, started_time=now, **values)
        .on_conflict_do_update(index_elements=[WorkerProcess.id], set_=values)
    )
    # Rows of processes long gone: what a crash left behind.
    session.execute(
        delete(WorkerProcess).where(
            WorkerProcess.heartbeat_time < now - FORGET_AFTER_SECONDS * 1000
        )
    )


def forget_worker(session: Session, process_id: str) -> None:
    """A process that stops cleanly leaves no row to explain."""
    session.execute(delete(WorkerProcess).where(WorkerProcess.id == process_id))


@dataclass(frozen=True)
class Pause:
    dependency: str
    since: int
    reason: str

    def describe(self) -> str:
        return f"{self.dependency} has not answered since {iso_time(self.since)}: {self.reason}"


@dataclass(frozen=True)
class WorkersOverview:
    """The segmenting workers as of one moment."""

    now: int
    #: Live processes by engine: (serving, paused).
    serving: dict[str, int]
    paused: dict[str, int]
    #: The earliest pause of each live paused process's dependency.
    pauses: list[Pause]
    #: Why the most recent failed starts failed, newest first.
    start_failures: list[str]

    @property
    def live(self) -> int:
        return sum(self.serving.values()) + sum(self.paused.values())

    def longest_pause_seconds(self) -> float:
        return max(((self.now - pause.since) / 1000 for pause in self.pauses), default=0.0)

    def waiting_for(self, engine: str | None) -> str | None:
        """Why items for ``engine`` (None: any engine) wait, if no live
        worker serves them; None when one does."""

        def serves(counts: dict[str, int]) -> int:
            return counts.get(engine, 0) if engine is not None else sum(counts.values())

        if serves(self.serving):
            return None
        wanted = "" if engine is None else f" with engine {engine}"
        if serves(self.paused):
            causes = "; ".join(pause.describe() for pause in self.pauses)
            return f"every worker{wanted} is paused: {causes}"
        reason = f"no worker{wanted} is running"
        if self.start_failures:
            reason += f"; the last one to start failed: {self.start_failures[0]}"
        return reason


def workers_overview(session: Session, now: int) -> WorkersOverview:
    rows = session.scalars(
        select(WorkerProcess).where(
            WorkerProcess.heartbeat_time >= now - FORGET_AFTER_SECONDS * 1000
        )
    ).all()
    serving: dict[str, int] = {}
    paused: dict[str, int] = {}
    pauses: dict[str, Pause] = {}
    failures: list[tuple[int, str]] = []
    for row in rows:
        if row.start_failure is not None:
            failures.append((row.heartbeat_time, row.start_failure))
            continue
        if row.heartbeat_time < now - LIVE_WITHIN_SECONDS * 1000:
            continue
        if row.paused_since is None:
            serving[row.engine] = serving.get(row.engine, 0) + 1
            continue
        paused[row.engine] = paused.get(row.engine, 0) + 1
        dependency = row.paused_dependency or "a dependency"
        known = pauses.get(dependency)
        if known is None or row.paused_since < known.since:
            pauses[dependency] = Pause(dependency, row.paused_since, row.paused_reason or "")
    return WorkersOverview(
        now=now,
        serving=serving,
        paused=paused,
        pauses=sorted(pauses.values(), key=lambda pause: pause.since),
        start_failures=[message for _, message in sorted(failures, reverse=True)],
    )
