"""``segq doctor``: compares the bucket with the database, both ways.

- Objects no row names: a job's or a file's objects left by a crash between
  deleting objects and rows, by an attempt that lost its lease and kept
  writing, or by a failed clean-up. Objects younger than a grace period are
  left out: an upload or an attempt writes its object before it commits
  the row that names it.
- Rows whose objects are gone: files marked uploaded whose bytes are
  missing, and finished items whose masks or logits are missing. Only rows
  written before the listing began count, so a row committed after its
  object was listed is never reported.

``repair`` deletes the orphan objects and the rows of files whose bytes are
gone (nothing can segment them; jobs that used them keep their results).
Items with missing masks are only reported: their masks cannot be remade.

The whole bucket is listed (under ``projects/``) and the keys held in
memory, about 100 bytes a key: run it from a machine that can hold the
listing, at a quiet hour.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.clock import now_ms
from segq.contract import objects_named_by_result
from segq.models import ItemStatus, JobItem, StoredFile
from segq.storage import ObjectStorage

#: Where every object of a project lies; shared embeddings (``embeddings/``)
#: have their own expiry and are no row's.
PROJECTS_PREFIX = "projects/"
#: projects/P/jobs/J/items/I/...: the item an attempt's object belongs to.
_ITEM_OBJECT = re.compile(r"^projects/\d+/jobs/(\d+)/items/(\d+)/")
#: <file key>.part<n>: a part of a multipart upload not yet completed.
_UPLOAD_PART = re.compile(r"^(.*)\.part\d+$")
#: How long an object may wait for the row that will name it.
DEFAULT_GRACE_SECONDS = 3600


@dataclass
class Findings:
    #: Objects that no row names, older than the grace period.
    orphan_objects: list[str] = field(default_factory=list)
    #: (file id, key) of files marked uploaded whose bytes are missing.
    files_without_bytes: list[tuple[int, str]] = field(default_factory=list)
    #: (item id, key) of finished items' objects that are missing.
    items_without_objects: list[tuple[int, str]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.orphan_objects or self.files_without_bytes or self.items_without_objects)


def examine(
    sessions: sessionmaker[Session],
    storage: ObjectStorage,
    *,
    grace_seconds: int = DEFAULT_GRACE_SECONDS,
) -> Findings:
    """Compare, reading only; see the module's description."""
    listing_started = now_ms()
    young_after = listing_started / 1000 - grace_seconds
    stored: dict[str, float] = {
        found.key: found.modified_time for found in storage.list_objects(PROJECTS_PREFIX)
    }
    findings = Findings()
    with sessions() as session:
        files = {
            key: (file_id, uploaded, uploaded_time)
            for file_id, key, uploaded, uploaded_time in session.execute(
                select(
                    StoredFile.id,
                    StoredFile.storage_key,
                    StoredFile.uploaded,
                    StoredFile.uploaded_time,
                )
            )
        }
        # Held beside a file's content (segq/file_objects.kept_keys holds the
        # same for the orphan sweep): an overwrite's bytes and parts on their
        # way, and the version a queued or running item was created on.
        pending = set(
            session.scalars(
                select(StoredFile.pending_storage_key).where(
                    StoredFile.pending_storage_key.is_not(None)
                )
            )
        )
        pinned = set(
            session.scalars(
                select(JobItem.file_storage_key).where(
                    JobItem.file_storage_key.is_not(None),
                    JobItem.file_id.is_not(None),
                    JobItem.status.in_((ItemStatus.QUEUED, ItemStatus.RUNNING)),
                )
            )
        )
        unfinished_items: set[tuple[int, int]] = {
            (job_id, item_id)
            for job_id, item_id in session.execute(
                select(JobItem.job_id, JobItem.id).where(
                    JobItem.status.in_((ItemStatus.QUEUED, ItemStatus.RUNNING))
                )
            )
        }
        named: set[str] = set()
        for item_id, key, finished_time in _named_objects(session):
            named.add(key)
            if key not in stored and (finished_time or 0) < listing_started:
                findings.items_without_objects.append((item_id, key))
    for key, (file_id, uploaded, uploaded_time) in files.items():
        if uploaded and key not in stored and (uploaded_time or 0) < listing_started:
            findings.files_without_bytes.append((file_id, key))
    for key, modified_time in sorted(stored.items()):
        if key in named or key in files or key in pending or key in pinned:
            continue
        # Storage's clock is not ours; a grace of 0 must protect nothing.
        if grace_seconds > 0 and modified_time > young_after:
            continue
        item = _ITEM_OBJECT.match(key)
        if item is not None and (int(item.group(1)), int(item.group(2))) in unfinished_items:
            continue  # an attempt still running writes before it completes
        part = _UPLOAD_PART.match(key)
        if part is not None and (
            part.group(1) in pending or (part.group(1) in files and not files[part.group(1)][1])
        ):
            continue  # a multipart upload not yet completed
        findings.orphan_objects.append(key)
    return findings


def _named_objects(session: Session) -> Iterator[tuple[int, str, int | None]]:
    """(item id, key, finished time) of every object items' results name."""
    rows = session.execute(
        select(JobItem.id, JobItem.result, JobItem.finished_time)
        .where(JobItem.result.is_not(None))
        .execution_options(yield_per=1000)
    )
    for item_id, result, finished_time in rows:
        for key in objects_named_by_result(result):
            yield item_id, key, finished_time


def repair(sessions: sessionmaker[Session], storage: ObjectStorage, findings: Findings) -> None:
    """Delete the orphan objects, then the rows of files whose bytes are
    gone (each checked again: a file re-uploaded meanwhile is kept)."""
    storage.delete_many(findings.orphan_objects)
    if not findings.files_without_bytes:
        return
    with sessions.begin() as session:
        # In id order, as every lock on several files is taken (a request
        # naming some of them meanwhile then waits, never deadlocks).
        for file_id, key in sorted(findings.files_without_bytes):
            stored = session.get(StoredFile, file_id, with_for_update=True)
            if stored is not None and stored.storage_key == key:
                session.delete(stored)
