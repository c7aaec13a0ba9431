"""Service routes outside the project prefix: health, readiness, the API's
own description, and local-disk objects behind signed URLs."""

from __future__ import annotations

import hmac
import logging

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import case, func, select, text

from segq.api.answers import json_answer
from segq.api.context import db, services
from segq.api.errors import ApiError
from segq.api.openapi import OPENAPI_PATH, documented, openapi_document
from segq.api.request_integers import ascii_integer
from segq.api.schemas import HealthResponse, ReadinessResponse, WorkersState
from segq.clock import now_ms
from segq.models import DeliveryStatus, ItemStatus, Job, JobItem, JobStatus, WebhookDelivery
from segq.served_objects import object_headers
from segq.storage import LocalStorage, ObjectNotFound
from segq.worker_processes import workers_overview

log = logging.getLogger(__name__)

service = Blueprint("service", __name__)


@service.get("/healthz")
@documented("The process is up", {200: ("up", HealthResponse)})
def healthz() -> Response:
    return json_answer(HealthResponse(status="ok"))


@service.get("/readyz")
@documented(
    "Database, broker and storage answer",
    {200: ("ready", ReadinessResponse), 503: ("not ready", ReadinessResponse)},
)
def readyz() -> tuple[Response, int, dict[str, str]]:
    checks: dict[str, str] = {}
    try:
        db().execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        with services().celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    try:
        services().storage.check()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"unavailable: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    workers = None
    if checks["database"] == "ok":
        overview = workers_overview(db(), now_ms())
        workers = WorkersState(
            serving=sum(overview.serving.values()),
            paused=sum(overview.paused.values()),
            waitingFor=overview.waiting_for(None),
        )
    body = json_answer(
        ReadinessResponse(
            status="ready" if ready else "unavailable", checks=checks, workers=workers
        )
    )
    if ready:
        return body, 200, {}
    return body, 503, {"Retry-After": "5"}


UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)
#: The embedding gauges count over the items with the highest ids, found by
#: a range scan of the primary key: the recent traffic, at a bounded cost.
RECENT_ITEMS = 10_000
EMBEDDING_SOURCES = ("computed", "local", "shared")
#: Upper bounds (seconds) of the engine-time buckets: from a decode on a
#: cached embedding on a GPU (milliseconds) to ViT-H encoding on a CPU.
ENGINE_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _check_metrics_token(token: str | None) -> None:
    if token is None:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "replace"), token.encode()
    ):
        raise ApiError(
            401,
            "metrics need 'Authorization: Bearer <SEGQ_METRICS_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


@service.get("/metrics")
@documented(
    "Prometheus metrics: the unfinished backlog",
    {200: ("text/plain exposition format", None)},
    errors=(401,),
)
def metrics() -> Response:
    """Prometheus text format, read from Postgres at scrape time (so every API
    process answers the same): the backlog an autoscaler needs. Only
    unfinished rows are counted; they are few and indexed by status.

    The figures are totals over every project: with SEGQ_METRICS_TOKEN set,
    only a scraper holding that token reads them."""
    _check_metrics_token(services().settings.metrics_token)
    session = db()
    now = now_ms()
    lines: list[str] = []
    for name, model, help_text in (
        ("segq_items", JobItem, "Job items by status (unfinished only)."),
        ("segq_jobs", Job, "Jobs by status (unfinished only)."),
    ):
        counts = dict(
            session.execute(
                select(model.status, func.count())
                .where(model.status.in_(UNFINISHED))
                .group_by(model.status)
            ).all()
        )
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for status in UNFINISHED:
            lines.append(f'{name}{{status="{status.value}"}} {counts.get(status, 0)}')
    oldest = session.scalar(
        select(func.min(Job.created_time)).where(Job.status == JobStatus.QUEUED)
    )
    lines += [
        "# HELP segq_oldest_queued_job_age_seconds Age of the oldest job no worker has started.",
        "# TYPE segq_oldest_queued_job_age_seconds gauge",
        f"segq_oldest_queued_job_age_seconds {0 if oldest is None else (now - oldest) / 1000:.3f}",
    ]
    pending, oldest_due = session.execute(
        select(func.count(), func.min(WebhookDelivery.next_attempt_time)).where(
            WebhookDelivery.status == DeliveryStatus.PENDING
        )
    ).one()
    overdue = 0 if oldest_due is None else max(0, now - oldest_due) / 1000
    lines += [
        "# HELP segq_webhook_deliveries_pending Webhook deliveries not yet delivered or given up.",
        "# TYPE segq_webhook_deliveries_pending gauge",
        f"segq_webhook_deliveries_pending {pending}",
        "# HELP segq_webhook_oldest_due_seconds How long the most overdue delivery has waited.",
        "# TYPE segq_webhook_oldest_due_seconds gauge",
        f"segq_webhook_oldest_due_seconds {overdue:.3f}",
    ]
    lines += _worker_lines(now)
    newest = session.scalar(select(func.max(JobItem.id)))  # the window's end, read once
    lines += _embedding_lines(newest)
    lines += _engine_time_lines(newest)
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")


#: Dependencies a worker pauses for; each has a line, 0 while it answers.
PAUSING_DEPENDENCIES = ("storage",)


def _worker_lines(now: int) -> list[str]:
    """The segmenting workers as their heartbeats say (segq/worker_processes.py):
    how many serve, how many are paused, and for how long."""
    overview = workers_overview(db(), now)
    paused_for = {dependency: 0.0 for dependency in PAUSING_DEPENDENCIES}
    for pause in overview.pauses:
        paused_for[pause.dependency] = max(
            paused_for.get(pause.dependency, 0.0), (now - pause.since) / 1000
        )
    name = "segq_worker_processes"
    paused = "segq_workers_paused_seconds"
    return [
        f"# HELP {name} Live segmenting worker processes: serving (taking items), or "
        "paused (taking none while a dependency is down).",
        f"# TYPE {name} gauge",
        f'{name}{{state="serving"}} {sum(overview.serving.values())}',
        f'{name}{{state="paused"}} {sum(overview.paused.values())}',
        f"# HELP {paused} How long workers have been paused for each dependency "
        "(the longest current pause; 0 while it answers).",
        f"# TYPE {paused} gauge",
        *(
            f'{paused}{{dependency="{dependency}"}} {seconds:.3f}'
            for dependency, seconds in paused_for.items()
        ),
    ]


def _embedding_lines(newest: int | None) -> list[str]:
    """Where the recent items' embeddings came from, from their stored
    metrics: computed is a miss of both tiers, local a hit of a worker's
    memory, shared a hit of the embeddings in object storage."""
    session = db()
    source = JobItem.result["metrics"]["embedding"].as_string()
    counts: dict[str | None, int] = {}
    if newest is not None:
        counts = dict(
            session.execute(
                select(source, func.count())
                .where(
                    JobItem.id > newest - RECENT_ITEMS,
                    JobItem.status == ItemStatus.COMPLETED,
                )
                .group_by(source)
            ).all()
        )
    name = "segq_recent_item_embeddings"
    lines = [
        f"# HELP {name} Where the embeddings of the last {RECENT_ITEMS} items came from "
        "(computed: a miss; local, shared: a hit of that tier).",
        f"# TYPE {name} gauge",
    ]
    lines += [f'{name}{{source="{tier}"}} {counts.get(tier, 0)}' for tier in EMBEDDING_SOURCES]
    return lines


def _engine_time_lines(newest: int | None) -> list[str]:
    """The engine time (encode plus decode) of the same recent items, as
    Prometheus histogram buckets. They describe a window, not a running
    total, so they are gauges: ``histogram_quantile`` reads them as they are,
    without ``rate``. The worker's own metrics carry the running histogram."""
    session = db()
    metrics = JobItem.result["metrics"]
    engine_ms = metrics["encodeMs"].as_float() + metrics["decodeMs"].as_float()
    counts = [0] * len(ENGINE_SECONDS_BUCKETS)
    total, total_ms = 0, 0.0
    if newest is not None:
        row = session.execute(
            select(
                func.count(engine_ms),
                func.coalesce(func.sum(engine_ms), 0.0),
                *(
                    func.coalesce(func.sum(case((engine_ms <= bound * 1000, 1), else_=0)), 0)
                    for bound in ENGINE_SECONDS_BUCKETS
                ),
            ).where(
                JobItem.id > newest - RECENT_ITEMS,
                JobItem.status == ItemStatus.COMPLETED,
            )
        ).one()
        total, total_ms, *counts = row
    name = "segq_recent_item_engine_seconds"
    lines = [
        f"# HELP {name} Engine time (encode and decode) of the last {RECENT_ITEMS} "
        "completed items, as histogram buckets.",
        f"# TYPE {name} gauge",
    ]
    lines += [
        f'{name}_bucket{{le="{bound:g}"}} {count}'
        for bound, count in zip(ENGINE_SECONDS_BUCKETS, counts, strict=True)
    ]
    lines += [
        f'{name}_bucket{{le="+Inf"}} {total}',
        f"{name}_sum {float(total_ms) / 1000:.3f}",
        f"{name}_count {total}",
    ]
    return lines


@service.get(OPENAPI_PATH)
def openapi_json() -> Response:
    return jsonify(openapi_document(current_app))


@service.get("/objects/<path:key>")
@documented(
    "A stored object of local-disk storage, through its signed URL (masks, images)",
    {200: ("the object, with the type it was stored as", None)},
    errors=(403, 404),
)
def local_object(key: str) -> Response:
    """Serves objects of local-disk storage to holders of a signed URL, each
    with the type it was stored as and never as a page (segq/served_objects.py).
    The URL is read in the one spelling storage wrote it: one ``expires`` in
    canonical digits, one ``signature``."""
    storage = services().storage
    if not isinstance(storage, LocalStorage):
        raise ApiError(404, "not found")
    expires_spellings = request.args.getlist("expires")
    signatures = request.args.getlist("signature")
    expires = ascii_integer(expires_spellings[0]) if len(expires_spellings) == 1 else None
    if (
        expires is None
        or str(expires) != expires_spellings[0]
        or len(signatures) != 1
        or not storage.verify_signature(key, expires, signatures[0])
    ):
        raise ApiError(403, "this URL is invalid or has expired")
    try:
        data = storage.get(key)
        content_type = storage.content_type(key)
    except (ObjectNotFound, ValueError):
        raise ApiError(404, "not found") from None
    return Response(data, headers=object_headers(content_type))
