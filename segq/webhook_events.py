"""Webhook events: which exist, what a job subscribes to, and recording one
as a delivery row in the caller's transaction (the outbox), so an event
exists exactly when the state change that causes it was committed.

Written by the worker (a job starts, an item finishes, a job finishes) and
by the API (a job is canceled); delivered by worker/webhook_delivery.py.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from segq.event_types import EVENT_TYPES as EVENT_TYPES
from segq.event_types import ITEM_COMPLETED as ITEM_COMPLETED
from segq.event_types import ITEM_FAILED as ITEM_FAILED
from segq.event_types import JOB_CANCELED as JOB_CANCELED
from segq.event_types import JOB_COMPLETED as JOB_COMPLETED
from segq.event_types import JOB_END_EVENTS
from segq.event_types import JOB_FAILED as JOB_FAILED
from segq.event_types import JOB_STARTED as JOB_STARTED
from segq.job_document import render_job
from segq.models import DeliveryStatus, Job, JobItem, WebhookDelivery
from segq.replicate_prediction import prediction_event_body, replicate_request

#: What a webhook without ``events`` is told: how its job ended.
DEFAULT_EVENTS = JOB_END_EVENTS
#: The contract's short spellings ("completed") name job events.
SHORT_NAMES = {
    "started": JOB_STARTED,
    "completed": JOB_COMPLETED,
    "failed": JOB_FAILED,
    "canceled": JOB_CANCELED,
}


#: A larger event body is sent without the job's items (GET the job for them).
MAX_BODY_BYTES = 256 * 1024


class UnknownEvent(ValueError):
    pass


def subscribed_events(names: Sequence[str] | None) -> list[str]:
    """The full event names for what a client asked for, in a stable order."""
    if names is None:
        return list(DEFAULT_EVENTS)
    wanted: set[str] = set()
    for name in names:
        full = SHORT_NAMES.get(name, name)
        if full not in EVENT_TYPES:
            raise UnknownEvent(
                f"unknown webhook event {name!r}; events are {', '.join(EVENT_TYPES)}"
            )
        wanted.add(full)
    return [event for event in EVENT_TYPES if event in wanted]


def wants(webhook: dict[str, Any] | None, event_type: str) -> bool:
    """Whether a job's ``webhook`` (None: it has none) subscribes to ``event_type``."""
    return webhook is not None and event_type in webhook["events"]


def new_message_id() -> str:
    """The ``webhook-id`` of one event: random, so it says nothing about
    other jobs, and the same on every retry of the event."""
    return "msg_" + secrets.token_urlsafe(18)


def whole_job_data(session: Session, job: Job) -> dict[str, Any]:
    """A job event's data: the job as GET shows it, without mask URLs."""
    items = session.scalars(
        select(JobItem).where(JobItem.job_id == job.id).order_by(JobItem.position)
    )
    return render_job(job, list(items), None)


def event_body(event_type: str, now: int, data: dict[str, Any]) -> str:
    """An event as webhooks send it (and the API's event stream shows it)."""
    return json.dumps(
        {"type": event_type, "timestamp": now, "data": data},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def _native_event_body(event_type: str, now: int, data: dict[str, Any]) -> str:
    body = event_body(event_type, now, data)
    if len(body.encode()) > MAX_BODY_BYTES:
        # Receivers often refuse large bodies, and a refused one would be
        # retried for a day: send the job without its items instead.
        lean = {k: v for k, v in data.items() if k not in ("items", "failedItems")}
        body = event_body(event_type, now, {**lean, "itemsOmitted": True})
    return body


def record_event(
    session: Session,
    job: Job,
    event_type: str,
    now: int,
    render_data: Callable[[], dict[str, Any]],
) -> WebhookDelivery | None:
    """Add a delivery of ``event_type`` for ``job`` to ``session`` if the job's
    webhook asks for it (``render_data`` is called only then). The caller
    commits it with the state change; a dispatcher sends it after that."""
    if not wants(job.webhook, event_type):
        return None
    assert job.webhook is not None
    if replicate_request(job) is not None:
        # A prediction made through Replicate's API is told in Replicate's shape.
        body = prediction_event_body(session, job)
    else:
        body = _native_event_body(event_type, now, render_data())
    delivery = WebhookDelivery(
        job_id=job.id,
        project_id=job.project_id,
        event_type=event_type,
        url=job.webhook["url"],
        message_id=new_message_id(),
        body=body,
        created_time=now,
        status=DeliveryStatus.PENDING,
        attempt=0,
        failures=0,
        next_attempt_time=now,
    )
    session.add(delivery)
    return delivery
