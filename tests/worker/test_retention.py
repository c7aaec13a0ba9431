"""Retention: the sweeper deletes finished jobs and files past their bounds,
objects first, in bounded batches, one sweeper at a time, and never what is
younger or still in use."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from segq.clock import now_ms
from segq.deletion import job_objects_prefix
from segq.models import DeliveryStatus, Job, JobItem, StoredFile, WebhookDelivery
from segq.projects import create_project
from segq.settings import Settings, SettingsError
from segq.storage import S3Storage
from segq.worker.retention import DAY_MS, RETENTION_LOCK_KEY, sweep_expired

OLD_JOBS = 4000
YOUNG_JOBS = 1000
#: Jobs of each age that also get a stored mask (putting 5,000 objects
#: into moto would take a minute; the rows are what is bulk).
WITH_OBJECTS = 150


def mask_key(project_id: int, job_id: int, item_id: int, attempt: int = 1) -> str:
    return job_objects_prefix(project_id, job_id) + f"items/{item_id}/attempt-{attempt}/mask-0.png"


def fill(
    sessions: sessionmaker[Session],
    project_id: int,
    count: int,
    status_time: int,
    *,
    status: str = "Completed",
    item_status: str = "Completed",
) -> list[tuple[int, int]]:
    """``count`` jobs of one item each, bulk-inserted; (job id, item id) pairs."""
    job_rows = [
        {
            "project_id": project_id,
            "status": status,
            "created_time": status_time - 1000,
            "status_time": status_time,
            "prompt": {"points": [], "boundingBox": None},
            "options": {},
        }
        for _ in range(count)
    ]
    with sessions.begin() as session:
        job_ids = list(session.scalars(insert(Job).returning(Job.id), job_rows))
        item_rows = [
            {
                "job_id": job_id,
                "position": 0,
                "file_ref": {"fileId": 1},
                "status": item_status,
                "attempt": 1,
                "result": None,
            }
            for job_id in job_ids
        ]
        item_ids = list(session.scalars(insert(JobItem).returning(JobItem.id), item_rows))
    return list(zip(job_ids, item_ids, strict=True))


def store_masks(
    sessions: sessionmaker[Session],
    storage: S3Storage,
    project_id: int,
    pairs: list[tuple[int, int]],
) -> list[str]:
    """A mask per item, named by the item's result as a worker would."""
    keys = [mask_key(project_id, job_id, item_id) for job_id, item_id in pairs]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: storage.put(key, b"png", "image/png"), keys))
    with sessions.begin() as session:
        for (_, item_id), key in zip(pairs, keys, strict=True):
            item = session.get(JobItem, item_id)
            assert item is not None
            item.result = {"width": 1, "height": 1, "segments": [{"maskKey": key}]}
    return keys


def count(sessions: sessionmaker[Session], model: Any, *where: Any) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def existing(storage: S3Storage, keys: list[str], project_id: int) -> set[str]:
    stored = {found.key for found in storage.list_objects(f"projects/{project_id}/")}
    return stored & set(keys)


def new_project(sessions: sessionmaker[Session]) -> int:
    """A project's id, in the emptied database."""
    with sessions.begin() as session:
        project, _ = create_project(session, "acme")
        return project.id


