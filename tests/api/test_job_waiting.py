"""Waiting without polling on the embedded app, through Flask's test client,
where a request cannot be parked (tests/system/test_job_waiting_live.py has `segq
serve`, where it is): ``Prefer: wait=N`` waits in the request's thread, an
event stream sends what there is and ends; the blocking
``wait_until_finished``; how ``Prefer`` is read; and, with the app behind
segq's waitress server in this process, that a parked waiter whose client
leaves is dropped.

The in-process worker sends no announcements, so waiters here are woken by
the feed's re-check alone: the fallback for lost announcements."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from celery import Celery
from flask import Flask
from sqlalchemy.orm import Session, sessionmaker
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.task import ThreadedTaskDispatcher

from segq.api.app import create_app
from segq.api.http_server import DeadlineServer
from segq.api.job_waiting import MAX_WAIT_SECONDS, requested_wait_seconds, wait_until_finished
from segq.settings import Settings
from segq.storage import S3Storage
from tests.support.harness import Tenant, grabcut_worker, make_tenant
from tests.support.images import png_bytes, scene_prompt_body


@pytest.fixture
def embedded(settings: Settings, storage: S3Storage, celery_app: Celery) -> Flask:
    return create_app(
        replace(settings, wait_recheck_seconds=0.2), storage=storage, celery=celery_app
    )


@pytest.fixture
def embedded_tenant(embedded: Flask, sessions: sessionmaker[Session]) -> Tenant:
    return make_tenant(embedded.test_client(), sessions, "acme")


def _embedded_job(tenant: Tenant, images: int = 1, **headers: str) -> Any:
    ids = [tenant.upload(png_bytes(seed=seed)).json["id"] for seed in range(images)]
    body = {**scene_prompt_body(ids[0]), "items": [{"fileId": i} for i in ids]}
    return tenant.post_job(body, headers=headers)


def test_embedded_prefer_wait_blocks_until_finished(
    embedded_tenant: Tenant,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    with grabcut_worker(celery_app, sessions, storage):
        started = time.monotonic()
        answer = _embedded_job(embedded_tenant, Prefer="wait=100")
        # Woken by the 0.2 s re-check, long before the wait runs out.
        assert time.monotonic() - started < 15
    assert answer.status_code == 200, answer.json
    assert answer.json["status"] == "Completed"
    assert answer.headers["Preference-Applied"] == f"wait={MAX_WAIT_SECONDS}"
    assert answer.headers["Location"].endswith(f"/{answer.json['jobId']}")


def test_embedded_prefer_wait_timeout_and_malformed(embedded_tenant: Tenant) -> None:
    started = time.monotonic()
    timed_out = _embedded_job(embedded_tenant, Prefer="wait=1")
    assert 1 <= time.monotonic() - started < 3
    assert timed_out.json["status"] == "Queued"
    assert timed_out.headers["Preference-Applied"] == "wait=1"
    # Not a wait RFC 7240 defines: ignored, the usual answer at once.
    for prefer in ("wait=soon", "wait=-1", "wait=1.5", "return=minimal"):
        started = time.monotonic()
        plain = _embedded_job(embedded_tenant, Prefer=prefer)
        assert time.monotonic() - started < 1
        assert plain.status_code == 200
        assert "Preference-Applied" not in plain.headers
        assert "points" in plain.json  # POST's own shape, not GET's


def test_prefer_wait_with_no_waiting_place_is_the_usual_answer_at_once(
    embedded: Flask, embedded_tenant: Tenant
) -> None:
    """Every place of the process's waiting requests taken (here, where
    nothing can be parked, those that may hold a thread): a Prefer: wait is
    not honoured, and the answer is the usual one, at once."""
    waiting = embedded.extensions["segq"].waiting_requests
    held = [waiting.reserve(parkable=False) for _ in range(waiting.blocking_limit)]
    try:
        started = time.monotonic()
        created = _embedded_job(embedded_tenant, Prefer="wait=5")
        read = embedded_tenant.client.get(
            embedded_tenant.url(f"/context/vision/segment/{created.json['jobId']}"),
            headers={**embedded_tenant.headers, "Prefer": "wait=5"},
        )
        assert time.monotonic() - started < 2
    finally:
        for place in held:
            assert place is not None
            place.release()
    assert created.status_code == 200
    assert "points" in created.json  # POST's own shape, not GET's
    assert read.json["status"] == "Queued"
    for answer in (created, read):
        assert "Preference-Applied" not in answer.headers
    assert waiting.waiting == 0
    waited = embedded_tenant.client.get(
        embedded_tenant.url(f"/context/vision/segment/{created.json['jobId']}"),
        headers={**embedded_tenant.headers, "Prefer": "wait=1"},
    )
    assert waited.headers["Preference-Applied"] == "wait=1"
    assert waiting.waiting == 0


def test_embedded_event_stream_ends_at_once_and_resumes(
    embedded_tenant: Tenant,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    """Where the server cannot park it, a stream sends what there is and
    ends; the client reconnects with Last-Event-ID, as EventSource does."""
    job_id = _embedded_job(embedded_tenant, images=2).json["jobId"]
    url = embedded_tenant.url(f"/context/vision/segment/{job_id}/events")
    started = time.monotonic()
    queued = embedded_tenant.client.get(url, headers=embedded_tenant.headers)
    assert time.monotonic() - started < 2
    assert queued.mimetype == "text/event-stream"
    assert queued.get_data(as_text=True) == "retry: 2000\n\n"
    events: list[str] = []
    last_id = "0"
    with grabcut_worker(celery_app, sessions, storage):
        give_up = time.monotonic() + 30
        while "event: job.completed" not in events:
            assert time.monotonic() < give_up, events
            text_body = embedded_tenant.client.get(
                url, headers={**embedded_tenant.headers, "Last-Event-ID": last_id}
            ).get_data(as_text=True)
            lines = text_body.splitlines()
            events += [line for line in lines if line.startswith("event: ")]
            last_id = next(
                (line[4:] for line in reversed(lines) if line.startswith("id: ")), last_id
            )
            time.sleep(0.2)
    assert events == [
        "event: job.started",
        "event: item.completed",
        "event: item.completed",
        "event: job.completed",
    ]
    assert last_id == "4"


def test_wait_until_finished(
    embedded: Flask,
    embedded_tenant: Tenant,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    job_id = _embedded_job(embedded_tenant).json["jobId"]
    with embedded.test_request_context():
        started = time.monotonic()
        assert wait_until_finished(job_id, 0.5) is False
        assert 0.5 <= time.monotonic() - started < 2
        assert wait_until_finished(job_id + 1000, 5) is False
        with grabcut_worker(celery_app, sessions, storage):
            started = time.monotonic()
            assert wait_until_finished(job_id, 30) is True
            assert time.monotonic() - started < 15


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        (["wait=10"], 10),
        (["WAIT = 7"], 7),
        (['wait="3"'], 3),
        (["respond-async, wait=5"], 5),
        (["respond-async", "wait=5; foo=bar"], 5),
        (["wait"], MAX_WAIT_SECONDS),
        (["wait=0"], 0),
        (["wait=600"], MAX_WAIT_SECONDS),
        (["wait=99999999999999999999"], MAX_WAIT_SECONDS),
        (["wait=abc"], None),
        (["wait=-5"], None),
        (["wait=٣"], None),
        (["return=minimal"], None),
        ([], None),
    ],
)
def test_requested_wait_seconds(headers: list[str], seconds: int | None) -> None:
    assert requested_wait_seconds(headers) == seconds


@pytest.fixture
def served_in_process(embedded: Flask) -> Iterator[tuple[str, Any]]:
    """The embedded app behind segq's waitress server (api/http_server.py's
    classes) in a thread of this process, so a test can look inside it."""
    socket_map: dict[int, Any] = {}
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(2)
    server = DeadlineServer(
        embedded,
        socket_map,
        host="127.0.0.1",
        port=0,
        dispatcher=dispatcher,
        adj=Adjustments(cleanup_interval=1, asyncore_use_poll=True),
    )
    running = threading.Event()
    running.set()

    def loop() -> None:
        while running.is_set():
            wasyncore.loop(timeout=0.2, use_poll=True, map=socket_map, count=1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}", server
    finally:
        running.clear()
        thread.join(timeout=5)
        server.close()
        dispatcher.shutdown()


def test_a_waiter_whose_client_leaves_is_dropped(
    embedded: Flask, embedded_tenant: Tenant, served_in_process: tuple[str, Any]
) -> None:
    url, server = served_in_process
    job_id = _embedded_job(embedded_tenant).json["jobId"]
    feed = embedded.extensions["segq"].job_changes
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"GET /api/v1/projects/acme/context/vision/segment/{job_id} HTTP/1.1\r\n"
        f"Host: x\r\nAuthorization: Bearer {embedded_tenant.key}\r\nPrefer: wait=60\r\n\r\n"
    ).encode()
    clients = [socket.create_connection((host, int(port)), timeout=10) for _ in range(5)]
    for client in clients:
        client.sendall(request)
    give_up = time.monotonic() + 10
    while feed.watching < 5:
        assert time.monotonic() < give_up, feed.watching
        time.sleep(0.05)
    assert len(server.active_channels) == 5
    for client in clients:
        client.close()
    give_up = time.monotonic() + 10
    while feed.watching or server.active_channels:
        assert time.monotonic() < give_up, (feed.watching, len(server.active_channels))
        time.sleep(0.05)


def test_a_cancel_wakes_its_waiters_at_once(
    settings: Settings, storage: S3Storage, celery_app: Celery, sessions: sessionmaker[Session]
) -> None:
    """The API announces a cancel as workers announce their changes: with
    the re-check too slow to matter, a waiter still answers at once."""
    app = create_app(replace(settings, wait_recheck_seconds=60), storage=storage, celery=celery_app)
    tenant = make_tenant(app.test_client(), sessions, "acme")
    job_id = _embedded_job(tenant).json["jobId"]
    answers: list[Any] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            tenant.client.get(
                tenant.url(f"/context/vision/segment/{job_id}"),
                headers={**tenant.headers, "Prefer": "wait=30"},
            )
        )
    )
    waiter.start()
    time.sleep(1)  # the waiter is watching
    assert waiter.is_alive()
    started = time.monotonic()
    canceled = tenant.client.post(
        tenant.url(f"/context/vision/segment/{job_id}/cancel"), headers=tenant.headers
    )
    assert canceled.status_code == 200
    waiter.join(timeout=20)
    assert time.monotonic() - started < 5
    assert [answer.json["status"] for answer in answers] == ["Canceled"]


def test_event_ids_stay_put_when_an_item_finishes_after_a_cancel(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    """A job canceled while an item runs: the stream has ended with
    job.canceled, and the item that finishes later comes after it, so a
    client resuming from the cancel's id gets that item, and no event twice."""
    from sqlalchemy import select

    from segq.api.job_event_stream import job_events
    from segq.models import Job, JobItem
    from segq.worker.claims import claim_item, finish_item

    job_id = _embedded_job(tenant, images=2).json["jobId"]
    with sessions() as session:
        first = session.scalars(
            select(JobItem.id).where(JobItem.job_id == job_id).order_by(JobItem.position)
        ).first()
    assert first is not None
    claim = claim_item(sessions, first, lease_seconds=60, engine_name="grabcut", max_attempts=3)
    assert claim is not None
    canceled = tenant.client.post(
        tenant.url(f"/context/vision/segment/{job_id}/cancel"), headers=tenant.headers
    )
    assert canceled.status_code == 200

    def events() -> list[tuple[int, str]]:
        with sessions() as session:
            job = session.get_one(Job, job_id)
            return [(event.number, event.type) for event in job_events(session, job)]

    sent = events()
    assert sent == [(1, "job.started"), (2, "job.canceled")]
    time.sleep(0.01)
    assert finish_item(sessions, claim, result=None, error_message="late")
    assert events() == [*sent, (3, "item.failed")]


