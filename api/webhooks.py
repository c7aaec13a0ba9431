"""Webhooks: the project's signing secret, and each job's deliveries.

Events are recorded by whoever changes a job (segq/webhook_events.py) and
delivered by workers (worker/webhook_delivery.py); here clients read the
secret, rotate it, see every attempt and ask for a delivery again."""

from __future__ import annotations

from flask import Blueprint, Response, request
from sqlalchemy import func, select

from segq.api.answers import json_answer
from segq.api.auth import protect_project_routes
from segq.api.context import current_project, db, services
from segq.api.errors import ApiError
from segq.api.job_service import owned_job
from segq.api.openapi import documented
from segq.api.schemas import (
    PageQuery,
    WebhookAttemptRecord,
    WebhookDeliveryList,
    WebhookDeliveryResponse,
    WebhookSecret,
    cursor_after,
    encode_cursor,
    list_limit,
)
from segq.clock import now_ms
from segq.models import DeliveryStatus, Project, WebhookAttempt, WebhookDelivery
from segq.projects import SECRET_ROTATION_GRACE_MS, ensure_webhook_secret, rotate_webhook_secret
from segq.queue import enqueue_deliveries

webhooks = Blueprint("webhooks", __name__, url_prefix="/api/v1/projects/<project>")
protect_project_routes(webhooks)

#: Attempts shown per delivery: the latest ones (redeliveries can add many).
ATTEMPTS_SHOWN = 25


def _secret_response(project: Project) -> WebhookSecret:
    rotated = project.webhook_secret_rotated_time
    assert project.webhook_secret is not None  # made before it is shown
    return WebhookSecret(
        secret=project.webhook_secret,
        rotatedTime=rotated,
        previousSecretExpiresTime=(
            rotated + SECRET_ROTATION_GRACE_MS
            if rotated is not None and project.webhook_previous_secret is not None
            else None
        ),
    )


@webhooks.get("/webhooks/secret")
@documented(
    "The project's webhook signing secret (made on first read)",
    {200: ("the secret", WebhookSecret)},
)
def read_secret() -> Response:
    """The secret receivers verify signatures with; made on first read."""
    session = db()
    project = ensure_webhook_secret(session, current_project().id)
    session.commit()
    return json_answer(_secret_response(project))


@webhooks.post("/webhooks/secret")
@documented(
    "Rotate the secret; the previous one also signs for a day",
    {200: ("the new secret", WebhookSecret)},
)
def rotate_secret() -> Response:
    """A new secret. Deliveries are signed with both for a day, so
    receivers can switch over without rejecting any."""
    session = db()
    project = rotate_webhook_secret(session, current_project().id, now_ms())
    session.commit()
    return json_answer(_secret_response(project))


def _delivery_response(
    delivery: WebhookDelivery, attempts: list[WebhookAttempt]
) -> WebhookDeliveryResponse:
    return WebhookDeliveryResponse(
        deliveryId=delivery.id,
        type=delivery.event_type,
        url=delivery.url,
        webhookId=delivery.message_id,
        status=DeliveryStatus(delivery.status),
        createdTime=delivery.created_time,
        nextAttemptTime=(
            delivery.next_attempt_time if delivery.status == DeliveryStatus.PENDING else None
        ),
        attempts=[
            WebhookAttemptRecord(
                attempt=attempt.attempt,
                attemptedTime=attempt.attempted_time,
                statusCode=attempt.status_code,
                latencyMs=attempt.latency_ms,
                error=attempt.error,
            )
            for attempt in attempts
        ],
    )


