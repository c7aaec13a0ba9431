"""Keeps the leases of the items a worker process is running."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from segq.worker.claims import Claim, renew_lease

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases of the items this process is running, every third
    of their length, so a short lease covers a long item and a dead
    worker's item is free again within one lease.

    One thread serves every item of the process: it sleeps until the
    earliest renewal is due, and an item only adds and removes its entry."""

    def __init__(self) -> None:
        self._forget_all()
        # A forked child has none of the parent's threads, and none of its
        # items: it starts empty (and not with a lock held at the fork).
        os.register_at_fork(after_in_child=self._forget_all)

    def _forget_all(self) -> None:
        self._wake = threading.Condition()
        self._held: dict[tuple[int, int], _HeldLease] = {}
        self._thread: threading.Thread | None = None

    def hold(self, sessions: sessionmaker[Session], claim: Claim, lease_seconds: int) -> None:
        with self._wake:
            self._start_thread_once()
            interval = lease_seconds / 3
            self._held[claim.item_id, claim.attempt] = _HeldLease(
                sessions, claim, lease_seconds, interval, time.monotonic() + interval
            )
            self._wake.notify()

    def let_go(self, claim: Claim) -> None:
        with self._wake:
            self._held.pop((claim.item_id, claim.attempt), None)

    def _start_thread_once(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [held for held in self._held.values() if held.next_time <= now]
                if not due:
                    next_time = min((held.next_time for held in self._held.values()), default=None)
                    self._wake.wait(None if next_time is None else next_time - now)
                    continue
                for held in due:
                    held.next_time = now + held.interval
            for held in due:
                self._renew(held)

    def _renew(self, held: _HeldLease) -> None:
        try:
            if not renew_lease(held.sessions, held.claim, held.lease_seconds):
                self.let_go(held.claim)  # another attempt has it, or it is finished
        except Exception:
            # The database may be back by the next beat; the completion
            # checks the lease anyway.
            log.warning("could not renew the lease of item %s", held.claim.item_id, exc_info=True)


@dataclass
class _HeldLease:
    sessions: sessionmaker[Session]
    claim: Claim
    lease_seconds: int
    interval: float
    next_time: float


#: The one keeper of this process.
_lease_keeper = LeaseKeeper()


@contextmanager
def lease_kept(sessions: sessionmaker[Session], claim: Claim, lease_seconds: int) -> Iterator[None]:
    """Keep ``claim``'s lease renewed while the body runs."""
    _lease_keeper.hold(sessions, claim, lease_seconds)
    try:
        yield
    finally:
        _lease_keeper.let_go(claim)
