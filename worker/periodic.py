"""Background passes of a worker's main process (the reconciler, the
webhook dispatcher): each in a thread of its own, at its own interval."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class PeriodicPass(threading.Thread):
    """Runs ``run_pass`` every ``interval`` seconds in the worker's main
    process until stopped. A failed pass (database down) is logged and
    retried at the next beat."""

    def __init__(self, name: str, run_pass: Callable[[], object], interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self._run_pass = run_pass
        self._interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            try:
                self._run_pass()
            except Exception:
                log.warning(
                    "%s pass failed; retrying in %s s", self.name, self._interval, exc_info=True
                )

    def stop(self) -> None:
        self._stop_event.set()
