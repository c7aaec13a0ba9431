"""A circuit breaker around storage, one per worker process: when storage
says it is down (StorageUnreachable: refused, timed out, 5xx), the process
stops taking items, probes storage with capped, jittered backoff, and
resumes when it answers. Attempts exist to stop an item that fails by
itself; they do not measure how long a dependency is down. Items wait
meanwhile with their attempts kept, and fail for the outage only once it
has lasted ``outage_seconds`` (``SEGQ_DEPENDENCY_OUTAGE_SECONDS``).

One per process, not one shared through Redis: each process sees its own
path to storage (a worker cut off from storage must pause while the others
go on), each probes for itself (a handful of HEAD requests, not a herd), and
a process needs nothing else up to decide. The cost is one failed attempt
per process when an outage begins, given back to its item (``release_item``).
Each process writes its pause where the API reads it (segq/worker_processes.py).

An outage logs one line when it begins and one when it ends, whatever the
number of items that wait on it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from segq.clock import now_ms
from segq.worker_processes import Pause, iso_time

log = logging.getLogger(__name__)

#: The first pause between probes, and the longest (before jitter).
PROBE_FIRST_SECONDS = 1.0
PROBE_MAX_SECONDS = 30.0


class DependencyBreaker:
    """Open while ``dependency`` is down. Thread-safe: one thread probes at
    a time, the others wait for its answer."""

    def __init__(
        self,
        dependency: str,
        probe: Callable[[], None],
        *,
        outage_seconds: int,
        on_change: Callable[[Pause | None], None] | None = None,
        fails_waiting_items: bool = True,
        probe_first_seconds: float = PROBE_FIRST_SECONDS,
        probe_max_seconds: float = PROBE_MAX_SECONDS,
    ) -> None:
        self.dependency = dependency
        self.outage_seconds = outage_seconds
        self.fails_waiting_items = fails_waiting_items
        self._probe = probe
        self._on_change = on_change
        self._probe_first = probe_first_seconds
        self._probe_max = probe_max_seconds
        self._lock = threading.Lock()
        self._probing = threading.Lock()
        self._pause: Pause | None = None
        #: The outage a probe last saw end, until work confirms it has: a
        #: dependency that answers probes but fails work again is one
        #: outage, not a new one each time (its bound would never come).
        self._unconfirmed_since: int | None = None
        self._failed_probes = 0
        self._next_probe = 0.0  # monotonic seconds

    @property
    def pause(self) -> Pause | None:
        """The outage under way, if any: since when (epoch ms) and why."""
        return self._pause

    def trip(self, reason: str) -> None:
        """``dependency`` failed in a way that says it is down: open, if not
        open yet, and probe it before taking more work."""
        with self._lock:
            if self._pause is not None:
                return
            since = self._unconfirmed_since or now_ms()
            pause = self._pause = Pause(self.dependency, since, reason)
            self._failed_probes = 0
            self._next_probe = time.monotonic() + self._backoff()
        log.warning(
            "%s is unavailable (%s); this worker takes no items until it answers%s",
            self.dependency,
            reason,
            f", and fails waiting items once it has been down for {self.outage_seconds} s"
            if self.fails_waiting_items
            else "",
        )
        self._changed(pause)

    def confirm(self) -> None:
        """Work that needed the dependency succeeded: the outage is over."""
        self._unconfirmed_since = None

    def wait_until_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the dependency to answer a
        probe; True once it has (or was never down)."""
        deadline = time.monotonic() + timeout
        while self._pause is not None:
            now = time.monotonic()
            if now >= deadline:
                return False
            with self._probing:
                if self._pause is None:
                    return True
                if time.monotonic() >= self._next_probe:
                    self._probe_once()
                    continue
            time.sleep(max(0.0, min(self._next_probe, deadline) - time.monotonic()))
        return True

    def outage_message(self, now: int) -> str:
        """What an item that waited out the bound fails with."""
        pause = self._pause
        since = now if pause is None else pause.since
        return (
            f"{self.dependency} was unavailable from {iso_time(since)} for "
            f"{(now - since) // 1000} s, longer than SEGQ_DEPENDENCY_OUTAGE_SECONDS "
            f"({self.outage_seconds} s): {'' if pause is None else pause.reason}"
        )

    def _backoff(self) -> float:
        """Full jitter over a capped exponential: many processes that lost
        storage at the same moment do not probe it in step."""
        ceiling = min(self._probe_max, self._probe_first * 2**self._failed_probes)
        return random.uniform(ceiling / 2, ceiling)

    def _probe_once(self) -> None:
        try:
            self._probe()
        except Exception as exc:
            with self._lock:
                self._failed_probes += 1
                self._next_probe = time.monotonic() + self._backoff()
            log.debug("%s still unavailable: %s", self.dependency, exc)
            return
        with self._lock:
            pause, self._pause = self._pause, None
            if pause is not None:
                self._unconfirmed_since = pause.since
        if pause is not None:
            log.warning(
                "%s answers again after %.0f s (down since %s); this worker takes items again",
                self.dependency,
                (now_ms() - pause.since) / 1000,
                iso_time(pause.since),
            )
            self._changed(None)

    def _changed(self, pause: Pause | None) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(pause)
        except Exception as exc:
            # Best effort: the pause holds whether or not the API can see it.
            log.warning("could not record the %s pause: %s", self.dependency, exc)
