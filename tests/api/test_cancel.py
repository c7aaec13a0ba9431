"""POST …/{jobId}/cancel: queued work never runs, running jobs stop before their next item."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.models import ItemStatus, JobItem
from segq.storage import S3Storage
from segq.worker.claims import Claim, claim_item
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.pipeline import ItemOutcome, process_item
from tests.support.harness import TEST_LIMITS, Tenant
from tests.support.images import png_bytes, scene_prompt_body


def job_with_items(tenant: Tenant, count: int) -> tuple[int, list[int]]:
    ids = [tenant.upload(png_bytes(seed=s)).json["id"] for s in range(count)]
    body = {**scene_prompt_body(ids[0]), "items": [{"fileId": i} for i in ids]}
    job_id = tenant.post_job(body).json["jobId"]
    sessions = tenant.client.application.extensions["segq"].sessions
    with sessions() as session:
        items = session.scalars(
            select(JobItem.id).where(JobItem.job_id == job_id).order_by(JobItem.position)
        )
        return job_id, list(items)


def cancel(tenant: Tenant, job_id: int) -> Any:
    return tenant.client.post(
        tenant.url(f"/context/vision/segment/{job_id}/cancel"), headers=tenant.headers
    )


def run(sessions: sessionmaker[Session], storage: S3Storage, item_id: int) -> ItemOutcome:
    return process_item(
        sessions,
        storage,
        GrabCutEngine(),
        item_id,
        lease_seconds=60,
        max_attempts=3,
        limits=TEST_LIMITS,
    ).outcome


def test_a_queued_job_never_runs(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    job_id, item_ids = job_with_items(tenant, 2)
    response = cancel(tenant, job_id)
    assert response.status_code == 200
    assert response.json["status"] == "Canceled"
    assert "Retry-After" not in response.headers
    assert [run(sessions, storage, i) for i in item_ids] == [
        ItemOutcome.SKIPPED,
        ItemOutcome.SKIPPED,
    ]
    job = tenant.get_job(job_id).json
    assert job["status"] == "Canceled"
    assert all("segments" not in item for item in job["items"])
    assert job["progress"] == {"total": 2, "completed": 0, "failed": 0}


def test_a_running_job_stops_before_its_next_item(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    job_id, (first, second, third) = job_with_items(tenant, 3)
    assert run(sessions, storage, first) == ItemOutcome.COMPLETED
    assert tenant.get_job(job_id).json["status"] == "Running"
    assert cancel(tenant, job_id).json["status"] == "Canceled"
    assert run(sessions, storage, second) == ItemOutcome.SKIPPED
    assert run(sessions, storage, third) == ItemOutcome.SKIPPED
    job = tenant.get_job(job_id).json
    assert job["status"] == "Canceled"
    # What finished before the cancel is kept.
    assert len(job["items"][0]["segments"]) == 1
    assert job["progress"]["completed"] == 1


def test_cancel_is_idempotent_and_refused_once_finished(
    tenant: Tenant, other_tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    job_id, _ = job_with_items(tenant, 1)
    assert cancel(tenant, job_id).status_code == 200
    again = cancel(tenant, job_id)
    assert again.status_code == 200 and again.json["status"] == "Canceled"
    assert cancel(other_tenant, job_id).status_code == 404
    assert cancel(tenant, 987654).status_code == 404

    done_id, [item] = job_with_items(tenant, 1)
    assert run(sessions, storage, item) == ItemOutcome.COMPLETED
    refused = cancel(tenant, done_id)
    assert refused.status_code == 409 and refused.json["error"]["code"] == 409
    assert tenant.get_job(done_id).json["status"] == "Completed"


def test_no_item_starts_once_a_cancel_has_answered(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    """Claims racing a cancel: each item is either taken before the cancel
    (and runs to its end) or never; none starts after the cancel answered."""
    job_id, items = job_with_items(tenant, 16)
    start = threading.Barrier(len(items) + 1)

    def claim(item_id: int) -> Claim | None:
        start.wait()
        return claim_item(
            sessions, item_id, lease_seconds=60, engine_name="grabcut", max_attempts=3
        )

    def running() -> set[int]:
        with sessions() as session:
            return set(
                session.scalars(
                    select(JobItem.id).where(
                        JobItem.job_id == job_id, JobItem.status == ItemStatus.RUNNING
                    )
                )
            )

    with ThreadPoolExecutor(len(items)) as pool:
        claims = [pool.submit(claim, item_id) for item_id in items]
        start.wait()
        assert cancel(tenant, job_id).json["status"] == "Canceled"
        running_at_cancel = running()
        taken = {c.item_id for future in claims if (c := future.result()) is not None}

    assert running() == running_at_cancel == taken
    with sessions() as session:
        statuses = session.scalars(select(JobItem.status).where(JobItem.job_id == job_id)).all()
    assert statuses.count(ItemStatus.CANCELED) == len(items) - len(taken)
