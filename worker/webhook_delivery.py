"""Delivering webhook events, as plain functions.

Events are rows of ``webhook_deliveries`` written in the same transaction as
the state change they report (segq/webhook_events.py): an outbox. From there:

1. ``dispatch_due`` (every ``SEGQ_WEBHOOK_POLL_SECONDS`` in each worker's main
   process) publishes a wake-up message to the webhook queue for each
   delivery that is due;
2. each message makes one attempt (``deliver``): claim the delivery for a
   bounded time, sign, POST through the SSRF guard, record the attempt;
3. a failed attempt sets when the next one is due, from the retry schedule;
   the dispatcher picks it up then. No Celery countdowns: the schedule lives
   in Postgres, so it survives a broker that loses messages.

A job never waits for any of this, and nothing here writes to a job.
Delivery is at least once: a receiver drops repeats by ``webhook-id``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from segq.clock import now_ms
from segq.db import once_more_if_disconnected
from segq.models import DeliveryStatus, WebhookAttempt, WebhookDelivery
from segq.projects import ensure_webhook_secret, signing_secrets
from segq.url_guard import FetchFailed, FetchPolicy, HostNotFound, UrlRefused, post
from segq.webhook_signing import signature_header

log = logging.getLogger(__name__)

#: Deliveries published per dispatcher pass; a larger backlog takes several.
DELIVERIES_PER_PASS = 1000
#: Kept of what a receiver's error says, in an attempt's record.
MAX_ERROR_LENGTH = 300
#: A delivery this close to due may be claimed: the dispatcher and the
#: deliverer run on different machines whose clocks differ a little, and a
#: claim refused for a few milliseconds would wait for a republish.
CLOCK_TOLERANCE_MS = 2000


@dataclass(frozen=True)
class DeliveryRules:
    """How deliveries are attempted."""

    policy: FetchPolicy
    #: Seconds to wait after each failed attempt; then the delivery is given up.
    retry_delays: tuple[int, ...]

    @property
    def claim_ms(self) -> int:
        """How long one attempt may hold a delivery: the POST is cut off
        after twice the timeout (segq.url_guard.post); one more is margin.
        A deliverer that dies frees the delivery after this."""
        return int(3 * self.policy.timeout_seconds * 1000) + CLOCK_TOLERANCE_MS


def dispatch_due(
    sessions: sessionmaker[Session],
    publish: Callable[[Sequence[int]], None],
    *,
    republish_after_seconds: int,
) -> int:
    """Publish every delivery that is due and has no wake-up message on its
    way: never published since it became due, or published so long ago that
    the message must be lost. Returns how many were published."""
    now = now_ms()
    with sessions.begin() as session:
        due = list(
            session.scalars(
                select(WebhookDelivery.id)
                .where(
                    WebhookDelivery.status == DeliveryStatus.PENDING,
                    WebhookDelivery.next_attempt_time <= now,
                    or_(
                        WebhookDelivery.published_time.is_(None),
                        WebhookDelivery.published_time < WebhookDelivery.next_attempt_time,
                        WebhookDelivery.published_time < now - republish_after_seconds * 1000,
                    ),
                )
                .order_by(WebhookDelivery.next_attempt_time)
                .limit(DELIVERIES_PER_PASS)
                # Dispatchers of several workers share the work, never a row.
                .with_for_update(skip_locked=True)
            )
        )
        if due:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(due))
                .values(published_time=now)
            )
    if due:
        try:
            publish(due)
        except Exception:
            # Due again at the next pass, not after republish_after.
            with sessions.begin() as session:
                session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id.in_(due))
                    .values(published_time=None)
                )
            raise
    return len(due)


@dataclass(frozen=True)
class DeliveryClaim:
    delivery_id: int
    attempt: int
    url: str
    message_id: str
    body: str
    #: The project's secrets that sign this attempt (two during a rotation).
    secrets: list[str]


def claim_delivery(
    sessions: sessionmaker[Session], delivery_id: int, rules: DeliveryRules
) -> DeliveryClaim | None:
    """Take a due delivery for one attempt, or None if it is not due (done,
    waiting for its next retry, or held by another attempt)."""
    now = now_ms()
    with sessions.begin() as session:
        delivery = session.scalar(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_time <= now + CLOCK_TOLERANCE_MS,
            )
            .with_for_update(skip_locked=True)
        )
        if delivery is None:
            return None
        delivery.attempt += 1
        delivery.next_attempt_time = now + rules.claim_ms
        project = ensure_webhook_secret(session, delivery.project_id)
        return DeliveryClaim(
            delivery_id=delivery.id,
            attempt=delivery.attempt,
            url=delivery.url,
            message_id=delivery.message_id,
            body=delivery.body,
            secrets=signing_secrets(project, now),
        )


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    latency_ms: int
    error: str | None
    #: No further attempt can succeed: 410 Gone, a URL the guard refuses
    #: (its host's addresses included), or a host name that does not exist.
    final: bool = False

    @property
    def delivered(self) -> bool:
        return self.error is None


def send(claim: DeliveryClaim, policy: FetchPolicy) -> AttemptResult:
    """POST the event, signed now, and judge the answer: any 2xx delivers."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": claim.message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(
            claim.secrets, claim.message_id, timestamp, claim.body
        ),
    }
    started = time.monotonic()

    def elapsed_ms() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        status = post(claim.url, claim.body.encode(), headers, policy)
    except UrlRefused as exc:
        return AttemptResult(
            None, elapsed_ms(), f"URL refused: {exc}"[:MAX_ERROR_LENGTH], final=True
        )
    except HostNotFound as exc:
        # NXDOMAIN is not retried: a receiver's name does not come into
        # being within the retry schedule. A resolver that does not answer
        # (EAI_AGAIN) is a FetchFailed, retried below.
        return AttemptResult(None, elapsed_ms(), str(exc)[:MAX_ERROR_LENGTH], final=True)
    except FetchFailed as exc:
        return AttemptResult(None, elapsed_ms(), str(exc)[:MAX_ERROR_LENGTH])
    except Exception as exc:
        # Whatever else goes wrong is recorded and retried like a failed
        # answer: a delivery never stays claimed with no trace.
        log.exception("webhook delivery %s failed unexpectedly", claim.delivery_id)
        error = f"delivery failed: {type(exc).__name__}: {exc}"
        return AttemptResult(None, elapsed_ms(), error[:MAX_ERROR_LENGTH])
    latency = elapsed_ms()
    if 200 <= status < 300:
        return AttemptResult(status, latency, None)
    if status == 410:
        return AttemptResult(status, latency, "the receiver answered 410 Gone", final=True)
    if 300 <= status < 400:
        return AttemptResult(status, latency, f"the receiver redirected ({status}); not followed")
    return AttemptResult(status, latency, f"the receiver answered {status}")


