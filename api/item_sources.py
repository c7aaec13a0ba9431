"""Where each item's image comes from: a stored file (by id or external id),
an image sent inline (``imageData``, stored as a file here), or a URL the
worker fetches through the URL guard."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

from sqlalchemy.orm import Session

from segq.api.cognite_files import identifier_body, lookup_files
from segq.api.errors import ApiError, FieldPath
from segq.api.images import ImageInfo, inspect_image
from segq.api.schemas import FileIdentifier, FileReference
from segq.api.service_container import Services
from segq.api.stored_files import discard_objects, store_image
from segq.models import StoredFile
from segq.url_guard import UrlRefused, check_url

#: Declared types of inline images; empty is RFC 2397's default (the bytes
#: are sniffed whatever is declared).
INLINE_MEDIA_TYPES = frozenset({"", "image/png", "image/jpeg", "image/jpg", "image/pjpeg"})


@dataclass
class ItemSources:
    """One entry per item, in order: the stored file, or the URL to fetch."""

    sources: list[StoredFile | str]
    #: Objects written for inline images; to remove if the job is not committed.
    written_keys: list[str] = field(default_factory=list)


def item_reference(source: StoredFile | str) -> dict[str, Any]:
    """What the job shows for the item."""
    if isinstance(source, str):
        return {"fileUrl": source}
    reference: dict[str, Any] = {"fileId": source.id}
    if source.external_id is not None:
        reference["fileExternalId"] = source.external_id
    if source.instance_space is not None and source.instance_external_id is not None:
        reference["fileInstanceId"] = {
            "space": source.instance_space,
            "externalId": source.instance_external_id,
        }
    return reference


def resolve_sources(
    session: Session, services: Services, project_id: int, references: list[FileReference]
) -> ItemSources:
    """Check every reference before writing anything: unknown or repeated
    files are a 400 naming them all, bad URLs and bad inline images a 400 for
    the first. Inline images are stored last, as files of the project."""
    stored = _resolve_files(session, project_id, references)
    settings = services.settings
    policy = settings.fetch_policy()
    inline: dict[int, tuple[bytes, ImageInfo]] = {}
    for index, ref in enumerate(references):
        if ref.fileUrl is not None:
            try:
                check_url(ref.fileUrl, policy)
            except UrlRefused as exc:
                raise ApiError.about(("items", index, "fileUrl"), 400, f": {exc}") from None
        elif ref.imageData is not None:
            data = decode_data_url(
                ("items", index, "imageData"), ref.imageData, settings.max_upload_bytes
            )
            inline[index] = (
                data,
                inspect_image(data, settings),
            )
    result = ItemSources(sources=[])
    try:
        for index, ref in enumerate(references):
            if ref.fileUrl is not None:
                result.sources.append(ref.fileUrl)
            elif index in inline:
                data, info = inline[index]
                file = store_image(session, services.storage, project_id, data, info)
                result.written_keys.append(file.storage_key)
                result.sources.append(file)
            else:
                result.sources.append(stored[index])
        session.flush()  # ids for the inline files
    except Exception:
        discard_objects(services.storage, result.written_keys)
        raise
    return result


def decode_data_url(field: FieldPath, value: str, max_bytes: int) -> bytes:
    """The bytes of an RFC 2397 URL, ``data:[<type>][;param=value]*[;base64],<data>``;
    ``field`` names it in refusals.

    The scheme, the type and the ``base64`` token are case-insensitive;
    base64 may be wrapped in whitespace or lack its padding; without
    ``;base64`` the data is percent-encoded. The declared type must be one
    segq reads, or left out: the bytes decide what the image really is."""
    header, comma, data = value.partition(",")
    if not comma or header[:5].lower() != "data:":
        raise ApiError.about(field, 400, " must be a data: URL (data:image/png;base64,...)")
    tokens = [token.strip() for token in header[5:].split(";")]
    media_type = tokens[0].lower()
    is_base64 = len(tokens) > 1 and tokens[-1].lower() == "base64"
    if media_type not in INLINE_MEDIA_TYPES:
        raise ApiError.about(
            field, 415, f" must be image/png or image/jpeg, not {tokens[0][:40]!r}"
        )
    if len(data) > 3 * max_bytes + 1024:  # longer than any encoding of an allowed image
        raise ApiError.about(field, 413, f" is larger than {max_bytes} bytes")
    decoded: bytes
    if is_base64:
        compact = "".join(unquote(data).split())
        try:
            decoded = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError.about(field, 400, " is not valid base64") from None
    else:
        decoded = unquote_to_bytes(data)
    if len(decoded) > max_bytes:
        raise ApiError.about(field, 413, f" is larger than {max_bytes} bytes")
    return decoded


def _resolve_files(
    session: Session, project_id: int, references: list[FileReference]
) -> dict[int, StoredFile]:
    """The stored files named by id or external id, by item index; 400
    naming every unknown or repeated one."""
    named = {
        index: FileIdentifier(
            id=ref.fileId, externalId=ref.fileExternalId, instanceId=ref.fileInstanceId
        )
        for index, ref in enumerate(references)
        if ref.fileId is not None or ref.fileExternalId is not None or ref.fileInstanceId
    }
    # In share mode until the job commits: an upload that replaces a file's
    # content (holding its row for update) either waits for the job, and then
    # sees its item keeping the old version, or comes first, and the job
    # reads the new one. No item pins a version being discarded. Locked in
    # the order every lock on files takes (lookup_files), so a job naming
    # files waits for an update naming them in another order, or it for the job.
    files = dict(
        zip(
            named,
            lookup_files(session, project_id, list(named.values()), lock="share"),
            strict=True,
        )
    )
    resolved: dict[int, StoredFile] = {}
    missing: list[dict[str, Any]] = []
    duplicated: list[dict[str, Any]] = []
    seen: set[int] = set()
    for index, identifier in named.items():
        found = files[index]
        shown = identifier_body(identifier)
        if found is None:
            if shown not in missing:
                missing.append(shown)
        elif found.id in seen:
            if shown not in duplicated:
                duplicated.append(shown)
        else:
            seen.add(found.id)
            resolved[index] = found
    if missing or duplicated:
        message = "unknown files" if missing else "files are referenced more than once"
        raise ApiError(400, message, missing=missing, duplicated=duplicated)
    pending = [
        f"items[{index}] (file {stored.id})"
        for index, stored in resolved.items()
        if not stored.uploaded
    ]
    if pending:
        # Cognite's two-step upload: the file exists before its bytes do.
        raise ApiError(400, f"{', '.join(pending)}: file is not uploaded yet")
    return resolved
