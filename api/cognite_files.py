"""Cognite's Files API over a project's stored files, with no Flask in it:
file metadata created first and its bytes PUT later to a signed upload URL,
lookups by id, externalId or instanceId, filtered listing, counting,
updates, deletion and download links. Refusals are ApiErrors in Cognite's
shape (``missing``, ``duplicated``), which its SDK turns into its own
exception classes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from itsdangerous import BadSignature
from pydantic import ValidationError
from sqlalchemy import (
    ColumnElement,
    case,
    exists,
    func,
    or_,
    select,
    true,
    tuple_,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from segq.api.errors import ApiError, FieldPath
from segq.api.images import inspect_image
from segq.api.public_links import public_link
from segq.api.schemas import (
    DESCRIPTIVE_FILE_FIELDS,
    DESCRIPTIVE_LIST_ADAPTERS,
    STORED_METADATA,
    FileChanges,
    FileCreation,
    FileFilter,
    FileIdentifier,
    FileResponse,
    InstanceIdBody,
    TimeRange,
    partition_of,
    validation_refusal,
)
from segq.api.signed_tokens import SignedTokens
from segq.clock import now_ms
from segq.file_objects import new_file_key, part_key
from segq.models import StoredFile
from segq.served_objects import UNKNOWN_TYPE
from segq.settings import Settings
from segq.storage import ObjectNotFound, ObjectStorage

#: Where upload URLs point; outside /projects/<project>: the signature is the key.
UPLOAD_ROUTE = "/api/v1/files/upload/"
_UPLOAD_SALT = "segq.file-upload"


def file_response(stored: StoredFile) -> FileResponse:
    """The file's body; what is learnt from the bytes only once they are there."""
    fields: dict[str, Any] = {
        "id": stored.id,
        "externalId": stored.external_id,
        "name": stored.name,
        "mimeType": stored.mime_type,
        "uploaded": stored.uploaded,
        "createdTime": stored.created_time,
        "lastUpdatedTime": stored.last_updated_time or stored.created_time,
    }
    if stored.instance_space is not None and stored.instance_external_id is not None:
        fields["instanceId"] = InstanceIdBody(
            space=stored.instance_space, externalId=stored.instance_external_id
        )
    if stored.file_metadata is not None:
        fields["metadata"] = stored.file_metadata
    fields |= stored.descriptive_fields or {}
    if stored.uploaded:
        fields |= {
            "uploadedTime": stored.uploaded_time or stored.created_time,
            "size": stored.size,
            "width": stored.width,
            "height": stored.height,
            "sha256": stored.sha256,
        }
    return FileResponse(**fields)


def identifier_body(identifier: FileIdentifier) -> dict[str, Any]:
    """The identifier as the client sent it, for ``missing`` and ``duplicated``."""
    return identifier.model_dump(exclude_none=True)


def create_file(
    session: Session, project_id: int, creation: FileCreation, *, overwrite: bool
) -> tuple[StoredFile, str | None]:
    """Add the file ``creation`` describes, not yet uploaded, and commit. A
    reused externalId or instanceId is a 409 naming it, unless ``overwrite``;
    then the file keeps its id, takes the new metadata and waits for new
    bytes under a new key: as in Cognite, uploaded content stays the file's
    content until the new bytes have arrived whole. Returns the file and the
    key it no longer uploads to (the parts of an earlier upload there), for
    the caller to discard."""
    duplicated: list[dict[str, Any]] = []
    # The rows for update: an upload's PUT committing the file's bytes
    # meanwhile must be seen (decided on an older row, an overwrite would
    # leave the file uploaded with a key that holds nothing). Both
    # identifiers in one lookup, which locks in one order.
    named = [
        FileIdentifier(externalId=creation.externalId) if creation.externalId is not None else None,
        FileIdentifier(instanceId=creation.instanceId) if creation.instanceId is not None else None,
    ]
    found = iter(
        lookup_files(session, project_id, [one for one in named if one is not None], lock="update")
    )
    by_external_id, by_instance = (next(found) if one is not None else None for one in named)
    if by_external_id is not None:
        duplicated.append({"externalId": creation.externalId})
    existing = by_external_id
    if by_instance is not None:
        assert creation.instanceId is not None
        duplicated.append({"instanceId": creation.instanceId.model_dump()})
        if existing is not None and existing.id != by_instance.id:
            raise ApiError(
                409, "externalId and instanceId name different files", duplicated=duplicated
            )
        existing = by_instance
    if existing is not None and not overwrite:
        raise ApiError(409, "a file with that identifier exists", duplicated=duplicated)
    now = now_ms()
    old_key: str | None = None
    stored = existing
    if stored is None:
        stored = StoredFile(project_id=project_id, created_time=now)
        session.add(stored)
    else:
        # The content stays; what was uploading to the file does not.
        old_key = stored.pending_storage_key if stored.uploaded else stored.storage_key
    stored.external_id = creation.externalId
    stored.name = creation.name
    stored.file_metadata = creation.metadata
    described = creation.model_dump(include=set(DESCRIPTIVE_FILE_FIELDS), exclude_none=True)
    # An empty list is kept as an update leaves one: not at all.
    stored.descriptive_fields = {
        field: value for field, value in described.items() if value != []
    } or None
    stored.instance_space = creation.instanceId.space if creation.instanceId else None
    stored.instance_external_id = creation.instanceId.externalId if creation.instanceId else None
    stored.last_updated_time = now
    if stored.uploaded:
        # The content's own type stays until other content replaces it.
        stored.pending_storage_key = new_file_key(project_id)
    else:
        stored.mime_type = creation.mimeType
        stored.storage_key = new_file_key(project_id)
        stored.uploaded = False
        stored.uploaded_time = None
        stored.size = stored.width = stored.height = None
        stored.sha256 = None
    commit_or_conflict(session, duplicated or _creation_identifiers(creation))
    return stored, old_key