def record_attempt(
    sessions: sessionmaker[Session],
    claim: DeliveryClaim,
    result: AttemptResult,
    rules: DeliveryRules,
    attempted_time: int,
) -> DeliveryStatus | None:
    """Record the attempt and decide what follows: delivered, given up, or
    retried after the next delay of the schedule. The delivery changes only
    if this attempt is still its latest; returns its new status, or None."""
    with sessions.begin() as session:
        delivery = session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.id == claim.delivery_id).with_for_update()
        )
        if delivery is None:
            return None  # its job was deleted while this attempt ran
        session.add(
            WebhookAttempt(
                delivery_id=claim.delivery_id,
                attempt=claim.attempt,
                attempted_time=attempted_time,
                status_code=result.status_code,
                latency_ms=result.latency_ms,
                error=result.error,
            )
        )
        if delivery.attempt != claim.attempt or delivery.status != DeliveryStatus.PENDING:
            return None
        if result.delivered:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.next_attempt_time = None
            return DeliveryStatus.DELIVERED
        delivery.failures += 1
        if result.final or delivery.failures > len(rules.retry_delays):
            delivery.status = DeliveryStatus.FAILED
            delivery.next_attempt_time = None
            return DeliveryStatus.FAILED
        delivery.next_attempt_time = now_ms() + rules.retry_delays[delivery.failures - 1] * 1000
        return DeliveryStatus.PENDING


class DeliveryOutcome(StrEnum):
    DELIVERED = "delivered"
    RETRYING = "retrying"
    GIVEN_UP = "given_up"
    #: Not due, or the delivery moved on while this attempt ran.
    SKIPPED = "skipped"


def deliver(
    sessions: sessionmaker[Session], delivery_id: int, rules: DeliveryRules
) -> DeliveryOutcome:
    """Make one attempt at a delivery, if it is due."""
    # A connection that had died fails the transaction once (segq/db.py).
    # A repeated claim after a claim that did land finds the delivery in
    # flight and skips it (the claim runs out and the dispatcher sends it
    # again); a repeated record after one that did land may add the
    # attempt's row twice, and changes the delivery once.
    claim = once_more_if_disconnected(lambda: claim_delivery(sessions, delivery_id, rules))
    if claim is None:
        return DeliveryOutcome.SKIPPED
    attempted_time = now_ms()
    result = send(claim, rules.policy)
    status = once_more_if_disconnected(
        lambda: record_attempt(sessions, claim, result, rules, attempted_time)
    )
    if result.error is not None:
        log.info("webhook delivery %s attempt %s: %s", delivery_id, claim.attempt, result.error)
    if status is None:
        return DeliveryOutcome.SKIPPED
    return {
        DeliveryStatus.DELIVERED: DeliveryOutcome.DELIVERED,
        DeliveryStatus.PENDING: DeliveryOutcome.RETRYING,
        DeliveryStatus.FAILED: DeliveryOutcome.GIVEN_UP,
    }[status]
