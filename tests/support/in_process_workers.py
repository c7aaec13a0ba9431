"""Workers inside the test process: a real Celery worker (solo pool, in a
thread) on any engine, or one item processed as a worker task would; and
reading a stored mask back."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from celery import Celery
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.models import JobItem
from segq.storage import ObjectStorage, S3Storage
from segq.worker.engines.base import SegmentationEngine
from segq.worker.item_inputs import ImageLimits

if TYPE_CHECKING:
    from segq.worker.pipeline import ItemOutcome


#: Workers in tests: the test settings' pixel bound, and no URL fetching
#: unless a test gives its own policy.
TEST_LIMITS = ImageLimits(max_pixels=4_000_000, fetch_policy=None)


@contextmanager
def grabcut_worker(
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    max_attempts: int = 5,
    limits: ImageLimits = TEST_LIMITS,
    outage_seconds: int | None = None,
) -> Iterator[None]:
    """A real Celery worker (solo pool, in a thread of this process) running
    the GrabCut engine on ``sessions`` and ``storage``, taking images
    within ``limits``; with ``outage_seconds``, its storage breaker has
    that bound and it records its heartbeat and pauses as a worker does."""
    from segq.worker.engines.grabcut import GrabCutEngine

    with engine_worker(
        celery_app, sessions, storage, GrabCutEngine(), max_attempts, limits, outage_seconds
    ):
        yield


@contextmanager
def engine_worker(
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    engine: SegmentationEngine,
    max_attempts: int = 5,
    limits: ImageLimits = TEST_LIMITS,
    outage_seconds: int | None = None,
) -> Iterator[None]:
    """grabcut_worker with any engine (a tiny SAM, for one)."""
    from celery.contrib.testing.worker import start_worker

    import segq.worker.tasks  # noqa: F401  (registers the shared tasks on celery_app)
    from segq.worker.dependency_breaker import DependencyBreaker
    from segq.worker.heartbeat import WorkerHeartbeat
    from segq.worker.runtime import SegmentRuntime, WorkerRuntime, attach_runtime

    heartbeat = None
    breaker = None
    if outage_seconds is not None:
        heartbeat = WorkerHeartbeat(sessions, engine.name)
        heartbeat.start()
        breaker = DependencyBreaker(
            "storage",
            storage.check,
            outage_seconds=outage_seconds,
            on_change=heartbeat.paused,
            # A test's outage lasts seconds: resume within one of its end.
            probe_max_seconds=1.0,
        )
    segment = SegmentRuntime(
        sessions,
        storage,
        engine,
        lease_seconds=60,
        limits=limits,
        max_attempts=max_attempts,
        breaker=breaker,
    )
    attach_runtime(celery_app, WorkerRuntime(segment=segment))
    # start_worker sets the root logger's level (to ERROR) for good; later
    # tests that read warnings with caplog must find it as it was.
    root_level = logging.root.level
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            yield
    finally:
        attach_runtime(celery_app, None)
        logging.root.setLevel(root_level)
        if heartbeat is not None:
            heartbeat.stop()


def run_job_item(
    sessions: sessionmaker[Session], storage: ObjectStorage, engine: SegmentationEngine, job_id: int
) -> tuple[ItemOutcome, JobItem]:
    """The one item of job ``job_id`` processed here, as a worker task would
    (test limits, a minute's lease, three attempts): its outcome and the item
    as it then stands."""
    from segq.worker.pipeline import process_item

    with sessions() as session:
        [item_id] = session.scalars(select(JobItem.id).where(JobItem.job_id == job_id))
    outcome = process_item(
        sessions, storage, engine, item_id, lease_seconds=60, max_attempts=3, limits=TEST_LIMITS
    ).outcome
    with sessions() as session:
        item = session.get(JobItem, item_id)
        assert item is not None
        return outcome, item


def stored_mask(storage: S3Storage, key: str) -> npt.NDArray[np.bool_]:
    """The mask PNG stored under ``key``, as True where it is white."""
    pixels: npt.NDArray[np.uint8] = np.asarray(Image.open(io.BytesIO(storage.get(key))))
    return np.equal(pixels, 255)