def upload_key(stored: StoredFile) -> str:
    """Where bytes sent to the file go now: the new content an overwrite
    waits for, else the file's content."""
    return stored.pending_storage_key or stored.storage_key


def _creation_identifiers(creation: FileCreation) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if creation.externalId is not None:
        found.append({"externalId": creation.externalId})
    if creation.instanceId is not None:
        found.append({"instanceId": creation.instanceId.model_dump()})
    return found


def commit_or_conflict(session: Session, identifiers: list[dict[str, Any]]) -> None:
    """Commit; a unique identifier taken meanwhile by another request is a 409."""
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ApiError(409, "a file with that identifier exists", duplicated=identifiers) from None


@dataclass(frozen=True)
class UploadTarget:
    """What an upload URL names: a file, locked for the upload, and which
    part of a multipart upload (None: the whole file)."""

    stored: StoredFile
    part: int | None


@dataclass(frozen=True)
class UploadLinks:
    """Signs and reads the upload URLs of files: a URL names one file of one
    project (and its storage key, which an overwrite changes), the part of a
    multipart upload if any, and an expiry, under the server's secret key."""

    secret_key: str
    #: The API's root as clients reach it (SEGQ_PUBLIC_URL).
    public_url: str | None
    expires_seconds: int

    def _serializer(self) -> SignedTokens:
        return SignedTokens(self.secret_key, salt=_UPLOAD_SALT)

    def url_for(
        self, stored: StoredFile, *, part: int | None = None, expires_time: int | None = None
    ) -> str:
        expires = (
            expires_time if expires_time is not None else now_ms() + self.expires_seconds * 1000
        )
        token = self._serializer().dumps(
            [stored.project_id, stored.id, upload_key(stored), expires, part]
        )
        return public_link(self.public_url, UPLOAD_ROUTE + str(token))

    def upload_id(self, stored: StoredFile, parts: int) -> str:
        """The multipart upload's id: which file, under which key, in how many parts."""
        return str(
            self._serializer().dumps([stored.project_id, stored.id, upload_key(stored), parts])
        )

    def multipart_upload(self, stored: StoredFile, upload_id: str) -> int:
        """The number of parts of ``upload_id``, if it is ``stored``'s current one; else 400."""
        try:
            project_id, file_id, storage_key, parts = self._serializer().loads(upload_id)
        except (BadSignature, ValueError, TypeError):
            raise ApiError(400, "uploadId is not valid") from None
        if (project_id, file_id, storage_key) != (
            stored.project_id,
            stored.id,
            upload_key(stored),
        ) or not isinstance(parts, int):
            raise ApiError(400, "uploadId is not this file's multipart upload")
        return parts

    def target_of(self, session: Session, token: str) -> UploadTarget:
        """What ``token`` was signed for, the file locked for the upload; 403
        for a token that is not ours or has expired, 404 for a file gone or
        reset since (an overwrite gives it a new storage key)."""
        try:
            project_id, file_id, storage_key, expires, part = self._serializer().loads(token)
        except (BadSignature, ValueError, TypeError):
            raise ApiError(403, "this upload URL is not valid") from None
        if not isinstance(expires, int) or expires < now_ms():
            raise ApiError(403, "this upload URL has expired")
        stored = session.scalar(
            select(StoredFile)
            .where(StoredFile.id == file_id, StoredFile.project_id == project_id)
            .with_for_update()
        )
        if stored is None or upload_key(stored) != storage_key:
            raise ApiError(404, "the file of this upload URL no longer exists")
        return UploadTarget(stored, part if isinstance(part, int) else None)


