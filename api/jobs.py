"""/context/vision/segment: create segmentation jobs and read them."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, request, url_for
from sqlalchemy import func, select, update

from api.answers import json_answer, json_document
from api.auth import protect_project_routes
from api.context import current_project, db, services
from api.errors import ApiError
from api.job_service import create_segmentation_job, items_of, owned_job
from api.json_body import max_job_body_bytes, read_json_object
from api.openapi import documented
from api.public_links import public_link
from api.request_integers import request_integer
from api.schemas import (
    JobCreatedResponse,
    JobCreationHeaders,
    JobList,
    JobListQuery,
    JobResponse,
    JobSummary,
    SegmentRequest,
    cursor_after,
    encode_cursor,
    list_limit,
    parse,
)
from segq.clock import now_ms
from segq.job_document import render_created_job, render_job, render_job_summary
from segq.models import ItemStatus, Job, JobItem, JobStatus
from segq.webhook_events import JOB_CANCELED, record_event, whole_job_data

log = logging.getLogger(__name__)

jobs = Blueprint("jobs", __name__, url_prefix="/api/v1/projects/<project>/context/vision/segment")
protect_project_routes(jobs)


@jobs.post("")
@documented(
    "Create a segmentation job",
    {200: ("the job, queued", JobCreatedResponse)},
    errors=(400, 409, 413, 415, 422, 429, 503),
    json_body=SegmentRequest,
    headers=JobCreationHeaders,
)
def create_job() -> tuple[Response, int, dict[str, str]]:
    body = read_json_object(max_bytes=max_job_body_bytes(services().settings.max_upload_bytes))
    created = create_segmentation_job(
        db(),
        services(),
        current_project().id,
        parse(SegmentRequest, body),
        request.headers.get("Idempotency-Key"),
    )
    return _created_answer(created.job, created.items)


def _created_answer(job: Job, items: list[JobItem]) -> tuple[Response, int, dict[str, str]]:
    location = url_for("jobs.get_job", project=current_project().name, job_id=job.id)
    return (
        json_document(JobCreatedResponse, render_created_job(job, items)),
        200,
        {"Location": location},
    )


def _time_argument(name: str) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    return request_integer(name, raw)


@jobs.get("")
@documented(
    "List jobs, newest first", {200: ("a page of jobs", JobList)}, errors=(400,), query=JobListQuery
)
def list_jobs() -> Response:
    """Newest first, by keyset on the id: a page never shifts when jobs are
    created meanwhile (new ids are larger than every cursor)."""
    query = select(Job).where(Job.project_id == current_project().id)
    status = request.args.get("status")
    if status is not None:
        if status not in {s.value for s in JobStatus}:
            raise ApiError(400, f"status must be one of {', '.join(s.value for s in JobStatus)}")
        query = query.where(Job.status == status)
    after = _time_argument("createdAfter")
    if after is not None:
        query = query.where(Job.created_time >= after)
    before = _time_argument("createdBefore")
    if before is not None:
        query = query.where(Job.created_time < before)
    cursor = cursor_after(request.args.get("cursor"))
    if cursor is not None:
        query = query.where(Job.id < cursor)
    limit = list_limit(request.args.get("limit"))
    page = list(db().scalars(query.order_by(Job.id.desc()).limit(limit + 1)))
    more = len(page) > limit
    page = page[:limit]
    counts: dict[int, dict[str, int]] = {}
    if page:
        rows = db().execute(
            select(JobItem.job_id, JobItem.status, func.count())
            .where(JobItem.job_id.in_([job.id for job in page]))
            .group_by(JobItem.job_id, JobItem.status)
        )
        for job_id, item_status, number in rows:
            counts.setdefault(job_id, {})[item_status] = number
    items = [
        JobSummary.model_validate(render_job_summary(job, counts.get(job.id, {}))) for job in page
    ]
    next_cursor = encode_cursor(page[-1].id) if more else None
    return json_answer(JobList(items=items, nextCursor=next_cursor))


def _job_answer(job: Job) -> tuple[Response, int, dict[str, str]]:
    settings = services().settings
    storage = services().storage
    expires_in = settings.url_expires_seconds

    def link_mask(key: str) -> tuple[str, int]:
        # Signers count whole seconds from "now"; this is never later than theirs.
        expires_time = (now_ms() // 1000 + expires_in) * 1000
        return public_link(settings.public_url, storage.presigned_get_url(key, expires_in)), (
            expires_time
        )

    document = render_job(job, items_of(db(), job), link_mask)
    headers: dict[str, str] = {}
    if not JobStatus(job.status).finished:
        headers["Retry-After"] = str(settings.poll_retry_after_seconds)
    return json_document(JobResponse, document), 200, headers


@jobs.get("/<id:job_id>")
@documented(
    "Read a job's status and results",
    {200: ("the job; Retry-After while unfinished", JobResponse)},
    errors=(404,),
)
def get_job(job_id: int) -> tuple[Response, int, dict[str, str]]:
    return _job_answer(owned_job(db(), current_project().id, job_id))


@jobs.post("/<id:job_id>/cancel")
@documented(
    "Cancel a job: queued items never run, no further item starts",
    {200: ("the job, canceled", JobResponse)},
    errors=(404, 409),
)
def cancel_job(job_id: int) -> tuple[Response, int, dict[str, str]]:
    """Queued items never run; an item already running finishes, and no
    further item starts. Canceling a canceled job changes nothing."""
    session = db()
    job = owned_job(session, current_project().id, job_id, for_update=True)
    if job.status in (JobStatus.COMPLETED, JobStatus.FAILED):
        session.rollback()
        raise ApiError(409, f"job {job_id} has already finished ({job.status})")
    if job.status != JobStatus.CANCELED:
        now = now_ms()
        job.status = JobStatus.CANCELED
        job.status_time = now
        session.execute(
            update(JobItem)
            .where(JobItem.job_id == job.id, JobItem.status == ItemStatus.QUEUED)
            .values(status=ItemStatus.CANCELED, finished_time=now)
        )
        record_event(session, job, JOB_CANCELED, now, lambda: whole_job_data(session, job))
    session.commit()
    return _job_answer(job)
