"""Webhooks end to end against a real HTTP receiver on loopback: events are
recorded with the job's state changes, delivered by their own task, signed
per Standard Webhooks (checked with the `standardwebhooks` package, as a
receiver would), retried on a schedule, and recorded attempt by attempt."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from segq import webhook_events
from segq.api.app import create_app
from segq.cli.main import main
from segq.models import DeliveryStatus, Job, WebhookAttempt, WebhookDelivery
from segq.queue import SEGMENT_QUEUE, WEBHOOK_QUEUE, enqueue_deliveries
from segq.settings import Settings, SettingsError
from segq.storage import S3Storage
from segq.url_guard import FetchPolicy, parse_networks
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.periodic import PeriodicPass
from segq.worker.pipeline import process_item
from segq.worker.runtime import DeliveryRuntime, SegmentRuntime, WorkerRuntime, attach_runtime
from segq.worker.webhook_delivery import (
    DeliveryOutcome,
    DeliveryRules,
    claim_delivery,
    deliver,
    dispatch_due,
)
from tests.support.fake_dns import fake_dns
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.in_process_workers import TEST_LIMITS
from tests.support.live_processes import REPO, Worker
from tests.support.refused_urls import INTERNAL_SPELLINGS
from tests.support.services import REDIS_URL
from tests.support.tcp_proxy import TcpProxy
from tests.support.tenants import Tenant, make_tenant

LOOPBACK = "127.0.0.1/32"
ALL_EVENTS = ["job.started", "job.completed", "job.failed", "item.completed", "item.failed"]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    time: float


@dataclass
class Receiver:
    """A webhook receiver: records each request and answers the next of
    ``answers`` (then 200); an answer is a status, (status, delay), or
    "drip": headers one byte at a time, for ever."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    answers: list[int | tuple[int, float] | str] = field(default_factory=list)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.received]

    def wait_for(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, f"{len(self.received)} of {count} arrived"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                state.received.append(
                    Received(self.path, dict(self.headers), body, time.monotonic())
                )
                answer = state.answers.pop(0) if state.answers else 200
            if answer == "drip":
                with contextlib.suppress(OSError):  # the sender hangs up
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                    for _ in range(200):
                        self.wfile.write(b"X")
                        self.wfile.flush()
                        time.sleep(0.1)
                return
            assert not isinstance(answer, str)
            status, delay = answer if isinstance(answer, tuple) else (answer, 0.0)
            time.sleep(delay)
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", f"{state.url}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def rules(timeout: float = 2.0, retry_delays: tuple[int, ...] = (1, 1)) -> DeliveryRules:
    return DeliveryRules(
        FetchPolicy(
            max_bytes=0,
            timeout_seconds=timeout,
            max_redirects=0,
            allowed_networks=parse_networks(LOOPBACK),
        ),
        retry_delays,
    )


@pytest.fixture
def hook_app(
    settings: Settings, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> Flask:
    # The receiver is on loopback, which the SSRF guard refuses unless allowed.
    return create_app(
        replace(settings, webhook_allowed_networks=LOOPBACK), storage=storage, celery=celery_app
    )


@pytest.fixture
def hooked(hook_app: Flask, sessions: sessionmaker[Session]) -> Tenant:
    return make_tenant(hook_app.test_client(), sessions, "acme")


def secret_of(tenant: Tenant) -> str:
    response = tenant.client.get(tenant.url("/webhooks/secret"), headers=tenant.headers)
    assert response.status_code == 200
    secret: str = response.json["secret"]
    assert secret.startswith("whsec_")
    return secret


def submit(tenant: Tenant, webhook: dict[str, Any], items: int = 1) -> int:
    file_ids = [tenant.upload(png_bytes(160, 120, seed)).json["id"] for seed in range(items)]
    body = {**scene_prompt_body(file_ids[0]), "webhook": webhook}
    body["items"] = [{"fileId": file_id} for file_id in file_ids]
    response = tenant.post_job(body)
    assert response.status_code == 200, response.json
    job_id: int = response.json["jobId"]
    return job_id


def run_items(sessions: sessionmaker[Session], storage: S3Storage) -> None:
    from segq.models import JobItem

    with sessions() as session:
        ids = list(session.scalars(select(JobItem.id).order_by(JobItem.id)))
    engine = GrabCutEngine()
    for item_id in ids:
        process_item(
            sessions, storage, engine, item_id, lease_seconds=60, max_attempts=3, limits=TEST_LIMITS
        )


def drain(
    sessions: sessionmaker[Session],
    delivery_rules: DeliveryRules,
    done: Callable[[], bool],
    timeout: float = 20,
) -> list[DeliveryOutcome]:
    """The dispatcher and the delivery task, called in turn until ``done``."""
    outcomes: list[DeliveryOutcome] = []
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not done; outcomes so far {outcomes}"
        published: list[int] = []
        dispatch_due(sessions, published.extend, republish_after_seconds=300)
        outcomes += [deliver(sessions, delivery_id, delivery_rules) for delivery_id in published]
        time.sleep(0.05)
    return outcomes


def deliveries(sessions: sessionmaker[Session]) -> list[WebhookDelivery]:
    with sessions() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def all_settled(sessions: sessionmaker[Session]) -> Callable[[], bool]:
    return lambda: all(d.status != DeliveryStatus.PENDING for d in deliveries(sessions))


def without_urls(document: Any) -> Any:
    """A GET job body as webhooks carry it: mask links without url and
    expiry, and no signed viewer link."""
    if isinstance(document, dict):
        return {
            key: without_urls(value)
            for key, value in document.items()
            if key not in ("url", "expiresTime", "viewUrl")
        }
    if isinstance(document, list):
        return [without_urls(value) for value in document]
    return document


def test_every_event_arrives_signed_and_verifiable(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    job_id = submit(hooked, {"url": f"{receiver.url}/hook", "events": ALL_EVENTS}, items=2)
    run_items(sessions, storage)
    drain(sessions, rules(), all_settled(sessions))

    verifier = Webhook(secret_of(hooked))
    payloads = [verifier.verify(r.body, r.headers) for r in receiver.received]
    types = sorted(p["type"] for p in payloads)
    assert types == ["item.completed", "item.completed", "job.completed", "job.started"]
    ids = [r.headers["webhook-id"] for r in receiver.received]
    assert len(set(ids)) == 4
    assert all(r.headers["Content-Type"] == "application/json" for r in receiver.received)

    finished = next(p for p in payloads if p["type"] == "job.completed")
    assert finished["data"] == without_urls(hooked.get_job(job_id).json)
    assert "url" not in json.dumps(finished["data"]["items"])
    items = [p for p in payloads if p["type"] == "item.completed"]
    assert {p["data"]["progress"]["completed"] for p in items} == {1, 2}
    assert all(len(p["data"]["items"]) == 1 and p["data"]["items"][0]["segments"] for p in items)
    started = next(p for p in payloads if p["type"] == "job.started")
    assert started["data"]["status"] == "Running"
    assert all(isinstance(p["timestamp"], int) for p in payloads)


def test_a_signature_from_another_secret_or_a_changed_body_is_rejected(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    from standardwebhooks.webhooks import WebhookVerificationError

    submit(hooked, {"url": receiver.url})
    run_items(sessions, storage)
    drain(sessions, rules(), all_settled(sessions))
    (request,) = receiver.received
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 43 + "=").verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret_of(hooked)).verify(request.body + b" ", request.headers)


def test_default_events_and_short_names(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    submit(hooked, {"url": receiver.url})  # default: how the job ended
    submit(hooked, {"url": receiver.url, "events": ["completed"]})
    canceled = submit(hooked, {"url": receiver.url, "events": ["canceled", "item.failed"]})
    hooked.client.post(
        hooked.url(f"/context/vision/segment/{canceled}/cancel"), headers=hooked.headers
    )
    run_items(sessions, storage)
    drain(sessions, rules(), all_settled(sessions))
    assert sorted(b["type"] for b in receiver.bodies()) == [
        "job.canceled",
        "job.completed",
        "job.completed",
    ]
    canceled_event = next(b for b in receiver.bodies() if b["type"] == "job.canceled")
    assert canceled_event["data"]["status"] == "Canceled"
    assert canceled_event["data"]["jobId"] == canceled


def test_failures_are_retried_with_the_same_id_and_every_attempt_is_recorded(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    receiver.answers = [500, 503]
    job_id = submit(hooked, {"url": receiver.url})
    run_items(sessions, storage)
    job_before = without_urls(hooked.get_job(job_id).json)
    outcomes = drain(sessions, rules(retry_delays=(1, 1, 1)), all_settled(sessions))
    assert outcomes == [
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.DELIVERED,
    ]

    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    assert len({r.body for r in receiver.received}) == 1
    gaps = [b.time - a.time for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps  # the schedule's delays were kept
    secret = secret_of(hooked)
    for request in receiver.received:
        Webhook(secret).verify(request.body, request.headers)

    listing = hooked.client.get(
        hooked.url(f"/context/vision/segment/{job_id}/webhook-deliveries"), headers=hooked.headers
    ).json
    (delivery,) = listing["items"]
    assert delivery["status"] == "Delivered"
    assert delivery["webhookId"] == receiver.received[0].headers["webhook-id"]
    assert [a["statusCode"] for a in delivery["attempts"]] == [500, 503, 200]
    assert [a["attempt"] for a in delivery["attempts"]] == [1, 2, 3]
    assert delivery["attempts"][0]["error"] == "the receiver answered 500"
    assert delivery["attempts"][2]["error"] is None
    assert all(a["latencyMs"] >= 0 and a["attemptedTime"] > 0 for a in delivery["attempts"])
    assert delivery["nextAttemptTime"] is None
    # A delivery failure never changes the job.
    assert without_urls(hooked.get_job(job_id).json) == job_before


def test_deliveries_give_up_when_the_schedule_runs_out(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    receiver.answers = [500] * 10
    submit(hooked, {"url": receiver.url})
    run_items(sessions, storage)
    outcomes = drain(sessions, rules(retry_delays=(1, 1)), all_settled(sessions))
    assert outcomes == [
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.GIVEN_UP,
    ]
    (delivery,) = deliveries(sessions)
    assert delivery.status == DeliveryStatus.FAILED
    assert len(receiver.received) == 3


def test_410_gone_stops_retries_and_redirects_are_failures(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    receiver.answers = [410]
    submit(hooked, {"url": f"{receiver.url}/gone"})
    run_items(sessions, storage)
    assert drain(sessions, rules(), all_settled(sessions)) == [DeliveryOutcome.GIVEN_UP]

    receiver.answers = [302, 200]
    submit(hooked, {"url": f"{receiver.url}/moved"})
    run_items(sessions, storage)
    assert drain(sessions, rules(), all_settled(sessions)) == [
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.DELIVERED,
    ]
    # The redirect's target was never asked: the retry went to the same URL.
    assert [r.path for r in receiver.received] == ["/gone", "/moved", "/moved"]


def test_a_slow_receiver_times_out_and_never_holds_the_job(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    receiver.answers = [(200, 3.0)]
    job_id = submit(hooked, {"url": receiver.url})
    run_items(sessions, storage)
    assert hooked.get_job(job_id).json["status"] == "Completed"  # before any delivery
    outcomes = drain(sessions, rules(timeout=0.5), all_settled(sessions))
    assert outcomes == [DeliveryOutcome.RETRYING, DeliveryOutcome.DELIVERED]
    listing = hooked.client.get(
        hooked.url(f"/context/vision/segment/{job_id}/webhook-deliveries"), headers=hooked.headers
    ).json
    first = listing["items"][0]["attempts"][0]
    assert first["statusCode"] is None
    assert first["error"] == "no answer within 0.5 s"
    assert 400 <= first["latencyMs"] < 2500


def test_a_receiver_that_drips_its_answer_is_cut_off(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    # Each byte comes within the socket timeout, so only the deadline on the
    # whole exchange (twice the timeout) ends the attempt.
    receiver.answers = ["drip"]
    job_id = submit(hooked, {"url": receiver.url})
    run_items(sessions, storage)
    started = time.monotonic()
    assert drain(sessions, rules(timeout=0.5), all_settled(sessions)) == [
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.DELIVERED,
    ]
    assert time.monotonic() - started < 5
    listing = hooked.client.get(
        hooked.url(f"/context/vision/segment/{job_id}/webhook-deliveries"), headers=hooked.headers
    ).json
    first = listing["items"][0]["attempts"][0]
    assert first["error"] == "the answer took longer than 1 s"
    assert 900 <= first["latencyMs"] < 2000


def test_webhook_urls_pass_the_ssrf_guard(
    other_tenant: Tenant,
    hooked: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant = other_tenant  # on an app with the default guard: loopback refused
    file_id = tenant.upload(png_bytes(160, 120)).json["id"]
    for url in (
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:10.0.0.1]/",
        "ftp://example.com/hook",
        "http://user:pw@example.com/",
        f"http://{'a' * 64}.example.com/",
        "http://例え.jp/",
        *INTERNAL_SPELLINGS,
    ):
        response = tenant.post_job({**scene_prompt_body(file_id), "webhook": {"url": url}})
        assert response.status_code == 400, (url, response.json)
        assert response.json["error"]["message"].startswith("webhook.url: ")
    for bad in ({"url": ""}, {"url": "https://example.com", "events": ["job.exploded"]}):
        response = tenant.post_job({**scene_prompt_body(file_id), "webhook": bad})
        assert response.status_code == 400, (bad, response.json)
    # Nothing of the refused jobs was stored or published.
    assert count_rows(sessions, Job) == 0
    queues = redis.Redis.from_url(REDIS_URL)
    assert queues.llen(SEGMENT_QUEUE) == 0
    queues.close()

    # A name that resolves only to addresses the guard refuses passes the
    # static check and is refused at delivery, for good: one attempt.
    dns = fake_dns(monkeypatch)
    dns.set("loopback.segq.test", ["127.0.0.1", "::1"])
    submit(hooked, {"url": receiver.url.replace("127.0.0.1", "loopback.segq.test")})
    run_items(sessions, storage)
    strict = replace(rules(), policy=replace(rules().policy, allowed_networks=()))
    assert drain(sessions, strict, all_settled(sessions)) == [DeliveryOutcome.GIVEN_UP]
    assert receiver.received == []
    assert [a.error for a in attempts(sessions)] == [
        "URL refused: loopback.segq.test resolves to a private, loopback or reserved address"
    ]


def test_a_receiver_name_with_any_refused_address_is_never_dialled(
    hooked: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 127.0.0.1 (the receiver) is allowed here; 10.0.0.1 is not, so the name
    # is refused before either is dialled.
    fake_dns(monkeypatch).set("mixed.segq.test", ["127.0.0.1", "10.0.0.1"])
    submit(hooked, {"url": receiver.url.replace("127.0.0.1", "mixed.segq.test")})
    run_items(sessions, storage)
    assert drain(sessions, rules(), all_settled(sessions)) == [DeliveryOutcome.GIVEN_UP]
    assert receiver.received == []


def test_a_receiver_name_that_does_not_exist_fails_for_good_at_once(
    hooked: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dns = fake_dns(monkeypatch)
    dns.set("gone.segq.test", socket.EAI_NONAME)
    submit(hooked, {"url": receiver.url.replace("127.0.0.1", "gone.segq.test")})
    run_items(sessions, storage)
    assert drain(sessions, rules(retry_delays=(1, 1)), all_settled(sessions)) == [
        DeliveryOutcome.GIVEN_UP
    ]
    (delivery,) = deliveries(sessions)
    assert (delivery.status, delivery.failures) == (DeliveryStatus.FAILED, 1)
    assert [a.error for a in attempts(sessions)] == [
        "gone.segq.test does not resolve: Name or service not known"
    ]
    assert dns.asked == ["gone.segq.test"]


def test_a_resolver_that_does_not_answer_is_retried(
    hooked: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dns = fake_dns(monkeypatch)
    dns.set("flaky.segq.test", socket.EAI_AGAIN, socket.EAI_FAIL, ["127.0.0.1"])
    submit(hooked, {"url": receiver.url.replace("127.0.0.1", "flaky.segq.test")})
    run_items(sessions, storage)
    assert drain(sessions, rules(retry_delays=(1, 1)), all_settled(sessions)) == [
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.DELIVERED,
    ]
    assert len(receiver.received) == 1
    assert receiver.received[0].headers["Host"] == receiver.url.replace(
        "http://127.0.0.1", "flaky.segq.test"
    )


def attempts(sessions: sessionmaker[Session]) -> list[WebhookAttempt]:
    with sessions() as session:
        return list(session.scalars(select(WebhookAttempt).order_by(WebhookAttempt.id)))


def count_rows(sessions: sessionmaker[Session], model: Any) -> int:
    with sessions() as session:
        return len(list(session.scalars(select(model))))


def test_rotation_signs_with_both_secrets_for_a_while(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    old = secret_of(hooked)
    assert secret_of(hooked) == old  # stable until rotated
    rotated = hooked.client.post(hooked.url("/webhooks/secret"), headers=hooked.headers).json
    new = rotated["secret"]
    assert new != old and new.startswith("whsec_")
    assert rotated["previousSecretExpiresTime"] - rotated["rotatedTime"] == 24 * 3600 * 1000
    submit(hooked, {"url": receiver.url})
    run_items(sessions, storage)
    drain(sessions, rules(), all_settled(sessions))
    (request,) = receiver.received
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(request.body, request.headers)
    Webhook(new).verify(request.body, request.headers)


def test_redeliver_sends_the_same_event_again(
    hooked: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    receiver: Receiver,
    other_tenant: Tenant,
) -> None:
    job_id = submit(hooked, {"url": receiver.url})
    run_items(sessions, storage)
    drain(sessions, rules(), all_settled(sessions))
    (delivery,) = deliveries(sessions)
    path = f"/context/vision/segment/{job_id}/webhook-deliveries/{delivery.id}/redeliver"

    answer = hooked.client.post(hooked.url(path), headers=hooked.headers)
    assert answer.status_code == 202
    assert answer.json["status"] == "Pending"
    # The API published a wake-up message on the webhook queue; run what it asks.
    queued = redis.Redis.from_url(REDIS_URL)
    assert queued.llen(WEBHOOK_QUEUE) == 1
    queued.close()
    assert deliver(sessions, delivery.id, rules()) == DeliveryOutcome.DELIVERED
    assert len(receiver.received) == 2
    assert receiver.received[0].headers["webhook-id"] == receiver.received[1].headers["webhook-id"]
    assert receiver.received[0].body == receiver.received[1].body

    # While an attempt is under way, another would only POST twice.
    assert claim_delivery(sessions, delivery.id, rules()) is None  # delivered: not due
    hooked.client.post(hooked.url(path), headers=hooked.headers)
    assert claim_delivery(sessions, delivery.id, rules()) is not None
    busy = hooked.client.post(hooked.url(path), headers=hooked.headers)
    assert busy.status_code == 409 and busy.headers["Retry-After"]

    # Another project's job, or a delivery of another job: not found.
    other = other_tenant.client.post(other_tenant.url(path), headers=other_tenant.headers)
    assert other.status_code == 404
    other_job = submit(hooked, {"url": receiver.url})
    wrong = f"/context/vision/segment/{other_job}/webhook-deliveries/{delivery.id}/redeliver"
    assert hooked.client.post(hooked.url(wrong), headers=hooked.headers).status_code == 404
    assert (
        hooked.client.get(
            hooked.url(f"/context/vision/segment/{job_id}/webhook-deliveries?cursor=%%"),
            headers=hooked.headers,
        ).status_code
        == 400
    )


def test_delivery_listing_pages_with_a_cursor(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    job_id = submit(hooked, {"url": receiver.url, "events": ALL_EVENTS}, items=3)
    run_items(sessions, storage)
    seen: list[int] = []
    cursor = ""
    while True:
        page = hooked.client.get(
            hooked.url(f"/context/vision/segment/{job_id}/webhook-deliveries?limit=2{cursor}"),
            headers=hooked.headers,
        ).json
        seen += [d["deliveryId"] for d in page["items"]]
        if page["nextCursor"] is None:
            break
        cursor = f"&cursor={page['nextCursor']}"
    assert seen == sorted(seen) and len(seen) == 5  # started, 3 items, completed
    assert all(d.status == DeliveryStatus.PENDING for d in deliveries(sessions))
    metrics = hooked.client.get("/metrics").get_data(as_text=True)
    assert "segq_webhook_deliveries_pending 5\n" in metrics


def test_a_lost_wake_up_message_is_sent_again(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    submit(hooked, {"url": receiver.url})
    run_items(sessions, storage)
    lost: list[int] = []
    assert dispatch_due(sessions, lost.extend, republish_after_seconds=300) == 1
    # Published and not yet stale: not sent twice.
    assert dispatch_due(sessions, lost.extend, republish_after_seconds=300) == 0
    time.sleep(1.1)
    again: list[int] = []
    assert dispatch_due(sessions, again.extend, republish_after_seconds=1) == 1
    assert again == lost
    assert deliver(sessions, again[0], rules()) == DeliveryOutcome.DELIVERED
    # Duplicate wake-ups are harmless: the delivery is no longer due.
    assert deliver(sessions, lost[0], rules()) == DeliveryOutcome.SKIPPED
    assert len(receiver.received) == 1


def test_a_delivery_whose_deliverer_died_is_attempted_again(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    submit(hooked, {"url": receiver.url})
    run_items(sessions, storage)
    quick = rules(timeout=0.5)
    (delivery,) = deliveries(sessions)
    # A deliverer claims the delivery and dies before it records anything.
    assert claim_delivery(sessions, delivery.id, quick) is not None
    assert deliver(sessions, delivery.id, quick) == DeliveryOutcome.SKIPPED  # still held
    started = time.monotonic()
    assert drain(sessions, quick, all_settled(sessions)) == [DeliveryOutcome.DELIVERED]
    assert time.monotonic() - started >= 1.0  # once the claim (3 x 0.5 s) ran out
    (request,) = receiver.received
    Webhook(secret_of(hooked)).verify(request.body, request.headers)
    listing = hooked.client.get(
        hooked.url(f"/context/vision/segment/{delivery.job_id}/webhook-deliveries"),
        headers=hooked.headers,
    ).json
    assert [a["attempt"] for a in listing["items"][0]["attempts"]] == [2]


def test_a_celery_worker_delivers_from_the_webhook_queue(
    hooked: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    receiver: Receiver,
    celery_app: Celery,
) -> None:
    """The real wiring: the API and worker record events, the dispatcher
    publishes them to their own queue, a Celery worker serving that queue
    delivers them."""
    import segq.worker.tasks  # noqa: F401  (registers the shared tasks on celery_app)

    attach_runtime(
        celery_app,
        WorkerRuntime(
            segment=SegmentRuntime(
                sessions, storage, GrabCutEngine(), lease_seconds=60, limits=TEST_LIMITS
            ),
            delivery=DeliveryRuntime(sessions, rules()),
        ),
    )
    dispatcher = PeriodicPass(
        "test-dispatcher",
        lambda: dispatch_due(
            sessions,
            lambda ids: enqueue_deliveries(celery_app, ids),
            republish_after_seconds=300,
        ),
        interval=0.2,
    )
    dispatcher.start()
    try:
        with start_worker(
            celery_app,
            pool="solo",
            perform_ping_check=False,
            shutdown_timeout=10,
            queues=["segq.segment", WEBHOOK_QUEUE],
        ):
            job_id = submit(hooked, {"url": receiver.url, "events": ["job.started", "completed"]})
            receiver.wait_for(2)
    finally:
        dispatcher.stop()
        attach_runtime(celery_app, None)
    verifier = Webhook(secret_of(hooked))
    payloads = [verifier.verify(r.body, r.headers) for r in receiver.received]
    assert sorted(p["type"] for p in payloads) == ["job.completed", "job.started"]
    assert all(p["data"]["jobId"] == job_id for p in payloads)


def test_webhook_settings_are_read_and_checked() -> None:
    settings = Settings.from_env(
        {"SEGQ_WEBHOOK_RETRY_DELAYS": "1, 2,3", "SEGQ_WEBHOOK_TIMEOUT_SECONDS": "4"}
    )
    assert settings.webhook_retry_delays == (1, 2, 3)
    assert settings.webhook_policy().timeout_seconds == 4
    assert settings.webhook_policy().max_redirects == 0
    assert sum(Settings.from_env({}).webhook_retry_delays) >= 24 * 3600  # at least a day
    for bad in ("1,,2", "1,-2", "x"):
        with pytest.raises(SettingsError):
            Settings.from_env({"SEGQ_WEBHOOK_RETRY_DELAYS": bad})
    with pytest.raises(SettingsError):
        Settings.from_env({"SEGQ_WEBHOOK_POLL_SECONDS": "nan"})


def test_worker_queues_are_checked() -> None:
    result = CliRunner().invoke(main, ["worker", "--queues", "segment,bogus"])
    assert result.exit_code == 2
    assert "choose from segment, webhooks" in result.output


def test_a_body_too_large_is_sent_without_items(
    hooked: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(webhook_events, "MAX_BODY_BYTES", 600)
    job_id = submit(hooked, {"url": receiver.url}, items=2)
    run_items(sessions, storage)
    drain(sessions, rules(), all_settled(sessions))
    (payload,) = [Webhook(secret_of(hooked)).verify(r.body, r.headers) for r in receiver.received]
    assert payload["data"]["itemsOmitted"] is True
    assert "items" not in payload["data"]
    assert payload["data"]["jobId"] == job_id
    assert payload["data"]["progress"] == {"total": 2, "completed": 2, "failed": 0}


def test_a_receiver_that_refuses_connections_is_retried(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    """Nothing listens at the URL (connection refused), then the receiver is
    back: the job is untouched, the attempt recorded, the retry delivers."""
    with TcpProxy("127.0.0.1", int(receiver.url.rsplit(":", 1)[1])) as link:
        link.refuse()
        job_id = submit(hooked, {"url": f"http://127.0.0.1:{link.port}/hook"})
        run_items(sessions, storage)
        first = drain(
            sessions, rules(retry_delays=(1,)), lambda: bool(deliveries(sessions)[0].failures)
        )
        assert first == [DeliveryOutcome.RETRYING]
        assert receiver.received == []
        link.heal()
        assert drain(sessions, rules(retry_delays=(1,)), all_settled(sessions)) == [
            DeliveryOutcome.DELIVERED
        ]
    (request,) = receiver.received
    Webhook(secret_of(hooked)).verify(request.body, request.headers)
    listing = hooked.client.get(
        hooked.url(f"/context/vision/segment/{job_id}/webhook-deliveries"), headers=hooked.headers
    ).json
    attempts = listing["items"][0]["attempts"]
    assert [a["statusCode"] for a in attempts] == [None, 200]
    assert "refused" in attempts[0]["error"], attempts[0]


def test_a_webhook_worker_process_killed_mid_attempt(
    hooked: Tenant,
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """A real `segq worker --queues webhooks` SIGKILLed while its POST waits
    for the receiver's answer: nothing is recorded for that attempt, its
    claim runs out (three timeouts), and another attempt delivers the same
    event under the same webhook-id."""
    receiver.answers = [(200, 60.0)]  # holds the first POST past the kill
    job_id = submit(hooked, {"url": receiver.url})
    run_items(sessions, storage)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SEGQ_DATA_DIR": str(tmp_path / "worker-data"),
        "SEGQ_DATABASE_URL": settings.database_url,
        "SEGQ_BROKER_URL": settings.broker_url,
        "SEGQ_WEBHOOK_ALLOWED_NETWORKS": LOOPBACK,
        "SEGQ_WEBHOOK_TIMEOUT_SECONDS": "1",
        "SEGQ_WEBHOOK_POLL_SECONDS": "0.2",
    }
    deliverer = Worker(env, 1, tmp_path / "deliverer.log", queues="webhooks")
    try:
        receiver.wait_for(1, timeout=60)
        deliverer.kill()
        killed = time.monotonic()
    finally:
        deliverer.stop()
    assert deliverer.process.returncode == -signal.SIGKILL
    # The same rules as the killed worker's: its claim lasts 3 x 1 s (+ margin).
    assert drain(sessions, rules(timeout=1), all_settled(sessions), timeout=30) == [
        DeliveryOutcome.DELIVERED
    ]
    assert time.monotonic() - killed >= 2.5
    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    listing = hooked.client.get(
        hooked.url(f"/context/vision/segment/{job_id}/webhook-deliveries"), headers=hooked.headers
    ).json
    assert [a["attempt"] for a in listing["items"][0]["attempts"]] == [2]


def test_items_named_by_instance_id_carry_it_in_webhook_bodies(
    hooked: Tenant, sessions: sessionmaker[Session], storage: S3Storage, receiver: Receiver
) -> None:
    instance = {"space": "plant", "externalId": "camera-1"}
    created = hooked.client.post(
        hooked.url("/files"), json={"name": "c.png", "instanceId": instance}, headers=hooked.headers
    ).json
    assert hooked.client.put(created["uploadUrl"], data=png_bytes()).status_code == 200
    body = {
        **scene_prompt_body(created["id"]),
        "items": [{"fileInstanceId": instance}],
        "webhook": {"url": receiver.url, "events": ["item.completed", "job.completed"]},
    }
    job_id = hooked.post_job(body).json["jobId"]
    run_items(sessions, storage)
    drain(sessions, rules(), all_settled(sessions))
    by_type = {b["type"]: b["data"] for b in receiver.bodies()}
    assert set(by_type) == {"item.completed", "job.completed"}
    for data in by_type.values():
        [item] = data["items"]
        assert item["fileInstanceId"] == instance
        assert item["fileId"] == created["id"]
    assert by_type["job.completed"] == without_urls(hooked.get_job(job_id).json)
