"""/context/vision/segment: create segmentation jobs and read them."""

from __future__ import annotations

import logging
import time
from functools import partial

from flask import Blueprint, Response, request, url_for
from sqlalchemy import exists, func, select
from werkzeug.http import http_date, quote_etag

from segq.api.answers import json_answer, json_document
from segq.api.auth import protect_project_routes
from segq.api.context import close_db, current_project, db, services
from segq.api.errors import ApiError
from segq.api.job_answers import (
    ItemsPage,
    ItemTally,
    entity_tag,
    last_modified_time,
    render_job_answer,
)
from segq.api.job_event_stream import (
    KEEPALIVE_FRAME,
    KEEPALIVE_SECONDS,
    KEEPALIVES_PER_RUN,
    RETRY_FRAME,
    last_event_id,
)
from segq.api.job_service import cancel_job as cancel_job_of_project
from segq.api.job_service import create_segmentation_job, owned_job
from segq.api.job_views import view_links
from segq.api.job_waiting import (
    WAITING_PLACE_ENVIRON_KEY,
    Wait,
    WaitingPlace,
    requested_wait_seconds,
)
from segq.api.json_body import max_job_body_bytes, read_json_object
from segq.api.openapi import documented
from segq.api.parking import (
    RESUMED_ENVIRON_KEY,
    Parking,
    park,
    server_draining,
    waits_without_thread,
)
from segq.api.request_integers import request_integer
from segq.api.route_waits import wait_for_job
from segq.api.schemas import (
    EventStreamHeaders,
    JobCreatedResponse,
    JobCreationHeaders,
    JobList,
    JobListQuery,
    JobQuery,
    JobReadHeaders,
    JobResponse,
    JobSummary,
    SegmentRequest,
    cursor_after,
    encode_cursor,
    list_limit,
    parse,
)
from segq.clock import now_ms
from segq.deletion import delete_jobs
from segq.job_document import render_created_job, render_job_summary
from segq.models import ItemStatus, Job, JobItem, JobStatus
from segq.worker_processes import workers_overview

log = logging.getLogger(__name__)

#: The environ keys that carry a parked wait to the runs that resume it.
WAIT_ENVIRON_KEY = "segq.wait"
LOCATION_ENVIRON_KEY = "segq.wait.location"

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
    location = url_for("jobs.get_job", project=current_project().name, job_id=created.job.id)
    wait = _requested_wait()
    waited = None if wait is None else _waited_job_answer(created.job.id, wait, location)
    if waited is not None:
        return waited
    return (
        json_document(JobCreatedResponse, render_created_job(created.job, created.items)),
        200,
        {"Location": location},
    )


def _requested_wait() -> Wait | None:
    """The request's ``Prefer: wait``; in a resumed run, the wait it began.
    A process about to exit ends every wait now: the job as it is answers
    it, and the client's next request goes to a process that stays."""
    wait: Wait | None = request.environ.get(WAIT_ENVIRON_KEY)
    if wait is None:
        seconds = requested_wait_seconds(request.headers.getlist("Prefer"))
        wait = None if seconds is None else Wait.starting_now(seconds)
    if wait is not None and server_draining():
        return Wait(wait.seconds, deadline=time.monotonic())
    return wait


