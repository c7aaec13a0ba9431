"""/context/vision/segment: create segmentation jobs and read them."""

from __future__ import annotations

import hashlib
import json
import logging
from urllib.parse import urljoin

from flask import Blueprint, Response, request, url_for
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from api.answers import json_answer, json_document
from api.auth import protect_project_routes
from api.context import current_project, db, services
from api.errors import ApiError
from api.files import discard_objects
from api.item_sources import item_reference, resolve_sources
from api.json_body import max_job_body_bytes, read_json_object
from api.openapi import documented
from api.request_integers import request_integer
from api.schemas import (
    DEFAULT_OUTPUTS,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    SUPPORTED_OUTPUTS,
    JobCreatedResponse,
    JobCreationHeaders,
    JobList,
    JobListQuery,
    JobResponse,
    JobSummary,
    SegmentRequest,
    Webhook,
    checked_text,
    cursor_after,
    encode_cursor,
    list_limit,
    parse,
)
from segq.clock import now_ms
from segq.fault_points import API_AFTER_COMMIT, die_if_armed
from segq.job_document import render_created_job, render_job, render_job_summary
from segq.models import ItemStatus, Job, JobItem, JobStatus
from segq.queue import enqueue_items
from segq.url_guard import UrlRefused, check_url
from segq.webhook_events import JOB_CANCELED, record_event, subscribed_events, whole_job_data

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
    segment_request = parse(SegmentRequest, body)
    _check_semantics(segment_request)
    webhook = _checked_webhook(segment_request.webhook)
    idempotency_key = _idempotency_key()
    request_sha256 = _request_fingerprint(segment_request, webhook)

    project = current_project()
    session = db()
    if idempotency_key is not None:
        earlier = _job_for_idempotency_key(project.id, idempotency_key, request_sha256)
        if earlier is not None:
            return _created_answer(earlier)

    _check_unfinished_jobs(project.id)
    sources = resolve_sources(project.id, segment_request.items)
    now = now_ms()
    job = Job(
        project_id=project.id,
        status=JobStatus.QUEUED,
        created_time=now,
        status_time=now,
        prompt={
            "points": (
                [p.model_dump() for p in segment_request.points] if segment_request.points else None
            ),
            "boundingBox": (
                segment_request.boundingBox.model_dump() if segment_request.boundingBox else None
            ),
        },
        options={
            "multimaskOutput": segment_request.multimaskOutput,
            "outputs": list(segment_request.outputs or DEFAULT_OUTPUTS),
        },
        idempotency_key=idempotency_key,
        request_sha256=request_sha256,
        webhook=webhook,
    )
    try:
        session.add(job)
        session.flush()  # the job's id, for its items; a duplicate key fails here
        items = [
            JobItem(
                job_id=job.id,
                position=position,
                file_id=None if isinstance(source, str) else source.id,
                file_ref=item_reference(source),
                status=ItemStatus.QUEUED,
                attempt=0,
                published_time=now,
            )
            for position, source in enumerate(sources.sources)
        ]
        session.add_all(items)
        session.commit()
    except IntegrityError:
        session.rollback()
        discard_objects(sources.written_keys)
        earlier = (
            _job_for_idempotency_key(project.id, idempotency_key, request_sha256)
            if idempotency_key is not None
            else None
        )
        if earlier is None:
            # The only other constraint a valid request can break: a file it
            # names was deleted between the check and the commit.
            raise ApiError(409, "a file of this job was deleted meanwhile; retry") from None
        # Another request with the same idempotency key committed first.
        return _created_answer(earlier)

    die_if_armed(API_AFTER_COMMIT, services().settings.fault_point)
    try:
        # The committed objects keep their ids (expire_on_commit=False): no re-read.
        enqueue_items(services().celery, [item.id for item in items])
    except Exception:
        # The job is committed and stays Queued; the client's answer is still
        # true. Marking its items unpublished has the reconciler send them at
        # its next pass. (A process that dies here marks nothing; the
        # reconciler finds its items once the queue runs empty without them.)
        log.exception("could not publish job %s to the broker", job.id)
        session.execute(update(JobItem).where(JobItem.job_id == job.id).values(published_time=None))
        session.commit()
    return _created_answer(job, items)


def _check_unfinished_jobs(project_id: int) -> None:
    """Bound the backlog a project can pile up; checked, not locked, so a
    burst may overshoot by its own size.

    Counting on every request costs a query; far from the bound it need not
    be exact. While this process's count of the last second, plus the jobs
    it was asked for since, is under half the bound, that count stands in.
    Nearer, every request counts anew, so the bound holds as before unless
    other API processes take more than half of it within one second."""
    limit = services().settings.max_unfinished_jobs
    counts = services().unfinished_jobs
    # This request's job counts in advance: one that fails later only makes
    # the estimate err high, which brings the next exact count sooner.
    recent = counts.recent(project_id)
    counts.add_one(project_id)
    if recent is not None and recent < limit // 2:
        return
    unfinished = (
        db().scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.project_id == project_id,
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            )
        )
        or 0
    )
    counts.counted(project_id, unfinished + 1)
    if unfinished >= limit:
        raise ApiError(
            429,
            f"this project has {limit} unfinished jobs, the most allowed; retry when some finish",
            headers={"Retry-After": str(max(services().settings.poll_retry_after_seconds, 5))},
        )


