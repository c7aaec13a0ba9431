"""The reconciler re-publishes what the broker lost, against Postgres and Redis."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from segq.models import ItemStatus, Job, JobItem, JobStatus
from segq.queue import enqueue_items, make_celery, messages_waiting
from segq.settings import Settings
from segq.storage import S3Storage
from tests.harness import REDIS_URL, TEST_LIMITS, Tenant, make_tenant
from tests.images import png_bytes, scene_prompt_body
from worker.claims import abandoned_message, claim_item, release_item
from worker.engines.grabcut import GrabCutEngine
from worker.pipeline import ItemOutcome, process_item
from worker.reconciler import ADVISORY_LOCK_KEY, reconcile


def messages() -> list[int]:
    """Item ids waiting in the broker's queue (Celery's message protocol 2:
    a base64 body holding [args, kwargs, embed])."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        raw = client.lrange("segq.segment", 0, -1)
    finally:
        client.close()
    return sorted(json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw)


def run_pass(sessions: sessionmaker[Session], celery_app: Celery, **kwargs: Any) -> Any:
    def publish(ids: Sequence[int]) -> None:
        enqueue_items(celery_app, ids)

    return reconcile(
        sessions,
        publish,
        lambda: messages_waiting(celery_app),
        republish_after_seconds=kwargs.get("republish_after", 0),
        max_attempts=kwargs.get("max_attempts", 3),
        unclaimed_grace_seconds=kwargs.get("unclaimed_grace", 5),
    )


def items_of(sessions: sessionmaker[Session], job_id: int) -> list[JobItem]:
    with sessions() as session:
        return list(
            session.scalars(
                select(JobItem).where(JobItem.job_id == job_id).order_by(JobItem.position)
            )
        )