def _waited_job_answer(
    job_id: int, wait: Wait, location: str | None
) -> tuple[Response, int, dict[str, str]] | None:
    """The job once it is finished, or as it is when ``wait`` runs out.

    On segq's HTTP server the request is parked and answered by a later run
    of GET on the job (api/route_waits.py's wait_for_job); elsewhere this
    thread waits. None, waiting for nothing, when every waiting place of
    the process is taken: the request gets its usual answer, as for a
    preference the server does not honour (RFC 7240)."""
    project_id = current_project().id
    owned_job(db(), project_id, job_id)  # 404 before any wait
    place: WaitingPlace | None = request.environ.get(WAITING_PLACE_ENVIRON_KEY)
    if place is None:
        place = services().waiting_requests.reserve(parkable=waits_without_thread())
    if place is None:
        return None
    path = url_for("jobs.get_job", project=current_project().name, job_id=job_id)
    resume = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path.removeprefix(request.script_root),
        # A GET's page of items is asked again; a POST has no query.
        "QUERY_STRING": request.environ.get("QUERY_STRING", "") if request.method == "GET" else "",
        WAIT_ENVIRON_KEY: wait,
        LOCATION_ENVIRON_KEY: location,
        WAITING_PLACE_ENVIRON_KEY: place,
    }
    if wait_for_job(job_id, wait, resume, place):
        # Dropped by the server: the resumed run answers.
        return Response(status=204), 204, {}
    job = owned_job(db(), project_id, job_id)
    answer, status, headers = _job_answer(job, conditional=request.method == "GET")
    headers["Preference-Applied"] = f"wait={wait.seconds}"
    if location is not None:
        headers["Location"] = location
    return answer, status, headers


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


