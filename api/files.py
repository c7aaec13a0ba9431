"""/files: Cognite's Files API (JSON metadata first, bytes PUT to a signed
upload URL) and segq's one-step multipart upload, which makes the same
file. The work is in api/cognite_files.py; these handlers speak HTTP."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, request, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge

from segq.api.answers import json_answer
from segq.api.auth import protect_project_routes
from segq.api.cognite_files import (
    UploadLinks,
    apply_changes,
    commit_or_conflict,
    complete_multipart_upload,
    count_files,
    create_file,
    file_response,
    find_files,
    identifier_body,
    part_keys,
    receive_part,
    receive_upload,
    search_files,
)
from segq.api.cognite_files import (
    list_files as list_file_page,
)
from segq.api.context import current_project, db, services
from segq.api.errors import ApiError
from segq.api.images import inspect_image
from segq.api.json_body import read_json_object
from segq.api.openapi import documented
from segq.api.public_links import public_link
from segq.api.request_integers import request_integer
from segq.api.schemas import (
    CONTROL_CHARACTERS,
    MAX_EXTERNAL_ID_LENGTH,
    Count,
    CountAggregate,
    CreatedFile,
    DownloadLink,
    DownloadLinks,
    EmptyAnswer,
    FileAggregateRequest,
    FileCreation,
    FileIdentifier,
    FileIdentifierList,
    FileIdentifiers,
    FileList,
    FileListQuery,
    FileListRequest,
    FilePage,
    FileResponse,
    FileSearchRequest,
    FileUpdates,
    FileUpload,
    MultipartCompletion,
    MultipartQuery,
    MultipartUploadFile,
    MultipartUploadLinks,
    OverwriteQuery,
    PartsQuery,
    checked_text,
    cursor_after,
    encode_cursor,
    list_limit,
    parse,
)
from segq.api.schemas import (
    UploadLinks as UploadLinksAnswer,
)
from segq.api.stored_files import discard_objects, store_image
from segq.deletion import delete_files as delete_stored_files
from segq.file_objects import discard_file_objects, discard_upload_parts, kept_keys
from segq.models import StoredFile

log = logging.getLogger(__name__)

#: Parts of one multipart upload; any allowed image fits in far fewer.
MAX_PARTS = 250
#: An upload needs three parts (file, externalId, name); many more is not an upload.
MAX_FORM_PARTS = 100

files = Blueprint("files", __name__, url_prefix="/api/v1/projects/<project>/files")
protect_project_routes(files)


def _optional_text_field(name: str) -> str | None:
    value = request.form.get(name)
    if value is None or value == "":
        return None
    return checked_text(name, value)


@files.post("")
@documented(
    "Upload an image (JPEG or PNG)",
    {201: ("stored; from JSON metadata, with its uploadUrl", CreatedFile)},
    errors=(400, 409, 413, 415, 503),
    form_body=FileUpload,
    json_body=FileCreation,
    query=OverwriteQuery,
)
def upload_file() -> tuple[Response, int, dict[str, str]]:
    if request.mimetype == "application/json":
        return _create_file_metadata()
    if request.mimetype != "multipart/form-data":
        raise ApiError(
            415,
            "send the image as multipart/form-data in field 'file', "
            "or the file's metadata as application/json",
        )
    upload = _uploaded_form_file()
    if upload is None:
        raise ApiError(400, "multipart field 'file' is missing")
    external_id = _optional_text_field("externalId")
    name = _optional_text_field("name") or upload.filename or None
    if name is not None:
        # The multipart filename is the client's too; keep a safe prefix of it.
        name = CONTROL_CHARACTERS.sub("", name)[:MAX_EXTERNAL_ID_LENGTH] or None
    settings = services().settings
    data = upload.stream.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, f"file is larger than {settings.max_upload_bytes} bytes")
    info = inspect_image(data, settings)

    project = current_project()
    session = db()
    if external_id is not None and _external_id_taken(project.id, external_id):
        raise ApiError(
            409,
            f"externalId {external_id!r} is already used in this project",
            duplicated=[{"externalId": external_id}],
        )

    stored = store_image(
        session, services().storage, project.id, data, info, external_id=external_id, name=name
    )
    try:
        session.commit()
    except Exception as exc:
        session.rollback()
        discard_objects(services().storage, [stored.storage_key])
        if isinstance(exc, IntegrityError):
            raise ApiError(
                409,
                f"externalId {external_id!r} is already used in this project",
                duplicated=[{"externalId": external_id}],
            ) from None
        raise
    location = url_for("files.get_file", project=project.name, file_id=stored.id)
    return json_answer(file_response(stored)), 201, {"Location": location}


def _uploaded_form_file() -> FileStorage | None:
    """The form's ``file`` part, parsed within bounds: the body's size (the
    app's MAX_CONTENT_LENGTH) and the number of parts. Text parts are not
    bounded apart from the body, so a 413 from the parser with the body
    within its size means too many parts."""
    request.max_form_parts = MAX_FORM_PARTS
    request.max_form_memory_size = None
    try:
        return request.files.get("file")
    except RequestEntityTooLarge:
        length = request.content_length
        if length is not None and length <= (request.max_content_length or length):
            raise ApiError(413, f"the form has more than {MAX_FORM_PARTS} parts") from None
        if length is None:
            raise ApiError(
                413, f"request body is too large or has more than {MAX_FORM_PARTS} parts"
            ) from None
        raise


def _external_id_taken(project_id: int, external_id: str) -> bool:
    return (
        db().scalar(
            select(StoredFile.id).where(
                StoredFile.project_id == project_id, StoredFile.external_id == external_id
            )
        )
        is not None
    )


def _owned_file(file_id: int) -> StoredFile:
    stored = db().get(StoredFile, file_id)
    # Another project's file is "not found", never "forbidden": no existence oracle.
    if stored is None or stored.project_id != current_project().id:
        raise ApiError(404, f"file {file_id} not found", missing=[{"id": file_id}])
    return stored


@files.get("/<id:file_id>")
@documented("Read a file's metadata", {200: ("the file", FileResponse)}, errors=(404,))
def get_file(file_id: int) -> Response:
    return json_answer(file_response(_owned_file(file_id)))


@files.delete("/<id:file_id>")
@documented("Delete a file", {204: ("deleted", None)}, errors=(404,))
def delete_file(file_id: int) -> tuple[str, int]:
    stored = _owned_file(file_id)
    session = db()
    # Objects first (segq/deletion.py): a failure leaves the row, and the
    # client's retry finishes the deletion. Queued items created on the file
    # fail: a deleted file's content is gone, whoever still wanted it.
    delete_stored_files(session, services().storage, [stored])
    session.commit()
    return "", 204


@files.get("")
@documented(
    "List files, newest first", {200: ("files", FileList)}, errors=(400,), query=FileListQuery
)
def list_files() -> Response:
    query = select(StoredFile).where(StoredFile.project_id == current_project().id)
    external_id = request.args.get("externalId")
    if external_id is not None:
        query = query.where(StoredFile.external_id == checked_text("externalId", external_id))
    limit = list_limit(request.args.get("limit"))
    rows = db().scalars(query.order_by(StoredFile.id.desc()).limit(limit))
    return json_answer(FileList(items=[file_response(stored) for stored in rows]))


def _upload_links() -> UploadLinks:
    settings = services().settings
    # Absolute under the public URL (`segq serve` sets it to the address it
    # binds), never built from request headers; without one, relative to the
    # API's root, which Cognite's SDK resolves for whole-file uploads.
    return UploadLinks(settings.secret_key, settings.public_url, settings.url_expires_seconds)


def _overwrite() -> bool:
    raw = request.args.get("overwrite", "false").lower()
    if raw not in ("true", "false"):
        raise ApiError(400, "overwrite must be true or false")
    return raw == "true"


def _created_file(stored: StoredFile) -> CreatedFile:
    body = file_response(stored).model_dump(exclude_unset=True)
    return CreatedFile(**body, uploadUrl=_upload_links().url_for(stored))


def _create_file_metadata() -> tuple[Response, int, dict[str, str]]:
    creation = parse(FileCreation, read_json_object())
    project = current_project()
    stored, replaced_key = create_file(db(), project.id, creation, overwrite=_overwrite())
    if replaced_key is not None:
        _discard_replaced_version(replaced_key)
    location = url_for("files.get_file", project=project.name, file_id=stored.id)
    return json_answer(_created_file(stored)), 201, {"Location": location}


def _discard_replaced_version(key: str) -> None:
    """What an overwritten file held: the parts of an upload to it go now,
    and its content too unless a queued or running item was created on it;
    that item segments the version it was created on, and the orphan sweep
    removes the content once no such item is left."""
    storage = services().storage
    if key in kept_keys(db(), [key]):
        discard_upload_parts(storage, key)
    else:
        discard_file_objects(storage, [key])


@files.post("/uploadlink")
@documented(
    "Upload URLs for files created from metadata",
    {200: ("the files, each with its uploadUrl", UploadLinksAnswer)},
    errors=(400, 415),
    json_body=FileIdentifierList,
)
def upload_links() -> Response:
    request_body = parse(FileIdentifierList, read_json_object())
    found = find_files(db(), current_project().id, request_body.items)
    return json_answer(UploadLinksAnswer(items=[_created_file(stored) for _, stored in found]))


@files.post("/byids")
@documented(
    "Files by id, externalId or instanceId",
    {200: ("the files, in the order asked", FilePage)},
    errors=(400, 415),
    json_body=FileIdentifiers,
)
def files_by_ids() -> Response:
    request_body = parse(FileIdentifiers, read_json_object())
    found = find_files(
        db(), current_project().id, request_body.items, ignore_unknown=request_body.ignoreUnknownIds
    )
    return json_answer(FilePage(items=[file_response(stored) for _, stored in found]))


@files.post("/list")
@documented(
    "Files matching a filter, a page at a time",
    {200: ("a page of files", FilePage)},
    errors=(400, 415),
    json_body=FileListRequest,
)
def list_filtered_files() -> Response:
    request_body = parse(FileListRequest, read_json_object())
    page, last_id = list_file_page(
        db(),
        current_project().id,
        request_body.filter,
        limit=request_body.limit or 100,
        after_id=cursor_after(request_body.cursor),
        partition=request_body.partition,
    )
    return json_answer(
        FilePage(
            items=[file_response(stored) for stored in page],
            nextCursor=encode_cursor(last_id) if last_id is not None else None,
        )
    )


@files.post("/search")
@documented(
    "Files whose name holds every word searched, names that start with it first",
    {200: ("the files found", FilePage)},
    errors=(400, 415),
    json_body=FileSearchRequest,
)
def search_files_by_name() -> Response:
    request_body = parse(FileSearchRequest, read_json_object())
    found = search_files(
        db(),
        current_project().id,
        request_body.filter,
        request_body.search.name if request_body.search is not None else None,
        limit=request_body.limit or 100,
    )
    return json_answer(FilePage(items=[file_response(stored) for stored in found]))


@files.post("/aggregate")
@documented(
    "Count the files matching a filter",
    {200: ("the count", CountAggregate)},
    errors=(400, 415),
    json_body=FileAggregateRequest,
)
def aggregate_files() -> Response:
    request_body = parse(FileAggregateRequest, read_json_object())
    total = count_files(db(), current_project().id, request_body.filter)
    return json_answer(CountAggregate(items=[Count(count=total)]))


@files.post("/downloadlink")
@documented(
    "Expiring download URLs of uploaded files",
    {200: ("one URL per file", DownloadLinks)},
    errors=(400, 415),
    json_body=FileIdentifierList,
)
def download_links() -> Response:
    request_body = parse(FileIdentifierList, read_json_object())
    found = find_files(db(), current_project().id, request_body.items)
    not_uploaded = [
        identifier_body(identifier) for identifier, stored in found if not stored.uploaded
    ]
    if not_uploaded:
        raise ApiError(400, "files are not uploaded yet", missing=not_uploaded)
    settings = services().settings
    storage = services().storage
    links = [
        DownloadLink(
            **identifier.model_dump(exclude_none=True),
            downloadUrl=public_link(
                settings.public_url,
                storage.presigned_get_url(stored.storage_key, settings.url_expires_seconds),
            ),
        )
        for identifier, stored in found
    ]
    return json_answer(DownloadLinks(items=links))


@files.post("/delete")
@documented(
    "Delete files",
    {200: ("deleted", EmptyAnswer)},
    errors=(400, 415),
    json_body=FileIdentifiers,
)
def delete_files() -> Response:
    request_body = parse(FileIdentifiers, read_json_object())
    session = db()
    found = find_files(
        session,
        current_project().id,
        request_body.items,
        ignore_unknown=request_body.ignoreUnknownIds,
        lock="update",
    )
    unique = {stored.id: stored for _, stored in found}
    # Objects first (segq/deletion.py): a failure leaves the rows, and the
    # client's retry finishes the deletion.
    delete_stored_files(session, services().storage, list(unique.values()))
    session.commit()
    return json_answer(EmptyAnswer())


@files.post("/update")
@documented(
    "Change files' fields, as Cognite's update operations do",
    {200: ("the files as changed", FilePage)},
    errors=(400, 409, 415),
    json_body=FileUpdates,
)
def update_files() -> Response:
    request_body = parse(FileUpdates, read_json_object())
    session = db()
    found = find_files(session, current_project().id, request_body.items, lock="update")
    changed_ids: list[dict[str, str]] = []
    # Every item was found (no ignoreUnknownIds here), so they pair up in order.
    for index, (item, (_, stored)) in enumerate(zip(request_body.items, found, strict=True)):
        apply_changes(stored, item.update, ("items", index, "update"))
        if stored.external_id is not None:
            changed_ids.append({"externalId": stored.external_id})
    commit_or_conflict(session, changed_ids)
    return json_answer(FilePage(items=[file_response(stored) for _, stored in found]))


#: The upload URLs: no project key, the URL's signature is the credential.
file_uploads = Blueprint("file_uploads", __name__, url_prefix="/api/v1/files/upload")


@file_uploads.put("/<token>")
@documented(
    "Upload a file's bytes to the URL its creation answered",
    {200: ("uploaded", FileResponse)},
    errors=(403, 404, 409, 413, 415),
)
def put_file_bytes(token: str) -> Response:
    settings = services().settings
    limit = settings.max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"file is larger than {limit} bytes")
    session = db()
    target = _upload_links().target_of(session, token)
    data = request.stream.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"file is larger than {limit} bytes")
    if target.part is not None:
        receive_part(session, services().storage, target, data)
        return json_answer(file_response(target.stored))
    stored, replaced_key = receive_upload(
        session,
        services().storage,
        target.stored,
        data,
        settings,
    )
    if replaced_key is not None:
        _discard_replaced_version(replaced_key)
    return json_answer(file_response(stored))


@files.post("/initmultipartupload")
@documented(
    "Create a file from metadata, to upload in parts",
    {201: ("the file, with one upload URL per part", MultipartUploadFile)},
    errors=(400, 409, 415),
    json_body=FileCreation,
    query=MultipartQuery,
)
def init_multipart_upload() -> tuple[Response, int]:
    parts = _parts()
    creation = parse(FileCreation, read_json_object())
    stored, replaced_key = create_file(db(), current_project().id, creation, overwrite=_overwrite())
    if replaced_key is not None:
        _discard_replaced_version(replaced_key)
    return json_answer(_multipart_upload_file(stored, parts)), 201


def _parts() -> int:
    return request_integer("parts", request.args.get("parts", ""), minimum=1, maximum=MAX_PARTS)


def _multipart_upload_file(stored: StoredFile, parts: int) -> MultipartUploadFile:
    links = _upload_links()
    body = file_response(stored).model_dump(exclude_unset=True)
    return MultipartUploadFile(
        **body,
        uploadUrls=[links.url_for(stored, part=part) for part in range(parts)],
        uploadId=links.upload_id(stored, parts),
    )


@files.post("/multiuploadlink")
@documented(
    "Upload URLs, in parts, for files created from metadata",
    {200: ("the files, each with one upload URL per part", MultipartUploadLinks)},
    errors=(400, 415),
    json_body=FileIdentifierList,
    query=PartsQuery,
)
def multipart_upload_links() -> Response:
    parts = _parts()
    request_body = parse(FileIdentifierList, read_json_object())
    found = find_files(db(), current_project().id, request_body.items)
    return json_answer(
        MultipartUploadLinks(items=[_multipart_upload_file(stored, parts) for _, stored in found])
    )


@files.post("/completemultipartupload")
@documented(
    "Join the uploaded parts into the file's bytes",
    {200: ("uploaded", EmptyAnswer)},
    errors=(400, 409, 413, 415),
    json_body=MultipartCompletion,
)
def complete_multipart() -> Response:
    completion = parse(MultipartCompletion, read_json_object())
    session = db()
    identifier = FileIdentifier(id=completion.id)
    [(_, stored)] = find_files(session, current_project().id, [identifier], lock="update")
    parts = _upload_links().multipart_upload(stored, completion.uploadId)
    settings = services().settings
    storage = services().storage
    joined = part_keys(stored, parts)
    _, replaced_key = complete_multipart_upload(
        session,
        storage,
        stored,
        parts,
        settings,
    )
    discard_objects(storage, joined)
    if replaced_key is not None:
        _discard_replaced_version(replaced_key)
    return json_answer(EmptyAnswer())
