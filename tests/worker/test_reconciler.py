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
from sqlalchemy import insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.clock import now_ms
from segq.models import ItemStatus, Job, JobItem, JobStatus
from segq.queue import enqueue_items, make_celery, messages_waiting
from segq.settings import Settings
from segq.storage import S3Storage
from segq.worker.claims import abandoned_message, claim_item, release_item
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.pipeline import ItemOutcome, process_item
from segq.worker.reconciler import ADVISORY_LOCK_KEY, reconcile
from tests.support.harness import REDIS_URL, TEST_LIMITS, Tenant, grabcut_worker, make_tenant
from tests.support.images import png_bytes, scene_prompt_body


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
        max_attempts=kwargs.get("max_attempts", 3),
        # Items just created count against the queue at once.
        grace_seconds=kwargs.get("grace", 0),
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
    # once rather than after the grace.
    [item] = items_of(sessions, response.json["jobId"])
    assert item.published_time is None
    assert run_pass(sessions, celery_app, grace=300).republished == 1
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
        ).outcome
        == ItemOutcome.COMPLETED
    )


def test_items_whose_api_died_before_publishing_are_sent_once_the_queue_is_empty(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    celery_app: Celery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An API that dies between commit and publish leaves its items looking
    published. The first pass that finds the queue short of a message for
    them sends them."""
    published = tenant.upload(png_bytes(seed=1)).json["id"]
    retried_job = tenant.post_job(scene_prompt_body(published)).json["jobId"]
    # The job service publishes (api/job_service.py).
    monkeypatch.setattr(
        sys.modules["segq.api.job_service"], "enqueue_items", lambda _app, _ids: None
    )
    file_id = tenant.upload(png_bytes()).json["id"]
    [lost] = items_of(sessions, tenant.post_job(scene_prompt_body(file_id)).json["jobId"])
    assert lost.published_time is not None
    # An item whose storage failed is queued again, with its retry message
    # held back by its worker until due: not lost, whatever the queue says.
    [retried] = items_of(sessions, retried_job)
    claim = claim_item(sessions, retried.id, lease_seconds=60, engine_name="x", max_attempts=3)
    assert claim is not None and release_item(sessions, claim, retry_in_seconds=60)
    redis.Redis.from_url(REDIS_URL).flushdb()
    time.sleep(0.01)

    # Just sent, it may be in a worker's hands this very moment.
    assert run_pass(sessions, celery_app, grace=60).republished == 0
    # A message in the queue wakes a worker for it as well as any other.
    enqueue_items(celery_app, [10**9])
    assert run_pass(sessions, celery_app).republished == 0
    # The queue is a message short: sent now.
    redis.Redis.from_url(REDIS_URL).flushdb()
    assert run_pass(sessions, celery_app).republished == 1
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
    # The queue holds a message for each: nothing more, however long they wait.
    assert run_pass(sessions, celery_app).republished == 0


def test_an_item_whose_worker_died_is_queued_again_then_fails_when_it_keeps_dying(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    job_id = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    [item] = items_of(sessions, job_id)

    def die_holding_it() -> None:
        redis.Redis.from_url(REDIS_URL).flushdb()  # the worker took its message
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
            passes.append(run_pass(sessions, celery_app))
            return super().segment(*args, **kwargs)

    outcome = process_item(
        sessions,
        storage,
        SlowEngine(),
        item.id,
        lease_seconds=lease,
        max_attempts=3,
        limits=TEST_LIMITS,
    ).outcome
    assert outcome == ItemOutcome.COMPLETED
    assert passes[0].requeued == 0
    [done] = items_of(sessions, job_id)
    assert done.attempt == 1


def remove_message_of(item_id: int) -> None:
    """Take ``item_id``'s message out of the queue, as a worker does."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        for raw in client.lrange("segq.segment", 0, -1):
            if json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] == item_id:
                assert client.lrem("segq.segment", 1, str(raw)) == 1
                return
    finally:
        client.close()
    raise AssertionError(f"no message for item {item_id}")