def _job_answer(job: Job, *, conditional: bool) -> tuple[Response, int, dict[str, str]]:
    """The job as JobResponse shows it, page of items as the query asks.
    ``conditional``: a GET, which answers 304 to the ETag it would carry."""
    settings = services().settings
    links = services().signed_links
    session = db()
    page = ItemsPage.of(request.args.get("itemsLimit"), request.args.get("itemsCursor"))
    window = links.window()
    view_url = view_links().page_url(
        current_project().name, job.project_id, job.id, links.expires_time(window)
    )
    tally = ItemTally.of(session, job.id)
    waiting_for = (
        None
        if JobStatus(job.status).finished
        else workers_overview(session, now_ms()).waiting_for(job.engine)
    )
    tag = entity_tag(job, tally, window, page, view_url, waiting_for)
    headers: dict[str, str] = {
        # Caches may keep it, but must ask again (with the tag) before using it.
        "Cache-Control": "private, no-cache",
        "Last-Modified": http_date(last_modified_time(job, tally) // 1000),
    }
    if not JobStatus(job.status).finished:
        headers["Retry-After"] = str(settings.poll_retry_after_seconds)
    if conditional:
        headers["ETag"] = quote_etag(tag, weak=True)
        if request.if_none_match.contains_weak(tag):
            return Response(status=304), 304, headers
    kept = services().job_answers
    body = kept.get(job.id, tag)
    if body is None:
        body = render_job_answer(
            session,
            job,
            tally,
            page,
            partial(links.link, window=window),
            view_url,
            waiting_for=waiting_for,
            kept_items=services().item_texts,
            links_key=(window.number, window.seconds),
        ).encode()
        kept.keep(job.id, tag, body)
    return Response(body, mimetype="application/json"), 200, headers


@jobs.get("/<id:job_id>")
@documented(
    "Read a job's status and results",
    {
        200: ("the job; Retry-After while unfinished; ETag, Last-Modified", JobResponse),
        304: ("unchanged since the If-None-Match ETag: no body", None),
    },
    errors=(400, 404),
    query=JobQuery,
    headers=JobReadHeaders,
)
def get_job(job_id: int) -> tuple[Response, int, dict[str, str]]:
    wait = _requested_wait()
    location = request.environ.get(LOCATION_ENVIRON_KEY)
    waited = None if wait is None else _waited_job_answer(job_id, wait, location)
    if waited is not None:
        return waited
    return _job_answer(owned_job(db(), current_project().id, job_id), conditional=True)


@jobs.get("/<id:job_id>/events")
@documented(
    "Stream the job's events (server-sent events) until it ends",
    {200: ("text/event-stream of the job's events, resumable with Last-Event-ID", None)},
    errors=(400, 404),
    headers=EventStreamHeaders,
)
def stream_job_events(job_id: int) -> Response:
    """Each run sends the events after ``Last-Event-ID`` and, while the job
    is unfinished, parks: the process's fan-out pushes the job's events to
    the parked stream as they come (api/job_event_stream.py), and it runs
    again when a keepalive is due, with the count sent so far as
    Last-Event-ID.

    Where the server cannot park a request (not `segq serve`), the stream
    sends the events there are and ends, holding no thread either; the
    ``retry`` it starts with has EventSource reconnect with Last-Event-ID."""
    project_id = current_project().id
    session = db()
    owned_job(session, project_id, job_id)
    sent = last_event_id(request.headers.get("Last-Event-ID"))
    resumed = request.environ.get(RESUMED_ENVIRON_KEY) is not None
    fan_out = services().job_events
    job_log = fan_out.log(job_id)
    followed = fan_out.followed(job_id)
    with job_log.lock:
        if not followed or job_log.progress is None:
            job_log.refresh(session)
        count = len(job_log.events)
        frames = [job_log.frames_after(sent)] if sent < count else []
        finished = job_log.finished
    close_db()
    if sent > count and not resumed:
        # Every event a client was sent was read from the database before
        # it was sent, so an id past the last is not one this job had.
        raise ApiError(
            400,
            f"Last-Event-ID {sent} is not an event of this stream: "
            f"job {job_id} has had {count} events",
        )
    sent = max(sent, count)
    if not resumed:
        frames.insert(0, RETRY_FRAME)
    elif not frames:
        frames.append(KEEPALIVE_FRAME)
    if not finished:
        park(
            Parking(
                watch=partial(fan_out.follow, job_id, sent),
                deadline=time.monotonic() + KEEPALIVE_SECONDS,
                environ={"HTTP_LAST_EVENT_ID": str(sent)},
                stream=True,
                keepalive=KEEPALIVE_FRAME.encode(),
                keepalives=KEEPALIVES_PER_RUN,
            )
        )
    # An iterator, not a string: a body of unknown length, so the server
    # streams it (chunked) instead of closing it at a Content-Length.
    return Response(
        iter(frames),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@jobs.post("/<id:job_id>/cancel")
@documented(
    "Cancel a job: queued items never run, no further item starts",
    {200: ("the job, canceled", JobResponse)},
    errors=(404, 409),
)
def cancel_job(job_id: int) -> tuple[Response, int, dict[str, str]]:
    """Queued items never run; an item already running finishes, and no
    further item starts. Canceling a canceled job changes nothing."""
    job = cancel_job_of_project(db(), services(), current_project().id, job_id)
    return _job_answer(job, conditional=False)


@jobs.delete("/<id:job_id>")
@documented(
    "Delete a finished or canceled job, its items, webhook deliveries and stored masks",
    {204: ("deleted", None)},
    errors=(404, 409, 503),
)
def delete_job(job_id: int) -> tuple[str, int]:
    """Gone for good: a second DELETE answers 404, as a GET would; the
    server's state after one or two DELETEs is the same, which is what makes
    the method idempotent in HTTP's sense. A job whose items may still write
    (queued or running, or canceled with an item still running) is 409: its
    worker would store masks after they were deleted."""
    session = db()
    job = owned_job(session, current_project().id, job_id, for_update=True)
    if not JobStatus(job.status).finished:
        session.rollback()
        raise ApiError(409, f"job {job_id} is {job.status}; cancel it or wait for it to finish")
    still_running = session.scalar(
        select(exists().where(JobItem.job_id == job.id, JobItem.status == ItemStatus.RUNNING))
    )
    if still_running:
        session.rollback()
        raise ApiError(409, f"job {job_id} is canceled but an item is still running; retry later")
    deleted_objects = delete_jobs(
        session, services().storage, [(job.project_id, job.id)], list_every_job=True
    )
    session.commit()
    log.info("deleted job %d and %d stored objects", job_id, deleted_objects)
    return "", 204