def receive_part(
    session: Session, storage: ObjectStorage, target: UploadTarget, data: bytes
) -> None:
    """Keep one part of a multipart upload until the upload is completed."""
    assert target.part is not None
    if _holds_its_last_upload(target.stored):
        raise ApiError(409, f"file {target.stored.id} is already uploaded")
    storage.put(part_key(upload_key(target.stored), target.part), data, UNKNOWN_TYPE)
    session.rollback()


def _holds_its_last_upload(stored: StoredFile) -> bool:
    return stored.uploaded and stored.pending_storage_key is None


def complete_multipart_upload(
    session: Session,
    storage: ObjectStorage,
    stored: StoredFile,
    parts: int,
    settings: Settings,
) -> tuple[StoredFile, str | None]:
    """Join the parts, in order, and receive them as the file's bytes (see
    receive_upload). Completing again once the file holds its bytes under
    the upload's key (the caller checked the upload id names it) is a
    retry of the completion that put them there: it changes nothing and
    succeeds as that one did, though its parts are gone."""
    if _holds_its_last_upload(stored):
        session.rollback()
        return stored, None
    chunks: list[bytes] = []
    size = 0
    for part in range(parts):
        try:
            chunk = storage.get(part_key(upload_key(stored), part))
        except ObjectNotFound:
            raise ApiError(400, f"part {part} of file {stored.id} was not uploaded") from None
        size += len(chunk)
        if size > settings.max_upload_bytes:
            raise ApiError(413, f"file is larger than {settings.max_upload_bytes} bytes")
        chunks.append(chunk)
    return receive_upload(session, storage, stored, b"".join(chunks), settings)


def part_keys(stored: StoredFile, parts: int) -> list[str]:
    return [part_key(upload_key(stored), part) for part in range(parts)]


def receive_upload(
    session: Session,
    storage: ObjectStorage,
    stored: StoredFile,
    data: bytes,
    settings: Settings,
) -> tuple[StoredFile, str | None]:
    """Store ``data`` as the file's bytes after the same checks as any
    upload (decoded, sized, pixels counted), and mark it uploaded; after an
    overwrite, they replace its content in the same commit. The same bytes
    again change nothing; other bytes for a file that holds its last upload
    are a 409. Returns the file and the key of the content it replaced, for
    the caller to discard."""
    info = inspect_image(data, settings)
    if _holds_its_last_upload(stored):
        if stored.sha256 == info.sha256:
            session.rollback()
            return stored, None
        raise ApiError(409, f"file {stored.id} is already uploaded")
    key = upload_key(stored)
    storage.put(key, data, info.mime_type)
    replaced = stored.storage_key if stored.pending_storage_key is not None else None
    stored.storage_key = key
    stored.pending_storage_key = None
    now = now_ms()
    stored.mime_type = info.mime_type
    stored.size = len(data)
    stored.width = info.width
    stored.height = info.height
    stored.sha256 = info.sha256
    stored.uploaded = True
    stored.uploaded_time = now
    stored.last_updated_time = now
    session.commit()
    return stored, replaced


#: How files named by a request are locked: for update (the request changes
#: or deletes them), in share mode (a job pins their content, which an
#: update or upload must wait for), or not at all.
FileLock = Literal["update", "share"] | None


