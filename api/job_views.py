"""The job viewer: a page that shows each item's image with its masks, and
the JSON it polls, both reached through the job's signed ``viewUrl`` (a
browser has no API key to send). The page's script and styles are served by
segq itself (api/static/viewer/), so it works offline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flask import Blueprint, Response, render_template, request, url_for
from sqlalchemy import select

from segq.api.answers import json_document
from segq.api.context import db, services
from segq.api.errors import ApiError
from segq.api.job_items import items_of
from segq.api.job_service import owned_job
from segq.api.openapi import documented
from segq.api.public_links import public_link
from segq.api.schemas import JobView, ViewQuery
from segq.api.view_links import ViewGrant, ViewLinks
from segq.clock import now_ms
from segq.job_document import (
    MaskLinker,
    item_reference,
    job_state,
    render_segment,
    shown_prompt,
)
from segq.models import ItemStatus, Job, JobItem, JobStatus, Project, StoredFile

job_views = Blueprint(
    "job_views", __name__, url_prefix="/api/v1/projects/<project>/context/vision/segment"
)

#: The page's own rules: its script and styles from segq only; images from
#: storage, wherever that is; the signed link never sent on as a Referer.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src * data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def view_links() -> ViewLinks:
    settings = services().settings
    return ViewLinks(settings.secret_key, settings.public_url, settings.url_expires_seconds)


def _granted_job(project: str, job_id: int) -> tuple[ViewGrant, Job]:
    """The job the request's token opens; its project must be the path's."""
    tokens = request.args.getlist("token")
    if len(tokens) > 1:
        # One spelling per link: a second token is not the link that was handed out.
        raise ApiError(403, "this viewer link is not valid")
    grant = view_links().grant(tokens[0] if tokens else None, job_id)
    owner = db().get(Project, grant.project_id)
    if owner is None or owner.name != project:
        raise ApiError(404, f"job {job_id} not found", missing=[{"jobId": job_id}])
    return grant, owned_job(db(), grant.project_id, job_id)


@job_views.get("/<id:job_id>/view")
@documented(
    "The job's viewer page (HTML), opened through the job's signed viewUrl",
    {200: ("the page", None)},
    errors=(401, 403, 404),
    query=ViewQuery,
)
def view_page(project: str, job_id: int) -> tuple[str, int, dict[str, str]]:
    _granted_job(project, job_id)
    page = render_template(
        "job_view.html",
        job_id=job_id,
        # The page polls this with the same token.
        data_url=url_for(
            "job_views.view_data", project=project, job_id=job_id, token=request.args["token"]
        ),
    )
    return page, 200, {**PAGE_HEADERS, "Content-Type": "text/html; charset=utf-8"}


@job_views.get("/<id:job_id>/view/job")
@documented(
    "What the viewer page shows: the job with every item in place, mask and image URLs signed",
    {200: ("the job as the viewer shows it", JobView)},
    errors=(401, 403, 404),
    query=ViewQuery,
)
def view_data(project: str, job_id: int) -> tuple[Response, int, dict[str, str]]:
    _, job = _granted_job(project, job_id)
    settings = services().settings
    storage = services().storage
    expires_in = settings.url_expires_seconds

    def link(key: str) -> tuple[str, int]:
        expires_time = (now_ms() // 1000 + expires_in) * 1000
        url = public_link(settings.public_url, storage.presigned_get_url(key, expires_in))
        return url, expires_time

    document = render_job_view(job, items_of(db(), job), link)
    if not JobStatus(job.status).finished:
        document["refreshAfter"] = settings.poll_retry_after_seconds
    return json_document(JobView, document), 200, {"Cache-Control": "no-store"}


def render_job_view(job: Job, items: Sequence[JobItem], link: MaskLinker) -> dict[str, Any]:
    """``items`` in position order, each with its image's signed URL and
    size, its segments once done and its error once failed."""
    file_ids = [item.file_id for item in items if item.file_id is not None]
    files = (
        {
            stored.id: stored
            for stored in db().scalars(select(StoredFile).where(StoredFile.id.in_(file_ids)))
        }
        if file_ids
        else {}
    )
    shown: list[dict[str, Any]] = []
    completed = failed = 0
    for item in items:
        stored = files.get(item.file_id) if item.file_id is not None else None
        # The version the item was created on (the file may have been
        # overwritten since): its masks belong over that image, and the link
        # must not show content uploaded after the job.
        image_key = width = height = None
        if stored is not None and item.file_storage_key not in (None, stored.storage_key):
            image_key = item.file_storage_key
        elif stored is not None and stored.uploaded:
            image_key, width, height = stored.storage_key, stored.width, stored.height
        entry: dict[str, Any] = {
            **item_reference(item),
            # A person knows the image by its name and externalId, whatever
            # the client named it by in the job.
            **(
                {"fileName": stored.name, "fileExternalId": stored.external_id}
                if stored is not None
                else {}
            ),
            "position": item.position,
            "status": item.status,
            "imageUrl": link(image_key)[0] if image_key else None,
            "width": width,
            "height": height,
            "errorMessage": item.error_message if item.status == ItemStatus.FAILED else None,
        }
        if item.status == ItemStatus.FAILED:
            failed += 1
        if item.status == ItemStatus.COMPLETED and item.result is not None:
            completed += 1
            width, height = item.result["width"], item.result["height"]
            entry |= {"width": width, "height": height}
            entry["segments"] = [
                render_segment(segment, width, height, link) for segment in item.result["segments"]
            ]
        shown.append(entry)
    return {
        **job_state(job),
        "items": shown,
        "prompt": shown_prompt(job.prompt),
        "progress": {"total": len(items), "completed": completed, "failed": failed},
        "engine": job.engine,
        "refreshAfter": None,
    }
