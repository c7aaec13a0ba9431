"""Where a project's files live in object storage, and the sweep of what no
file holds any more.

A file's content is one object, ``projects/<project>/files/<random hex>``;
an overwrite gives the file a fresh key, so a key names one version of one
file for ever. The parts of a multipart upload wait beside it as
``<key>.part<n>`` until the upload is completed.

Objects are written before the rows that name them are committed; a
deleted file's objects go before its row (segq/deletion.py), and an
overwritten version's after the row moved on, best effort: a crash, a
storage error or a multipart upload never completed leaves objects that
nothing names. The sweep removes those once they are old enough that
no request can still be about to name them, and keeps an overwritten
version while a queued or running item was created on it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.models import ItemStatus, JobItem, Project, StoredFile
from segq.storage import ObjectStorage, StorageError

log = logging.getLogger(__name__)

_PART_SUFFIX = re.compile(r"\.part\d+$")
#: Keys asked about in one query.
_BATCH = 500


def new_file_key(project_id: int) -> str:
    return f"projects/{project_id}/files/{uuid.uuid4().hex}"


def part_key(file_key: str, part: int) -> str:
    return f"{file_key}.part{part}"


def files_prefix(project_id: int) -> str:
    return f"projects/{project_id}/files/"


def upload_parts(storage: ObjectStorage, file_key: str) -> list[str]:
    """The keys of the parts waiting under ``file_key``."""
    return [stored.key for stored in storage.list_objects(f"{file_key}.part")]


def discard_upload_parts(storage: ObjectStorage, file_key: str) -> None:
    """Best-effort removal of the parts of an upload to ``file_key`` never
    completed: what fails is the sweep's to remove."""
    try:
        for stale in upload_parts(storage, file_key):
            storage.delete(stale)
    except StorageError:
        log.warning("could not remove the parts of %s; the orphan sweep will", file_key)


def discard_file_objects(storage: ObjectStorage, keys: Iterable[str]) -> None:
    """Best-effort removal of the contents under ``keys`` and their parts."""
    for key in keys:
        try:
            storage.delete(key)
        except StorageError:
            log.warning("could not remove %s; the orphan sweep will", key)
        discard_upload_parts(storage, key)


def kept_keys(session: Session, keys: list[str]) -> set[str]:
    """Those of ``keys`` that must stay: a file's content now, an
    overwrite's content on its way, or the version a queued or running item
    of a file that still exists was created on."""
    held = set(
        session.scalars(select(StoredFile.storage_key).where(StoredFile.storage_key.in_(keys)))
    )
    uploading = session.scalars(
        select(StoredFile.pending_storage_key).where(StoredFile.pending_storage_key.in_(keys))
    )
    pinned = session.scalars(
        select(JobItem.file_storage_key).where(
            JobItem.file_storage_key.in_(keys),
            JobItem.file_id.is_not(None),
            JobItem.status.in_((ItemStatus.QUEUED, ItemStatus.RUNNING)),
        )
    )
    return held | {key for key in [*uploading, *pinned] if key is not None}


def sweep_orphaned_file_objects(
    sessions: sessionmaker[Session], storage: ObjectStorage, older_than_seconds: float
) -> int:
    """Delete the objects under every project's files that are older than
    ``older_than_seconds`` and that no file or unfinished item holds, and
    every part that old (its upload had that long to be completed). Returns
    how many were deleted."""
    cutoff = time.time() - older_than_seconds
    with sessions() as session:
        project_ids = list(session.scalars(select(Project.id)))
    deleted = 0
    for project_id in project_ids:
        old = [
            stored.key
            for stored in storage.list_objects(files_prefix(project_id))
            if stored.modified_time < cutoff
        ]
        parts = [key for key in old if _PART_SUFFIX.search(key)]
        contents = [key for key in old if not _PART_SUFFIX.search(key)]
        unheld: list[str] = []
        for start in range(0, len(contents), _BATCH):
            batch = contents[start : start + _BATCH]
            with sessions() as session:
                kept = kept_keys(session, batch)
            unheld += [key for key in batch if key not in kept]
        for key in parts + unheld:
            storage.delete(key)
            deleted += 1
    if deleted:
        log.info("orphan sweep: deleted %d objects no file holds", deleted)
    return deleted
