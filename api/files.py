"""/files: upload, read, list and delete images."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, request, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge

from api.answers import json_answer
from api.auth import protect_project_routes
from api.context import current_project, db, services
from api.errors import ApiError
from api.images import inspect_image
from api.openapi import documented
from api.schemas import (
    CONTROL_CHARACTERS,
    MAX_EXTERNAL_ID_LENGTH,
    FileList,
    FileListQuery,
    FileResponse,
    FileUpload,
    checked_text,
    list_limit,
)
from api.stored_files import discard_objects, store_image
from segq.models import StoredFile

log = logging.getLogger(__name__)

#: An upload needs three parts (file, externalId, name); many more is not an upload.
MAX_FORM_PARTS = 100

files = Blueprint("files", __name__, url_prefix="/api/v1/projects/<project>/files")
protect_project_routes(files)


def file_response(stored: StoredFile) -> FileResponse:
    return FileResponse(
        id=stored.id,
        externalId=stored.external_id,
        name=stored.name,
        mimeType=stored.mime_type,
        size=stored.size,
        width=stored.width,
        height=stored.height,
        sha256=stored.sha256,
        createdTime=stored.created_time,
    )


def _optional_text_field(name: str) -> str | None:
    value = request.form.get(name)
    if value is None or value == "":
        return None
    return checked_text(name, value)


@files.post("")
@documented(
    "Upload an image (JPEG or PNG)",
    {201: ("stored", FileResponse)},
    errors=(400, 409, 413, 415, 503),
    form_body=FileUpload,
)
def upload_file() -> tuple[Response, int, dict[str, str]]:
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "upload as multipart/form-data with the image in field 'file'")
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
    info = inspect_image(data, max_pixels=settings.max_image_pixels)

    project = current_project()
    session = db()
    if external_id is not None and _external_id_taken(project.id, external_id):
        raise ApiError(409, f"externalId {external_id!r} is already used in this project")

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
                409, f"externalId {external_id!r} is already used in this project"
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
    key = stored.storage_key
    session = db()
    session.delete(stored)
    session.commit()
    # After the commit: a crash here leaves an unreferenced object, never a
    # row pointing at nothing.
    discard_objects(services().storage, [key])
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
