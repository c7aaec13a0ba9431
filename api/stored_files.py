"""Images stored as a project's files: the object and its row, written
together and removed together. Shared by uploads and inline job images."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from segq.api.images import ImageInfo
from segq.clock import now_ms
from segq.file_objects import new_file_key
from segq.models import StoredFile
from segq.storage import ObjectStorage, StorageError

log = logging.getLogger(__name__)


def store_image(
    session: Session,
    storage: ObjectStorage,
    project_id: int,
    data: bytes,
    info: ImageInfo,
    *,
    external_id: str | None = None,
    name: str | None = None,
) -> StoredFile:
    """Write an inspected image to storage under a fresh key and add its row
    to ``session``; the caller commits, or discards the object."""
    key = new_file_key(project_id)
    storage.put(key, data, info.mime_type)
    now = now_ms()
    stored = StoredFile(
        project_id=project_id,
        external_id=external_id,
        name=name,
        mime_type=info.mime_type,
        size=len(data),
        width=info.width,
        height=info.height,
        sha256=info.sha256,
        storage_key=key,
        created_time=now,
        uploaded=True,
        uploaded_time=now,
        last_updated_time=now,
    )
    session.add(stored)
    return stored


def discard_objects(storage: ObjectStorage, keys: list[str]) -> None:
    """Best-effort removal of objects whose rows were never committed (or
    were just deleted): an orphan object is harmless, a failed request is not."""
    for key in keys:
        try:
            storage.delete(key)
        except StorageError:
            log.warning("could not remove orphaned object %s", key)
