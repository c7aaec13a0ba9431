"""The job viewer: a page that shows each item's image with its masks, and
the JSON it polls, both reached through the job's signed ``viewUrl`` (a
browser has no API key to send). The page's script and styles are served by
segq itself (api/static/viewer/), so it works offline."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from flask import Blueprint, Response, render_template, request, url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from segq.api.context import db, services
from segq.api.errors import ApiError
from segq.api.job_service import owned_job
from segq.api.openapi import documented
from segq.api.schemas import JobView, ViewQuery
from segq.api.view_links import ViewGrant, ViewLinks
from segq.job_document import job_state, shown_prompt
from segq.job_text import Linker, fill_links, json_text, render_result_text, segments_text
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
    links = services().signed_links
    body = render_job_view(
        db(),
        job,
        partial(links.link, window=links.window()),
        refresh_after=(
            None if JobStatus(job.status).finished else services().settings.poll_retry_after_seconds
        ),
    )
    return Response(body, mimetype="application/json"), 200, {"Cache-Control": "no-store"}


@dataclass(frozen=True)
class _ViewRow:
    position: int
    status: str
    file_ref: dict[str, Any]
    file_id: int | None
    file_storage_key: str | None
    error_message: str | None
    width: int | None
    height: int | None
    rendered_result: str | None


def _view_rows(session: Session, job_id: int) -> list[_ViewRow]:
    """The job's items in position order, with what the viewer shows of
    them: a completed one's size and stored rendering, not its result (a
    noisy mask's polygons are megabytes of JSON to parse); one completed
    before renderings were stored is rendered here."""
    rows = [
        _ViewRow(*row)
        for row in session.execute(
            select(
                JobItem.position,
                JobItem.status,
                JobItem.file_ref,
                JobItem.file_id,
                JobItem.file_storage_key,
                JobItem.error_message,
                JobItem.result["width"].as_integer(),
                JobItem.result["height"].as_integer(),
                JobItem.rendered_result,
            )
            .where(JobItem.job_id == job_id)
            .order_by(JobItem.position)
        )
    ]
    unrendered = [
        row.position
        for row in rows
        if row.status == ItemStatus.COMPLETED and row.rendered_result is None
    ]
    if not unrendered:
        return rows
    rendered = {
        position: render_result_text(result)
        for position, result in session.execute(
            select(JobItem.position, JobItem.result).where(
                JobItem.job_id == job_id, JobItem.position.in_(unrendered)
            )
        ).tuples()
        if result is not None
    }
    return [
        replace(row, rendered_result=rendered[row.position]) if row.position in rendered else row
        for row in rows
    ]


def render_job_view(session: Session, job: Job, link: Linker, *, refresh_after: int | None) -> str:
    """JobView's JSON as Flask writes it: the items in position order, each
    with its image's signed URL and size, its segments once done (spliced
    from the item's stored rendering, as a job's GET is:
    api/job_answers.py) and its error once failed; the rest through the
    model, which is cheap without the segments."""
    rows = _view_rows(session, job.id)
    file_ids = [row.file_id for row in rows if row.file_id is not None]
    files = (
        {
            stored.id: stored
            for stored in session.scalars(select(StoredFile).where(StoredFile.id.in_(file_ids)))
        }
        if file_ids
        else {}
    )
    shown: list[dict[str, Any]] = []
    segments: list[str | None] = []
    completed = failed = 0
    for row in rows:
        stored = files.get(row.file_id) if row.file_id is not None else None
        # The version the item was created on (the file may have been
        # overwritten since): its masks belong over that image, and the link
        # must not show content uploaded after the job.
        image_key = width = height = None
        if stored is not None and row.file_storage_key not in (None, stored.storage_key):
            image_key = row.file_storage_key
        elif stored is not None and stored.uploaded:
            image_key, width, height = stored.storage_key, stored.width, stored.height
        entry: dict[str, Any] = {
            **row.file_ref,
            # A person knows the image by its name and externalId, whatever
            # the client named it by in the job.
            **(
                {"fileName": stored.name, "fileExternalId": stored.external_id}
                if stored is not None
                else {}
            ),
            "position": row.position,
            "status": row.status,
            "imageUrl": link(image_key)[0] if image_key else None,
            "width": width,
            "height": height,
            "errorMessage": row.error_message if row.status == ItemStatus.FAILED else None,
        }
        if row.status == ItemStatus.FAILED:
            failed += 1
        shown_segments = None
        if row.status == ItemStatus.COMPLETED and row.rendered_result is not None:
            completed += 1
            entry |= {"width": row.width, "height": row.height}
            shown_segments = segments_text(row.rendered_result)
        shown.append(entry)
        segments.append(shown_segments)
    document = JobView.model_validate(
        {
            **job_state(job),
            "items": shown,
            "prompt": shown_prompt(job.prompt),
            "progress": {"total": len(rows), "completed": completed, "failed": failed},
            "engine": job.engine,
            "refreshAfter": refresh_after,
        }
    ).model_dump(mode="json", by_alias=True, exclude_unset=True)
    items = [
        # ``segments`` is JobViewItem's last field: it closes the item.
        json_text(item)[:-1] + ("}" if text is None else "," + fill_links(text, link) + "}")
        for item, text in zip(document["items"], segments, strict=True)
    ]
    members = [
        f"{json_text(name)}:{'[' + ','.join(items) + ']' if name == 'items' else json_text(value)}"
        for name, value in document.items()
    ]
    # Flask ends a JSON answer with a newline.
    return "{" + ",".join(members) + "}\n"