def _created_answer(
    job: Job, items: list[JobItem] | None = None
) -> tuple[Response, int, dict[str, str]]:
    if items is None:
        items = _items_of(job)
    location = url_for("jobs.get_job", project=current_project().name, job_id=job.id)
    return (
        json_document(JobCreatedResponse, render_created_job(job, items)),
        200,
        {"Location": location},
    )


def _check_semantics(segment_request: SegmentRequest) -> None:
    """What the schema cannot say: well-formed requests that cannot be run."""
    if segment_request.prompts is not None:
        raise ApiError(422, "prompts is not supported by this server yet")
    if segment_request.model is not None:
        raise ApiError(422, "model selection is not supported: this server runs one engine")
    if not segment_request.points and segment_request.boundingBox is None:
        raise ApiError(422, "give at least one point or a boundingBox")
    box = segment_request.boundingBox
    if box is not None and (box.xMin >= box.xMax or box.yMin >= box.yMax):
        raise ApiError(422, "boundingBox must have xMin < xMax and yMin < yMax")
    seen: set[tuple[float, float]] = set()
    for index, point in enumerate(segment_request.points or []):
        if (point.x, point.y) in seen:
            raise ApiError(422, f"points[{index}] repeats an earlier point")
        seen.add((point.x, point.y))
    unsupported = set(segment_request.outputs or ()) - SUPPORTED_OUTPUTS
    if unsupported:
        raise ApiError(422, f"outputs {sorted(unsupported)} are not supported by this server yet")
    max_items = services().settings.max_items_per_job
    if len(segment_request.items) > max_items:
        raise ApiError(422, f"a job takes at most {max_items} items")
    for index, item in enumerate(segment_request.items):
        named = [
            field
            for field in ("fileId", "fileExternalId", "fileUrl", "imageData")
            if getattr(item, field) is not None
        ]
        if len(named) != 1:
            raise ApiError(
                400,
                f"items[{index}] must have exactly one of fileId, fileExternalId, fileUrl, "
                "imageData",
            )


def _checked_webhook(webhook: Webhook | None) -> dict[str, object] | None:
    """The job's webhook as stored, with full event names. The URL passes
    the checks that need no DNS now; the worker checks its addresses at
    every delivery, as it does for image URLs."""
    if webhook is None:
        return None
    try:
        check_url(webhook.url, services().settings.webhook_policy())
    except UrlRefused as exc:
        # 400, as for a refused fileUrl.
        raise ApiError(400, f"webhook.url: {exc}") from None
    return {"url": webhook.url, "events": subscribed_events(webhook.events)}


def _request_fingerprint(segment_request: SegmentRequest, webhook: dict[str, object] | None) -> str:
    """What an Idempotency-Key is compared on: the request as validated, with
    defaults filled in and numbers as numbers, so the same request spelt
    another way (``1`` or ``1.0``, a default written out, ``started`` or
    ``job.started``) is the same request."""
    normalized = segment_request.model_dump(mode="json")
    normalized["points"] = normalized["points"] or None
    normalized["outputs"] = sorted(set(segment_request.outputs or DEFAULT_OUTPUTS))
    normalized["webhook"] = webhook
    return hashlib.sha256(
        json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not key:
        raise ApiError(400, "Idempotency-Key is empty")
    return checked_text("Idempotency-Key", key, MAX_IDEMPOTENCY_KEY_LENGTH)


def _job_for_idempotency_key(project_id: int, key: str, request_sha256: str) -> Job | None:
    job = db().scalar(select(Job).where(Job.project_id == project_id, Job.idempotency_key == key))
    if job is not None and job.request_sha256 != request_sha256:
        raise ApiError(409, "this Idempotency-Key was used with a different body")
    return job


def _items_of(job: Job) -> list[JobItem]:
    return list(
        db().scalars(select(JobItem).where(JobItem.job_id == job.id).order_by(JobItem.position))
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


def owned_job(job_id: int, *, for_update: bool = False) -> Job:
    query = select(Job).where(Job.id == job_id, Job.project_id == current_project().id)
    job = db().scalar(query.with_for_update() if for_update else query)
    # Another project's job is "not found", never "forbidden": no existence oracle.
    if job is None:
        raise ApiError(404, f"job {job_id} not found", missing=[{"jobId": job_id}])
    return job


def public_link(public_url: str | None, url: str) -> str:
    """An absolute link for ``url``, which local-disk storage makes relative
    to the API's root: joined to the configured public URL, never to the
    request's Host header (a client could name any host there). Without a
    configured URL the link stays relative to the API's root."""
    if public_url is None:
        return url
    return urljoin(public_url + "/", url.lstrip("/")) if url.startswith("/") else url


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

    document = render_job(job, _items_of(job), link_mask)
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
    return _job_answer(owned_job(job_id))


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
    job = owned_job(job_id, for_update=True)
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