def lookup_files(
    session: Session,
    project_id: int,
    identifiers: Sequence[FileIdentifier],
    *,
    lock: FileLock = None,
) -> list[StoredFile | None]:
    """The file each identifier names, in the order named, None where none.

    Rows are locked in one statement, in the order of their ids, whatever
    the order named: two requests naming the same files in other orders
    then wait for each other rather than deadlock, and so does every other
    lock on several files (jobs pin theirs here too). Under READ COMMITTED a
    row waited for is read again once free; one whose identifier has moved
    meanwhile is no longer found, as it would not be if read after."""
    ids: set[int] = set()
    external_ids: set[str] = set()
    instance_ids: set[tuple[str, str]] = set()
    for index, identifier in enumerate(identifiers):
        _check_one_identifier(identifier, index)
        if identifier.id is not None:
            ids.add(identifier.id)
        elif identifier.externalId is not None:
            external_ids.add(identifier.externalId)
        elif identifier.instanceId is not None:
            instance_ids.add((identifier.instanceId.space, identifier.instanceId.externalId))
    named: list[ColumnElement[bool]] = []
    if ids:
        named.append(StoredFile.id.in_(sorted(ids)))
    if external_ids:
        named.append(StoredFile.external_id.in_(sorted(external_ids)))
    if instance_ids:
        named.append(
            tuple_(StoredFile.instance_space, StoredFile.instance_external_id).in_(
                sorted(instance_ids)
            )
        )
    if not named:
        return []
    query = (
        select(StoredFile)
        .where(StoredFile.project_id == project_id, or_(*named))
        .order_by(StoredFile.id)
        # What this transaction read before must not hide what the lock waited for.
        .execution_options(populate_existing=True)
    )
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    rows = list(session.scalars(query))
    by_id = {stored.id: stored for stored in rows}
    by_external_id = {stored.external_id: stored for stored in rows}
    by_instance_id = {
        (stored.instance_space, stored.instance_external_id): stored for stored in rows
    }
    found: list[StoredFile | None] = []
    for identifier in identifiers:
        if identifier.id is not None:
            found.append(by_id.get(identifier.id))
        elif identifier.externalId is not None:
            found.append(by_external_id.get(identifier.externalId))
        else:
            assert identifier.instanceId is not None
            instance = identifier.instanceId
            found.append(by_instance_id.get((instance.space, instance.externalId)))
    return found


def find_files(
    session: Session,
    project_id: int,
    identifiers: Sequence[FileIdentifier],
    *,
    ignore_unknown: bool = False,
    lock: FileLock = None,
) -> list[tuple[FileIdentifier, StoredFile]]:
    """The files named, in the order named; unknown ones are a 400 listing
    them all in ``missing``, or left out with ``ignore_unknown``. Locked
    as lookup_files locks them."""
    found: list[tuple[FileIdentifier, StoredFile]] = []
    missing: list[dict[str, Any]] = []
    for identifier, stored in zip(
        identifiers, lookup_files(session, project_id, identifiers, lock=lock), strict=True
    ):
        if stored is None:
            missing.append(identifier_body(identifier))
        else:
            found.append((identifier, stored))
    if missing and not ignore_unknown:
        raise ApiError(400, "files not found", missing=missing)
    return found


def _check_one_identifier(identifier: FileIdentifier, index: int) -> None:
    given = [
        field
        for field in ("id", "externalId", "instanceId")
        if getattr(identifier, field) is not None
    ]
    if len(given) != 1:
        raise ApiError(400, f"items[{index}] must have exactly one of id, externalId, instanceId")