def test_a_sweep_deletes_what_is_old_and_nothing_younger(
    sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    project_id = new_project(sessions)
    now = now_ms()
    old = fill(sessions, project_id, OLD_JOBS, now - 40 * DAY_MS)
    young = fill(sessions, project_id, YOUNG_JOBS, now - 29 * DAY_MS)
    old_keys = store_masks(sessions, storage, project_id, old[:WITH_OBJECTS])
    young_keys = store_masks(sessions, storage, project_id, young[:WITH_OBJECTS])
    # An old item that failed halfway: its object is named by no row, and is
    # found by listing the job's prefix.
    failed = fill(sessions, project_id, 1, now - 40 * DAY_MS, status="Failed", item_status="Failed")
    stray = mask_key(project_id, *failed[0])
    storage.put(stray, b"half", "image/png")
    # Old, but still in use: a canceled job with an item still running, and
    # a job whose webhook event is not yet delivered.
    running = fill(
        sessions, project_id, 1, now - 40 * DAY_MS, status="Canceled", item_status="Running"
    )
    pending = fill(sessions, project_id, 1, now - 40 * DAY_MS)
    with sessions.begin() as session:
        session.add(
            WebhookDelivery(
                job_id=pending[0][0],
                project_id=project_id,
                event_type="job.completed",
                url="https://receiver.example/hook",
                message_id="msg_pending",
                body="{}",
                created_time=now,
                status=DeliveryStatus.PENDING,
            )
        )
    assert count(sessions, Job) == OLD_JOBS + YOUNG_JOBS + 3

    # Bounded batches: one pass of two batches of 500 deletes 1,000 jobs.
    first = sweep_expired(
        sessions,
        storage,
        job_retention_days=30,
        file_retention_days=None,
        batch_size=500,
        batches=2,
    )
    assert first.jobs == 1000
    assert count(sessions, Job) == OLD_JOBS + YOUNG_JOBS + 3 - 1000

    rest = sweep_expired(
        sessions,
        storage,
        job_retention_days=30,
        file_retention_days=None,
        batch_size=500,
        batches=100,
    )
    assert first.jobs + rest.jobs == OLD_JOBS + 1
    assert first.objects + rest.objects == WITH_OBJECTS + 1
    assert count(sessions, Job) == YOUNG_JOBS + 2
    assert count(sessions, JobItem) == YOUNG_JOBS + 2
    assert count(sessions, Job, Job.id.in_([job_id for job_id, _ in old])) == 0
    assert count(sessions, Job, Job.id.in_([job_id for job_id, _ in young])) == YOUNG_JOBS
    assert count(sessions, Job, Job.id.in_([running[0][0], pending[0][0]])) == 2
    assert existing(storage, [*old_keys, stray], project_id) == set()
    assert existing(storage, young_keys, project_id) == set(young_keys)
    # Nothing left to do: a further pass deletes nothing.
    again = sweep_expired(
        sessions, storage, job_retention_days=30, file_retention_days=None, batch_size=500
    )
    assert again.jobs == 0


def test_files_past_retention_go_unless_an_item_is_about_to_read_them(
    sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    project_id = new_project(sessions)
    now = now_ms()

    def stored_file(name: str, age_days: int) -> StoredFile:
        key = f"projects/{project_id}/files/{name}"
        storage.put(key, b"image", "image/png")
        return StoredFile(
            project_id=project_id,
            storage_key=key,
            created_time=now - age_days * DAY_MS,
            uploaded=True,
        )

    with sessions.begin() as session:
        old, young, in_use = (
            stored_file("old", 10),
            stored_file("young", 1),
            stored_file("in-use", 10),
        )
        session.add_all([old, young, in_use])
        session.flush()
        file_ids = (old.id, young.id, in_use.id)
    queued = fill(sessions, project_id, 1, now, status="Queued", item_status="Queued")
    with sessions.begin() as session:
        item = session.get(JobItem, queued[0][1])
        assert item is not None
        item.file_id = file_ids[2]

    swept = sweep_expired(sessions, storage, job_retention_days=None, file_retention_days=7)
    assert (swept.files, swept.objects) == (1, 1)
    with sessions() as session:
        left = set(session.scalars(select(StoredFile.id)))
    assert left == {file_ids[1], file_ids[2]}
    keys = {found.key for found in storage.list_objects(f"projects/{project_id}/files/")}
    assert keys == {f"projects/{project_id}/files/young", f"projects/{project_id}/files/in-use"}


def test_one_sweeper_at_a_time(sessions: sessionmaker[Session], storage: S3Storage) -> None:
    project_id = new_project(sessions)
    fill(sessions, project_id, 3, now_ms() - 40 * DAY_MS)
    with sessions.begin() as other_worker:
        other_worker.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": RETENTION_LOCK_KEY}
        )
        busy = sweep_expired(sessions, storage, job_retention_days=30, file_retention_days=None)
        assert busy.jobs == 0
    free = sweep_expired(sessions, storage, job_retention_days=30, file_retention_days=None)
    assert free.jobs == 3


def test_retention_settings_are_off_by_default_and_checked() -> None:
    assert (
        Settings.from_env({"SEGQ_DATA_DIR": "/tmp/x", "SEGQ_SECRET_KEY": "k"}).job_retention_days
        is None
    )
    settings = Settings.from_env(
        {
            "SEGQ_DATA_DIR": "/tmp/x",
            "SEGQ_SECRET_KEY": "k",
            "SEGQ_JOB_RETENTION_DAYS": "30",
            "SEGQ_FILE_RETENTION_DAYS": "7",
        }
    )
    assert (settings.job_retention_days, settings.file_retention_days) == (30, 7)
    for bad in ("0", "-1", "thirty"):
        with pytest.raises(SettingsError, match="SEGQ_JOB_RETENTION_DAYS"):
            Settings.from_env({"SEGQ_SECRET_KEY": "k", "SEGQ_JOB_RETENTION_DAYS": bad})