def _latest_attempts(delivery_ids: list[int]) -> dict[int, list[WebhookAttempt]]:
    """The last ATTEMPTS_SHOWN attempts of each delivery, oldest first."""
    if not delivery_ids:
        return {}
    rank = (
        func.row_number()
        .over(partition_by=WebhookAttempt.delivery_id, order_by=WebhookAttempt.id.desc())
        .label("rank")
    )
    ranked = (
        select(WebhookAttempt.id, rank)
        .where(WebhookAttempt.delivery_id.in_(delivery_ids))
        .subquery()
    )
    rows = db().scalars(
        select(WebhookAttempt)
        .join(ranked, ranked.c.id == WebhookAttempt.id)
        .where(ranked.c.rank <= ATTEMPTS_SHOWN)
        .order_by(WebhookAttempt.id)
    )
    attempts: dict[int, list[WebhookAttempt]] = {}
    for attempt in rows:
        attempts.setdefault(attempt.delivery_id, []).append(attempt)
    return attempts


@webhooks.get("/context/vision/segment/<id:job_id>/webhook-deliveries")
@documented(
    "The job's webhook deliveries, oldest first, with their attempts",
    {200: ("a page of deliveries", WebhookDeliveryList)},
    errors=(400, 404),
    query=PageQuery,
)
def list_deliveries(job_id: int) -> Response:
    """The job's deliveries, oldest first, with their latest attempts."""
    job = owned_job(db(), current_project().id, job_id)
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)
    cursor = cursor_after(request.args.get("cursor"))
    if cursor is not None:
        query = query.where(WebhookDelivery.id > cursor)
    limit = list_limit(request.args.get("limit"))
    page = list(db().scalars(query.order_by(WebhookDelivery.id).limit(limit + 1)))
    more = len(page) > limit
    page = page[:limit]
    attempts = _latest_attempts([delivery.id for delivery in page])
    return json_answer(
        WebhookDeliveryList(
            items=[_delivery_response(d, attempts.get(d.id, [])) for d in page],
            nextCursor=encode_cursor(page[-1].id) if more else None,
        )
    )


def _attempt_in_flight(delivery: WebhookDelivery, now: int) -> bool:
    """Claimed by an attempt that has not recorded its outcome, and not yet
    given up for dead. Starting another beside it would only POST twice."""
    if delivery.status != DeliveryStatus.PENDING or (delivery.next_attempt_time or 0) <= now:
        return False
    recorded = db().scalar(
        select(WebhookAttempt.id).where(
            WebhookAttempt.delivery_id == delivery.id,
            WebhookAttempt.attempt == delivery.attempt,
        )
    )
    return delivery.attempt > 0 and recorded is None


@webhooks.post("/context/vision/segment/<id:job_id>/webhook-deliveries/<id:delivery_id>/redeliver")
@documented(
    "Send a delivery again now, with the same webhook-id",
    {202: ("the delivery, pending", WebhookDeliveryResponse)},
    errors=(404, 409),
)
def redeliver(job_id: int, delivery_id: int) -> tuple[Response, int]:
    """Send the event again now, with a fresh retry schedule and the same
    webhook-id (receivers that saw it already drop it)."""
    session = db()
    job = owned_job(db(), current_project().id, job_id)
    delivery = session.scalar(
        select(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.job_id == job.id)
        .with_for_update()
    )
    if delivery is None:
        raise ApiError(
            404, f"delivery {delivery_id} not found", missing=[{"deliveryId": delivery_id}]
        )
    now = now_ms()
    if _attempt_in_flight(delivery, now):
        wait_seconds = max(1, ((delivery.next_attempt_time or now) - now) // 1000)
        raise ApiError(
            409,
            f"an attempt of delivery {delivery_id} is under way; ask again once it is recorded",
            headers={"Retry-After": str(wait_seconds)},
        )
    delivery.status = DeliveryStatus.PENDING
    delivery.failures = 0
    delivery.next_attempt_time = now
    delivery.published_time = now
    session.commit()
    try:
        enqueue_deliveries(services().celery, [delivery.id])
    except Exception:
        # Pending and due: the dispatcher sends it at its next pass.
        delivery.published_time = None
        session.commit()
    attempts = _latest_attempts([delivery.id])
    return json_answer(_delivery_response(delivery, attempts.get(delivery.id, []))), 202