def test_a_last_event_id_past_the_last_event_is_refused_and_a_resume_goes_on(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    """Every id a stream sends was read from the database first, so an id
    past the job's last event is not one of its ids: 400, not a silent
    stream that would skip the events still to come."""
    from sqlalchemy import select

    from segq.models import JobItem
    from segq.worker.claims import claim_item, finish_item

    job_id = _embedded_job(tenant, images=2).json["jobId"]
    url = tenant.url(f"/context/vision/segment/{job_id}/events")

    def stream(last_event_id: str) -> Any:
        return tenant.client.get(url, headers={**tenant.headers, "Last-Event-ID": last_event_id})

    queued = stream("1")
    assert queued.status_code == 400, queued.get_data(as_text=True)
    assert queued.json["error"]["message"] == (
        f"Last-Event-ID 1 is not an event of this stream: job {job_id} has had 0 events"
    )
    with sessions() as session:
        first = session.scalars(
            select(JobItem.id).where(JobItem.job_id == job_id).order_by(JobItem.position)
        ).first()
    assert first is not None
    claim = claim_item(sessions, first, lease_seconds=60, engine_name="grabcut", max_attempts=3)
    assert claim is not None
    assert finish_item(sessions, claim, result=None, error_message="done")
    # Two events now: job.started, item.failed.
    assert stream("3").status_code == 400
    resumed = stream("1").get_data(as_text=True)
    assert [line for line in resumed.splitlines() if line.startswith(("id:", "event:"))] == [
        "id: 2",
        "event: item.failed",
    ]
    caught_up = stream("2")
    assert caught_up.status_code == 200
    assert caught_up.get_data(as_text=True) == "retry: 2000\n\n"
