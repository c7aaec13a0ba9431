"""Deleting jobs and files for good: their stored objects first, then their
rows, in the caller's transaction.

Objects go first so that a crash between the two leaves rows that name
objects already gone, which the next DELETE or retention pass finds and
finishes, never objects that no row names (only a listing of the whole
bucket, ``segq doctor``, finds those).

Where a job's objects are (worker/results.py writes them): every object of
job J of project P lies under ``projects/P/jobs/J/``. A completed item's
row names each object of the attempt that completed it; other attempts
(one that lost its lease, one that failed halfway) may have left objects no
row names, so the jobs that had such attempts are listed under their prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from segq.contract import objects_named_by_result
from segq.file_objects import upload_parts
from segq.models import (
    ItemStatus,
    Job,
    JobItem,
    StoredFile,
    WebhookAttempt,
    WebhookDelivery,
)
from segq.storage import ObjectStorage


def job_objects_prefix(project_id: int, job_id: int) -> str:
    """The prefix every object of the job is stored under (the trailing
    slash keeps job 1 from matching job 12)."""
    return f"projects/{project_id}/jobs/{job_id}/"


def may_hold_unnamed_objects(status: str, attempt: int) -> bool:
    """Whether an item's attempts may have left objects its row does not
    name: any attempt but a single one that completed."""
    return attempt > 1 or (attempt == 1 and status != ItemStatus.COMPLETED)


def delete_jobs(
    session: Session,
    storage: ObjectStorage,
    jobs: Sequence[tuple[int, int]],
    *,
    list_every_job: bool = False,
) -> int:
    """Delete ``jobs`` ((project id, job id) pairs, finished, their rows
    locked by the caller) with their items, webhook deliveries and every
    stored object; the caller commits. Storage errors propagate before any
    row is touched. Returns the number of objects deleted.

    ``list_every_job``: list each job's prefix, not only those whose items
    may hold unnamed objects: one request more per job, which a client's
    DELETE of one job can afford and a sweep of thousands need not."""
    if not jobs:
        return 0
    job_ids = [job_id for _, job_id in jobs]
    project_of = {job_id: project_id for project_id, job_id in jobs}
    keys: set[str] = set()
    to_list: set[int] = set()
    rows = session.execute(
        select(JobItem.job_id, JobItem.status, JobItem.attempt, JobItem.result).where(
            JobItem.job_id.in_(job_ids)
        )
    )
    for job_id, status, attempt, result in rows:
        keys.update(objects_named_by_result(result))
        if list_every_job or may_hold_unnamed_objects(status, attempt):
            to_list.add(job_id)
    for job_id in sorted(to_list):
        prefix = job_objects_prefix(project_of[job_id], job_id)
        keys.update(stored.key for stored in storage.list_objects(prefix))
    storage.delete_many(sorted(keys))
    delivery_ids = select(WebhookDelivery.id).where(WebhookDelivery.job_id.in_(job_ids))
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(delivery_ids)))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(job_ids)))
    session.execute(delete(JobItem).where(JobItem.job_id.in_(job_ids)))
    session.execute(delete(Job).where(Job.id.in_(job_ids)))
    return len(keys)


def file_object_keys(storage: ObjectStorage, stored: StoredFile) -> list[str]:
    """The file's bytes, an overwrite's bytes on their way, and the parts of
    a multipart upload to either that was never completed
    (``<key>.part<n>``)."""
    keys = [stored.storage_key]
    uploading = [stored.pending_storage_key] if stored.pending_storage_key else []
    if not stored.uploaded:
        uploading.append(stored.storage_key)
    keys += [key for key in uploading if key != stored.storage_key]
    keys += [part for key in uploading for part in upload_parts(storage, key)]
    return keys


def delete_files(session: Session, storage: ObjectStorage, files: Sequence[StoredFile]) -> int:
    """Delete ``files`` (rows the caller holds) and their objects; the
    caller commits. Items made from them keep their results: their
    ``file_id`` becomes NULL (the foreign key says so). Returns the number
    of objects deleted."""
    keys = sorted({key for stored in files for key in file_object_keys(storage, stored)})
    storage.delete_many(keys)
    for stored in files:
        session.delete(stored)
    return len(keys)