def test_a_job_committed_while_the_broker_was_down_is_published_later(
    settings: Settings, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> None:
    # The API's broker does not answer: as if it died between commit and publish.
    dead_broker = make_celery(
        "redis://127.0.0.1:9/0", broker_folder=settings.broker_folder, time_limit_seconds=60
    )
    app = create_app(settings, storage=storage, celery=dead_broker)
    tenant = make_tenant(app.test_client(), sessions, "acme")
    file_id = tenant.upload(png_bytes()).json["id"]
    started = time.monotonic()
    response = tenant.post_job(scene_prompt_body(file_id))
    assert response.status_code == 200  # committed: the job exists and will run
    assert time.monotonic() - started < 10
    assert messages() == []

    # The API marked the items unpublished, so the next pass sends them at
    # once rather than after republish_after.
    [item] = items_of(sessions, response.json["jobId"])
    assert item.published_time is None
    assert run_pass(sessions, celery_app, republish_after=300).republished == 1
    assert messages() == [item.id]
    assert (
        process_item(
            sessions,
            storage,
            GrabCutEngine(),
            item.id,
            lease_seconds=60,
            max_attempts=3,
            limits=TEST_LIMITS,
        )
        == ItemOutcome.COMPLETED
    )


def test_items_whose_api_died_before_publishing_are_sent_once_the_queue_is_empty(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    celery_app: Celery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An API that dies between commit and publish leaves its items looking
    published. The first pass that finds the queue empty sends them: not
    after republish_after (300 s by default)."""
    published = tenant.upload(png_bytes(seed=1)).json["id"]
    retried_job = tenant.post_job(scene_prompt_body(published)).json["jobId"]
    # The job service publishes (api/job_service.py).
    monkeypatch.setattr(sys.modules["api.job_service"], "enqueue_items", lambda _app, _ids: None)
    file_id = tenant.upload(png_bytes()).json["id"]
    [lost] = items_of(sessions, tenant.post_job(scene_prompt_body(file_id)).json["jobId"])
    assert lost.published_time is not None
    # An item whose storage failed is queued again, with its retry message
    # held back by its worker: not lost, whatever the queue says.
    [retried] = items_of(sessions, retried_job)
    claim = claim_item(sessions, retried.id, lease_seconds=60, engine_name="x", max_attempts=3)
    assert claim is not None and release_item(sessions, claim)
    redis.Redis.from_url(REDIS_URL).flushdb()
    time.sleep(0.01)

    # Just sent, it may be in a worker's hands this very moment.
    assert run_pass(sessions, celery_app, republish_after=300, unclaimed_grace=60).republished == 0
    # Behind a backlog it waits, as its message would have.
    enqueue_items(celery_app, [10**9])
    assert run_pass(sessions, celery_app, republish_after=300, unclaimed_grace=0).republished == 0
    # The backlog drained without it: sent now.
    redis.Redis.from_url(REDIS_URL).flushdb()
    assert run_pass(sessions, celery_app, republish_after=300, unclaimed_grace=0).republished == 1
    assert messages() == [lost.id]


def test_messages_lost_by_the_broker_are_sent_again(
    tenant: Tenant, sessions: sessionmaker[Session], celery_app: Celery
) -> None:
    ids = [tenant.upload(png_bytes(seed=s)).json["id"] for s in range(3)]
    job_id = tenant.post_job(
        {**scene_prompt_body(ids[0]), "items": [{"fileId": i} for i in ids]}
    ).json["jobId"]
    item_ids = [item.id for item in items_of(sessions, job_id)]
    assert messages() == item_ids
    redis.Redis.from_url(REDIS_URL).flushdb()
    assert messages() == []
    assert run_pass(sessions, celery_app).republished == 3
    assert messages() == item_ids
    # Republished items are not due again until republish_after has passed.
    assert run_pass(sessions, celery_app, republish_after=300).republished == 0


def test_an_item_whose_worker_died_is_queued_again_then_fails_when_it_keeps_dying(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    job_id = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    [item] = items_of(sessions, job_id)

    def die_holding_it() -> None:
        claim = claim_item(
            sessions, item.id, lease_seconds=60, engine_name="grabcut", max_attempts=2
        )
        assert claim is not None
        with sessions.begin() as session:  # the lease runs out: nobody renews it
            session.execute(
                update(JobItem).where(JobItem.id == item.id).values(lease_expires_time=1)
            )

    die_holding_it()
    result = run_pass(sessions, celery_app, max_attempts=2)
    assert (result.requeued, result.republished, result.failed) == (1, 1, 0)
    [again] = items_of(sessions, job_id)
    assert (again.status, again.attempt) == (ItemStatus.QUEUED, 1)

    die_holding_it()
    assert run_pass(sessions, celery_app, max_attempts=2).failed == 1
    [dead] = items_of(sessions, job_id)
    assert dead.status == ItemStatus.FAILED and dead.error_message == abandoned_message(2)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.FAILED


def test_one_pass_at_a_time(
    tenant: Tenant, sessions: sessionmaker[Session], celery_app: Celery
) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    tenant.post_job(scene_prompt_body(file_id))
    redis.Redis.from_url(REDIS_URL).flushdb()
    with sessions() as holder:
        holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        assert run_pass(sessions, celery_app).republished == 0
    assert run_pass(sessions, celery_app).republished == 1


def test_a_running_item_keeps_its_lease(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> None:
    """An item that runs for twice its lease is not taken for abandoned: its
    lease is renewed while it runs."""
    lease = 3
    file_id = tenant.upload(png_bytes()).json["id"]
    job_id = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    [item] = items_of(sessions, job_id)
    passes = []

    class SlowEngine(GrabCutEngine):
        def segment(self, *args: Any, **kwargs: Any) -> Any:
            time.sleep(lease * 2)
            passes.append(run_pass(sessions, celery_app, republish_after=300))
            return super().segment(*args, **kwargs)

    outcome = process_item(
        sessions,
        storage,
        SlowEngine(),
        item.id,
        lease_seconds=lease,
        max_attempts=3,
        limits=TEST_LIMITS,
    )
    assert outcome == ItemOutcome.COMPLETED
    assert passes[0].requeued == 0
    [done] = items_of(sessions, job_id)
    assert done.attempt == 1
