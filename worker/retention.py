"""Retention: finished jobs and files older than the operator's bounds
(``SEGQ_JOB_RETENTION_DAYS``, ``SEGQ_FILE_RETENTION_DAYS``) are deleted,
their stored objects first, then their rows (segq/deletion.py), in batches
of bounded size, each in a transaction of its own.

Every worker's main process runs a sweeper; a Postgres advisory lock held
by each batch's transaction makes them take turns, so two workers never
list and delete the same objects at once. A batch that fails (storage or
database down) changes no row; the next pass starts it again.

Left alone, so that nothing still in use disappears: jobs with a queued or
running item, jobs with a webhook delivery still pending (its event would
be lost), and files that a queued or running item is about to read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import exists, select, text
from sqlalchemy.orm import Session, sessionmaker

from segq.clock import now_ms
from segq.deletion import delete_files, delete_jobs
from segq.models import (
    DeliveryStatus,
    ItemStatus,
    Job,
    JobItem,
    JobStatus,
    StoredFile,
    WebhookDelivery,
)
from segq.storage import ObjectStorage

log = logging.getLogger(__name__)

#: Any constant other than the reconciler's: the key of the advisory lock a
#: batch holds, so sweepers of many workers take turns.
RETENTION_LOCK_KEY = 0x5E6_0002
#: Rows per batch: one storage listing per job that may hold unnamed
#: objects, one DeleteObjects per thousand keys, one transaction.
BATCH_SIZE = 500
#: Batches per pass; a larger backlog is worked through pass by pass.
BATCHES_PER_PASS = 20
DAY_MS = 24 * 3600 * 1000

_UNFINISHED = (ItemStatus.QUEUED, ItemStatus.RUNNING)
_FINISHED = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass(frozen=True)
class Sweep:
    jobs: int = 0
    files: int = 0
    objects: int = 0

    def __add__(self, other: Sweep) -> Sweep:
        return Sweep(self.jobs + other.jobs, self.files + other.files, self.objects + other.objects)


def sweep_expired(
    sessions: sessionmaker[Session],
    storage: ObjectStorage,
    *,
    job_retention_days: int | None,
    file_retention_days: int | None,
    batch_size: int = BATCH_SIZE,
    batches: int = BATCHES_PER_PASS,
) -> Sweep:
    """One pass: up to ``batches`` batches of jobs, then of files."""
    now = now_ms()
    swept = Sweep()
    for sweep_batch, retention_days in (
        (_sweep_jobs, job_retention_days),
        (_sweep_files, file_retention_days),
    ):
        if retention_days is None:
            continue
        cutoff = now - retention_days * DAY_MS
        for _ in range(batches):
            batch = sweep_batch(sessions, storage, cutoff, batch_size)
            swept += batch
            # A batch short of rows found all that was due.
            if batch.jobs + batch.files < batch_size:
                break
    if swept.jobs or swept.files:
        log.info(
            "retention: deleted %d jobs, %d files, %d stored objects",
            swept.jobs,
            swept.files,
            swept.objects,
        )
    return swept


def _sweep_jobs(
    sessions: sessionmaker[Session], storage: ObjectStorage, cutoff: int, batch_size: int
) -> Sweep:
    with sessions.begin() as session:
        if not _take_batch_lock(session):
            return Sweep()
        expired = session.execute(
            select(Job.project_id, Job.id)
            .where(
                Job.status.in_(_FINISHED),
                Job.status_time < cutoff,
                ~exists().where(JobItem.job_id == Job.id, JobItem.status.in_(_UNFINISHED)),
                ~exists().where(
                    WebhookDelivery.job_id == Job.id,
                    WebhookDelivery.status == DeliveryStatus.PENDING,
                ),
            )
            .order_by(Job.status_time, Job.id)
            .limit(batch_size)
            .with_for_update(of=Job, skip_locked=True)
        ).all()
        jobs = [(project_id, job_id) for project_id, job_id in expired]
        objects = delete_jobs(session, storage, jobs)
    return Sweep(jobs=len(jobs), objects=objects)


def _sweep_files(
    sessions: sessionmaker[Session], storage: ObjectStorage, cutoff: int, batch_size: int
) -> Sweep:
    with sessions.begin() as session:
        if not _take_batch_lock(session):
            return Sweep()
        expired = list(
            session.scalars(
                select(StoredFile)
                .where(
                    StoredFile.created_time < cutoff,
                    ~exists().where(
                        JobItem.file_id == StoredFile.id, JobItem.status.in_(_UNFINISHED)
                    ),
                )
                .order_by(StoredFile.created_time, StoredFile.id)
                .limit(batch_size)
                .with_for_update(of=StoredFile, skip_locked=True)
            )
        )
        objects = delete_files(session, storage, expired)
    return Sweep(files=len(expired), objects=objects)


def _take_batch_lock(session: Session) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return True  # SQLite serializes writers anyway
    # Transaction-scoped: released when the batch commits or fails.
    locked = session.scalar(
        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": RETENTION_LOCK_KEY}
    )
    return bool(locked)
