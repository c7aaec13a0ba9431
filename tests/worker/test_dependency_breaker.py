"""The storage breaker on its own: when it opens and closes, what it
records, and that an outage which answers probes but fails work again
stays one outage (its bound counts from its first failure)."""

from __future__ import annotations

import logging
import time

import pytest

from segq.worker.dependency_breaker import DependencyBreaker
from segq.worker_processes import Pause, iso_time


class Dependency:
    """A probe that fails while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.probes = 0

    def probe(self) -> None:
        self.probes += 1
        if self.down:
            raise ConnectionRefusedError("refused")


def breaker_on(dependency: Dependency, changes: list[Pause | None]) -> DependencyBreaker:
    return DependencyBreaker(
        "storage",
        dependency.probe,
        outage_seconds=60,
        on_change=changes.append,
        probe_first_seconds=0.01,
        probe_max_seconds=0.02,
    )


def test_it_pauses_until_a_probe_answers_and_says_so_once_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="segq.worker.dependency_breaker")
    storage, changes = Dependency(), list[Pause | None]()
    breaker = breaker_on(storage, changes)
    assert breaker.wait_until_closed(0)  # never down
    breaker.trip("could not read x: refused")
    breaker.trip("could not read y: refused")  # the same outage
    assert not breaker.wait_until_closed(0.1)
    assert storage.probes >= 2
    pause = breaker.pause
    assert pause is not None and pause.reason == "could not read x: refused"
    storage.down = False
    assert breaker.wait_until_closed(5)
    assert breaker.pause is None
    assert changes == [pause, None]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("storage is unavailable (could not read x: refused)")
    assert lines[1].startswith("storage answers again after")


def test_an_outage_that_answers_probes_but_fails_work_stays_one_outage() -> None:
    storage, changes = Dependency(), list[Pause | None]()
    breaker = breaker_on(storage, changes)
    breaker.trip("down")
    first = breaker.pause
    assert first is not None
    storage.down = False
    assert breaker.wait_until_closed(5)
    breaker.trip("down again before any work succeeded")
    again = breaker.pause
    assert again is not None and again.since == first.since
    # What a waiting item fails with, once the bound is past: from the first failure.
    assert breaker.outage_message(first.since + 61_000) == (
        f"storage was unavailable from {iso_time(first.since)} for 61 s, longer than "
        "SEGQ_DEPENDENCY_OUTAGE_SECONDS (60 s): down again before any work succeeded"
    )
    # Work that needed it succeeded: a later failure is a new outage.
    assert breaker.wait_until_closed(5)
    breaker.confirm()
    time.sleep(0.01)  # so that a new outage begins at a later millisecond
    breaker.trip("a new outage")
    later = breaker.pause
    assert later is not None and later.since > first.since