def test_an_item_queued_again_runs_before_the_backlog_queued_after_it(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> None:
    """An item whose worker died goes back to the queue with a new message
    behind the backlog's; it still runs before the items queued after it."""
    first = tenant.upload(png_bytes(seed=0)).json["id"]
    [requeued] = items_of(sessions, tenant.post_job(scene_prompt_body(first)).json["jobId"])
    files = [tenant.upload(png_bytes(seed=seed)).json["id"] for seed in range(1, 9)]
    backlog_job = tenant.post_job(
        {**scene_prompt_body(files[0]), "items": [{"fileId": f} for f in files]}
    ).json["jobId"]
    # A worker took the first item's message, claimed it and died.
    remove_message_of(requeued.id)
    claim = claim_item(
        sessions, requeued.id, lease_seconds=60, engine_name="grabcut", max_attempts=3
    )
    assert claim is not None
    with sessions.begin() as session:  # its lease ran out
        session.execute(
            update(JobItem).where(JobItem.id == requeued.id).values(lease_expires_time=1)
        )
    done = run_pass(sessions, celery_app)
    assert (done.requeued, done.republished) == (1, 1)
    # Its new message is the queue's last.
    assert messages() == sorted([requeued.id, *item_ids_of(sessions, backlog_job)])

    with grabcut_worker(celery_app, sessions, storage):
        give_up = time.monotonic() + 120
        while any(not ItemStatus(item.status).finished for item in all_items(sessions)):
            assert time.monotonic() < give_up, "the backlog did not drain"
            time.sleep(0.1)
    [again] = items_of(sessions, requeued.job_id)
    backlog = items_of(sessions, backlog_job)
    assert again.status == ItemStatus.COMPLETED and again.attempt == 2
    assert all(item.status == ItemStatus.COMPLETED for item in backlog)
    # The times the worker recorded: one item at a time, in queue order.
    assert again.finished_time is not None
    assert again.finished_time < min(item.finished_time or 0 for item in backlog)


def test_a_long_backlog_keeps_one_message_per_item_and_a_lost_one_is_sent_again(
    tenant: Tenant, sessions: sessionmaker[Session], celery_app: Celery
) -> None:
    """2,000 items waiting far longer than the grace, no worker: passes add
    no message while the queue holds one per item, and replace one lost."""
    file_id = tenant.upload(png_bytes()).json["id"]
    job_id = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    [first] = items_of(sessions, job_id)
    with sessions.begin() as session:
        session.execute(
            insert(JobItem),
            [
                {
                    "job_id": job_id,
                    "position": position,
                    "file_id": first.file_id,
                    "file_ref": first.file_ref,
                    "file_storage_key": first.file_storage_key,
                    "status": ItemStatus.QUEUED,
                    "attempt": 0,
                }
                for position in range(1, 2000)
            ],
        )
    ids = item_ids_of(sessions, job_id)
    enqueue_items(celery_app, ids[1:])
    with sessions.begin() as session:  # every item has waited ten minutes
        session.execute(update(JobItem).values(published_time=now_ms() - 600_000))
    assert messages_waiting(celery_app) == 2000

    for _ in range(3):
        assert run_pass(sessions, celery_app, grace=5).republished == 0
        assert messages_waiting(celery_app) == 2000
    # One message truly lost: exactly one is sent.
    redis.Redis.from_url(REDIS_URL).lpop("segq.segment")
    assert messages_waiting(celery_app) == 1999
    assert run_pass(sessions, celery_app, grace=5).republished == 1
    assert messages_waiting(celery_app) == 2000
    assert run_pass(sessions, celery_app, grace=5).republished == 0


def item_ids_of(sessions: sessionmaker[Session], job_id: int) -> list[int]:
    return [item.id for item in items_of(sessions, job_id)]


def all_items(sessions: sessionmaker[Session]) -> list[JobItem]:
    with sessions() as session:
        return list(session.scalars(select(JobItem)))