def _filter_conditions(
    session: Session, project_id: int, file_filter: FileFilter | None
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [StoredFile.project_id == project_id]
    if file_filter is None:
        return conditions
    if file_filter.name is not None:
        conditions.append(StoredFile.name == file_filter.name)
    dialect = session.get_bind().dialect.name
    for key, value in (file_filter.metadata or {}).items():
        conditions.append(_has_pair(dialect, key, value))
    if file_filter.assetIds is not None:
        conditions.append(_holds_any(dialect, "assetIds", file_filter.assetIds))
    if file_filter.dataSetIds is not None:
        conditions.append(
            # An id may pass Postgres's 32-bit integer: NUMERIC holds any.
            StoredFile.descriptive_fields["dataSetId"]
            .as_numeric(16, 0)
            .in_([data_set.id for data_set in file_filter.dataSetIds])
        )
    if file_filter.labels is not None:
        labels = file_filter.labels
        if labels.containsAny is not None:
            conditions.append(
                _holds_any(dialect, "labels", [label.model_dump() for label in labels.containsAny])
            )
        for label in labels.containsAll or []:
            conditions.append(_holds_any(dialect, "labels", [label.model_dump()]))
    if file_filter.externalIdPrefix is not None:
        # startswith with autoescape: % and _ in the prefix are literal.
        conditions.append(
            StoredFile.external_id.startswith(file_filter.externalIdPrefix, autoescape=True)
        )
    if file_filter.mimeType is not None:
        conditions.append(StoredFile.mime_type == file_filter.mimeType)
    if file_filter.uploaded is not None:
        conditions.append(StoredFile.uploaded == file_filter.uploaded)
    descriptive = StoredFile.descriptive_fields
    if file_filter.source is not None:
        conditions.append(descriptive["source"].as_string() == file_filter.source)
    if file_filter.directoryPrefix is not None:
        conditions.append(
            descriptive["directory"]
            .as_string()
            .startswith(file_filter.directoryPrefix, autoescape=True)
        )
    for column, time_range in (
        (StoredFile.created_time, file_filter.createdTime),
        (
            func.coalesce(StoredFile.last_updated_time, StoredFile.created_time),
            file_filter.lastUpdatedTime,
        ),
        (StoredFile.uploaded_time, file_filter.uploadedTime),
        # Milliseconds overflow Postgres's 32-bit integer: NUMERIC holds any EpochMs.
        (descriptive["sourceCreatedTime"].as_numeric(15, 0), file_filter.sourceCreatedTime),
        (descriptive["sourceModifiedTime"].as_numeric(15, 0), file_filter.sourceModifiedTime),
    ):
        conditions.extend(_in_range(column, time_range))
    return conditions


def _has_pair(dialect: str, key: str, value: str) -> ColumnElement[bool]:
    """Whether the file's metadata maps ``key`` to ``value``. SQLite's JSON
    paths cannot name every key (a quote, escaped characters): its pairs
    are compared as json_each decodes them."""
    if dialect == "postgresql":
        maps_key: ColumnElement[bool] = StoredFile.file_metadata[key].as_string() == value
        return maps_key
    pairs = func.json_each(StoredFile.file_metadata).table_valued("key", "value")
    return exists().select_from(pairs).where(pairs.c.key == key, pairs.c.value == value)


def _holds_any(dialect: str, field: str, values: Sequence[Any]) -> ColumnElement[bool]:
    """Whether the descriptive list ``field`` holds any of ``values`` (ints,
    or labels {"externalId": ...}, matched on their externalId). JSON lists
    are searched each database's own way: containment in Postgres's JSONB,
    json_each in SQLite."""
    if dialect == "postgresql":
        listed = type_coerce(StoredFile.descriptive_fields, JSONB)[field]
        return or_(*(listed.contains([value]) for value in values))
    elements = func.json_each(StoredFile.descriptive_fields, f"$.{field}").table_valued("value")
    element: ColumnElement[Any] = elements.c.value
    wanted: list[Any] = list(values)
    if field == "labels":
        element = func.json_extract(element, "$.externalId")
        wanted = [value["externalId"] for value in values]
    return exists().select_from(elements).where(element.in_(wanted))


def _in_range(column: Any, time_range: TimeRange | None) -> list[ColumnElement[bool]]:
    if time_range is None:
        return []
    conditions: list[ColumnElement[bool]] = []
    if time_range.min is not None:
        conditions.append(column >= time_range.min)
    if time_range.max is not None:
        conditions.append(column <= time_range.max)
    return conditions


def list_files(
    session: Session,
    project_id: int,
    file_filter: FileFilter | None,
    *,
    limit: int,
    after_id: int | None,
    partition: str | None = None,
) -> tuple[list[StoredFile], int | None]:
    """One page of the files ``file_filter`` matches, oldest first (ids
    never move under a cursor), and the last id shown if there is more.
    A ``partition`` "m/n" lists the m-th of n slices, by id modulo n: the
    slices are disjoint, and together they are the whole listing."""
    conditions = _filter_conditions(session, project_id, file_filter)
    if partition is not None:
        index, count = partition_of(partition)
        conditions.append(StoredFile.id % count == index - 1 if count > 1 else true())
    if after_id is not None:
        conditions.append(StoredFile.id > after_id)
    rows = list(
        session.scalars(
            select(StoredFile).where(*conditions).order_by(StoredFile.id).limit(limit + 1)
        )
    )
    page = rows[:limit]
    return page, (page[-1].id if len(rows) > limit else None)


def search_files(
    session: Session, project_id: int, file_filter: FileFilter | None, name: str | None, limit: int
) -> list[StoredFile]:
    """Cognite's search on name, as its docs put it "prefix and fuzzy": the
    files ``file_filter`` matches whose name holds every word of ``name``,
    whatever the case; names that start with ``name`` first, then oldest
    first."""
    conditions = _filter_conditions(session, project_id, file_filter)
    query = select(StoredFile)
    if name is not None and name.strip():
        lowered = func.lower(StoredFile.name)
        conditions += [lowered.contains(word, autoescape=True) for word in name.lower().split()]
        query = query.order_by(
            case((lowered.startswith(name.lower(), autoescape=True), 0), else_=1)
        )
    return list(session.scalars(query.where(*conditions).order_by(StoredFile.id).limit(limit)))


def count_files(session: Session, project_id: int, file_filter: FileFilter | None) -> int:
    total = session.scalar(
        select(func.count())
        .select_from(StoredFile)
        .where(*_filter_conditions(session, project_id, file_filter))
    )
    return int(total or 0)


def apply_changes(stored: StoredFile, changes: FileChanges, where: FieldPath) -> None:
    """Cognite's update operations on a file's fields. Each field's value
    as it will be stored passes the check its creation passes
    (api/schemas.py's field types): the operations on one field (add,
    remove and set on metadata and the lists) are checked on their result;
    a 400 names the field under ``where``."""
    if changes.externalId is not None:
        stored.external_id = None if changes.externalId.setNull else changes.externalId.set
    if changes.name is not None:
        stored.name = changes.name.set
    if changes.mimeType is not None:
        _change_mime_type(stored, changes.mimeType.set, (*where, "mimeType"))
    if changes.metadata is not None:
        metadata = dict(stored.file_metadata or {})
        if changes.metadata.set is not None:
            metadata = dict(changes.metadata.set)
        for key in changes.metadata.remove or []:
            metadata.pop(key, None)
        metadata.update(changes.metadata.add or {})
        try:
            stored.file_metadata = STORED_METADATA.validate_python(metadata)
        except ValidationError as exc:
            raise validation_refusal(exc, (*where, "metadata")) from None
    descriptive = dict(stored.descriptive_fields or {})
    for field in DESCRIPTIVE_FILE_FIELDS:
        change = getattr(changes, field)
        if change is None:
            continue
        value: Any
        if field in DESCRIPTIVE_LIST_ADAPTERS:
            value = _changed_list(descriptive.get(field) or [], change, field, (*where, field))
        else:
            value = None if change.setNull or change.set is None else change.set
            if hasattr(value, "model_dump"):
                value = value.model_dump(exclude_none=True)
        if value is None or value == []:
            descriptive.pop(field, None)
        else:
            descriptive[field] = value
    stored.descriptive_fields = descriptive or None
    stored.last_updated_time = now_ms()


def _changed_list(current: list[Any], change: Any, field: str, where: FieldPath) -> list[Any]:
    """A list field after Cognite's set, then remove, then add: no element
    twice, in the order first given."""

    def plain(values: list[Any] | None) -> list[Any]:
        return [
            value.model_dump() if hasattr(value, "model_dump") else value for value in values or []
        ]

    result = plain(change.set) if change.set is not None else list(current)
    removed = plain(change.remove)
    result = [value for value in result if value not in removed]
    for value in plain(change.add):
        if value not in result:
            result.append(value)
    unique: list[Any] = []
    for value in result:
        if value not in unique:
            unique.append(value)
    try:
        checked = DESCRIPTIVE_LIST_ADAPTERS[field].validate_python(unique)
    except ValidationError as exc:
        raise validation_refusal(exc, where) from None
    return plain(checked)


def _change_mime_type(stored: StoredFile, mime_type: str | None, where: FieldPath) -> None:
    """A file waiting for its bytes takes the type it is given, or none.
    An uploaded file's type is its bytes' (JPEG or PNG, found on upload):
    the same type again (in any case) is no change, setNull leaves it (the
    bytes still have it), and another type is refused."""
    if not stored.uploaded:
        stored.mime_type = mime_type
        return
    if mime_type is None or mime_type.lower() == (stored.mime_type or "").lower():
        return
    raise ApiError.about(
        where,
        400,
        f": file {stored.id} holds {stored.mime_type} bytes, so its mimeType cannot be "
        f"{mime_type!r}; upload other bytes (with overwrite) to change its type",
    )
