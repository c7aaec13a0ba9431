"""A segmenting process's row in ``worker_processes`` (segq/worker_processes.py):
renewed every few seconds with its engine and its pause, if storage is
down, so the API can say why work waits; and the row of a start that
failed, naming the model and the file, for the same reason."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from segq.clock import now_ms
from segq.worker_processes import (
    HEARTBEAT_SECONDS,
    Pause,
    forget_worker,
    record_worker,
    this_process_id,
)

log = logging.getLogger(__name__)


class WorkerHeartbeat:
    """This process's row, written at each beat and at once when its pause
    begins or ends (``DependencyBreaker``'s ``on_change``)."""

    def __init__(self, sessions: sessionmaker[Session], engine: str) -> None:
        self._sessions = sessions
        self._engine = engine
        self._process_id = this_process_id()
        self._pause: Pause | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def paused(self, pause: Pause | None) -> None:
        self._pause = pause
        self.beat()

    def beat(self) -> None:
        with self._lock:
            pause = self._pause
            try:
                with self._sessions.begin() as session:
                    record_worker(
                        session,
                        self._process_id,
                        self._engine,
                        now_ms(),
                        paused_since=None if pause is None else pause.since,
                        paused_dependency=None if pause is None else pause.dependency,
                        paused_reason=None if pause is None else pause.reason[:2000],
                    )
            except Exception as exc:
                # The database is down: said once, not at every beat.
                if not self._failing:
                    log.warning("could not record this worker's heartbeat: %s", exc)
                self._failing = True
                return
            self._failing = False

    def start(self) -> None:
        """Beat now, then every HEARTBEAT_SECONDS in a thread of this process."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="segq-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.beat()

    def stop(self) -> None:
        """Stop beating and remove the row: a process that stops cleanly
        leaves nothing to explain."""
        self._stop.set()
        try:
            with self._lock, self._sessions.begin() as session:
                forget_worker(session, self._process_id)
        except Exception as exc:
            log.warning("could not remove this worker's heartbeat: %s", exc)


def record_start_failure(sessions: sessionmaker[Session], engine: str, message: str) -> None:
    """Leave why this process could not start where the API reads it."""
    try:
        with sessions.begin() as session:
            record_worker(session, this_process_id(), engine, now_ms(), start_failure=message)
    except Exception as exc:
        log.warning("could not record why this worker could not start: %s", exc)
