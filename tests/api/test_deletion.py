"""DELETE of a job (rows and every stored object; 409 while it may still
write), and deletion of files (their objects go, jobs that used them keep
their results)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from segq.clock import now_ms
from segq.deletion import job_objects_prefix
from segq.models import (
    DeliveryStatus,
    ItemStatus,
    Job,
    JobItem,
    StoredFile,
    WebhookAttempt,
    WebhookDelivery,
)
from segq.settings import Settings
from segq.storage import LocalStorage, ObjectStorage, S3Storage, StorageError
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.pipeline import ItemOutcome, process_item
from segq.worker.webhook_delivery import (
    AttemptResult,
    DeliveryRules,
    claim_delivery,
    record_attempt,
)
from tests.support.harness import TEST_LIMITS, Tenant
from tests.support.images import png_bytes, scene_prompt_body


def finished_job(tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage) -> int:
    """A job of two images, both segmented (masks in storage)."""
    ids = [tenant.upload(png_bytes(seed=s)).json["id"] for s in range(2)]
    body = {**scene_prompt_body(ids[0]), "items": [{"fileId": i} for i in ids]}
    job_id: int = tenant.post_job(body).json["jobId"]
    with sessions() as session:
        item_ids = list(session.scalars(select(JobItem.id).where(JobItem.job_id == job_id)))
    for item_id in item_ids:
        outcome = process_item(
            sessions,
            storage,
            GrabCutEngine(),
            item_id,
            lease_seconds=60,
            max_attempts=3,
            limits=TEST_LIMITS,
        ).outcome
        assert outcome == ItemOutcome.COMPLETED
    return job_id


def job_prefix(sessions: sessionmaker[Session], job_id: int) -> str:
    with sessions() as session:
        project_id = session.scalar(select(Job.project_id).where(Job.id == job_id))
    assert project_id is not None
    return job_objects_prefix(project_id, job_id)


def add_delivery(sessions: sessionmaker[Session], job_id: int) -> None:
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        delivery = WebhookDelivery(
            job_id=job_id,
            project_id=job.project_id,
            event_type="job.completed",
            url="https://receiver.example/hook",
            message_id=f"msg_{job_id}",
            body="{}",
            created_time=now_ms(),
            status=DeliveryStatus.DELIVERED,
        )
        session.add(delivery)
        session.flush()
        session.add(
            WebhookAttempt(
                delivery_id=delivery.id,
                attempt=1,
                attempted_time=now_ms(),
                status_code=200,
                latency_ms=3,
            )
        )


def test_a_delivery_under_way_when_its_job_is_deleted_records_nothing(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, settings: Settings
) -> None:
    job_id = finished_job(tenant, sessions, storage)
    add_delivery(sessions, job_id)
    with sessions.begin() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .values(status=DeliveryStatus.PENDING, next_attempt_time=now_ms())
        )
        delivery_id = session.scalar(
            select(WebhookDelivery.id).where(WebhookDelivery.job_id == job_id)
        )
    assert delivery_id is not None
    rules = DeliveryRules(settings.webhook_policy(), settings.webhook_retry_delays)
    claim = claim_delivery(sessions, delivery_id, rules)
    assert claim is not None
    assert delete_job(tenant, job_id).status_code == 204
    # The receiver answered meanwhile; the attempt lands on nothing.
    answer = AttemptResult(status_code=200, latency_ms=4, error=None)
    assert record_attempt(sessions, claim, answer, rules, now_ms()) is None
    assert count(sessions, WebhookAttempt) == 0


def delete_job(tenant: Tenant, job_id: int) -> Any:
    return tenant.client.delete(
        tenant.url(f"/context/vision/segment/{job_id}"), headers=tenant.headers
    )


def count(sessions: sessionmaker[Session], model: Any, *where: Any) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def keys_under(storage: S3Storage, prefix: str) -> set[str]:
    return {found.key for found in storage.list_objects(prefix)}


def test_a_deleted_job_leaves_no_row_and_no_object(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    job_id = finished_job(tenant, sessions, storage)
    kept_job = finished_job(tenant, sessions, storage)
    add_delivery(sessions, job_id)
    prefix = job_prefix(sessions, job_id)
    # What an attempt that lost its lease left: named by no row, still the job's.
    storage.put(prefix + "items/0/attempt-7/prompt-0/mask-0.png", b"stray", "image/png")
    assert len(keys_under(storage, prefix)) == 3
    kept_keys = keys_under(storage, job_prefix(sessions, kept_job))
    assert kept_keys

    response = delete_job(tenant, job_id)
    assert response.status_code == 204
    assert response.data == b""
    assert keys_under(storage, prefix) == set()
    assert count(sessions, Job, Job.id == job_id) == 0
    assert count(sessions, JobItem, JobItem.job_id == job_id) == 0
    assert count(sessions, WebhookDelivery, WebhookDelivery.job_id == job_id) == 0
    assert count(sessions, WebhookAttempt) == 0
    assert tenant.get_job(job_id).status_code == 404
    # Idempotent: the state after a second DELETE is the same; it answers
    # 404 as any request for the job now does.
    again = delete_job(tenant, job_id)
    assert again.status_code == 404
    assert again.json["error"]["code"] == 404
    # Nothing else was touched: the other job, and the files both used.
    assert keys_under(storage, job_prefix(sessions, kept_job)) == kept_keys
    assert tenant.get_job(kept_job).json["status"] == "Completed"
    assert count(sessions, StoredFile) == 4


def test_a_job_that_may_still_write_is_409_and_kept(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    queued = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    response = delete_job(tenant, queued)
    assert response.status_code == 409
    assert "Queued" in response.json["error"]["message"]
    assert tenant.get_job(queued).status_code == 200

    # Canceled, but one item still running: its worker would store masks
    # after they were deleted.
    canceled = finished_job(tenant, sessions, storage)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == canceled).values(status="Canceled"))
        first = session.scalars(select(JobItem).where(JobItem.job_id == canceled)).first()
        assert first is not None
        first.status = ItemStatus.RUNNING
    response = delete_job(tenant, canceled)
    assert response.status_code == 409
    assert "still running" in response.json["error"]["message"]
    assert keys_under(storage, job_prefix(sessions, canceled))


def test_another_projects_job_is_not_found(
    tenant: Tenant, other_tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    job_id = finished_job(tenant, sessions, storage)
    assert delete_job(other_tenant, job_id).status_code == 404
    assert delete_job(tenant, 10**12).status_code == 404
    assert tenant.get_job(job_id).json["status"] == "Completed"


def test_storage_that_fails_leaves_every_row_for_the_retry(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = finished_job(tenant, sessions, storage)
    prefix = job_prefix(sessions, job_id)

    def failing(keys: Any) -> None:
        raise StorageError("storage is down")

    monkeypatch.setattr(storage, "delete_many", failing)
    response = delete_job(tenant, job_id)
    assert response.status_code == 503
    assert tenant.get_job(job_id).json["status"] == "Completed"
    assert count(sessions, JobItem, JobItem.job_id == job_id) == 2
    monkeypatch.undo()
    assert delete_job(tenant, job_id).status_code == 204
    assert keys_under(storage, prefix) == set()


def test_deleting_files_deletes_their_objects_and_jobs_keep_results(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    job_id = finished_job(tenant, sessions, storage)
    with sessions() as session:
        files = list(session.execute(select(StoredFile.id, StoredFile.storage_key)))
    (first_id, first_key), (second_id, second_key) = sorted(files)
    assert keys_under(storage, first_key) == {first_key}

    response = tenant.client.delete(tenant.url(f"/files/{first_id}"), headers=tenant.headers)
    assert response.status_code == 204
    assert keys_under(storage, first_key) == set()
    # Cognite's route: the same deletion.
    response = tenant.client.post(
        tenant.url("/files/delete"), json={"items": [{"id": second_id}]}, headers=tenant.headers
    )
    assert response.status_code == 200
    assert keys_under(storage, second_key) == set()
    assert count(sessions, StoredFile) == 0

    job = tenant.get_job(job_id).json
    assert job["status"] == "Completed"
    assert all(item["segments"] for item in job["items"])
    assert keys_under(storage, job_prefix(sessions, job_id))


def test_a_file_whose_bytes_never_arrived_loses_its_parts_too(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    response = tenant.client.post(
        tenant.url("/files/initmultipartupload?parts=2"),
        json={"name": "big.png", "externalId": "big"},
        headers=tenant.headers,
    )
    assert response.status_code == 201
    file_id = response.json["id"]
    with sessions() as session:
        key = session.scalar(select(StoredFile.storage_key).where(StoredFile.id == file_id))
    assert key is not None
    # One part arrived; the upload was never completed.
    storage.put(f"{key}.part0", b"half an image", "application/octet-stream")
    response = tenant.client.delete(tenant.url(f"/files/{file_id}"), headers=tenant.headers)
    assert response.status_code == 204
    assert keys_under(storage, key) == set()


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_a_jobs_prefix_holds_only_that_jobs_objects_and_batches_delete(
    kind: str, storage: S3Storage, tmp_path: Any
) -> None:
    chosen: ObjectStorage = (
        storage if kind == "s3" else LocalStorage(tmp_path / "objects", secret_key="k")
    )
    keys = [
        f"{job_objects_prefix(3, job)}items/{item}/attempt-1/prompt-0/mask-0.png"
        for job in (1, 12)
        for item in range(3)
    ]
    for key in keys:
        chosen.put(key, b"png", "image/png")
    first_job = {found.key for found in chosen.list_objects(job_objects_prefix(3, 1))}
    assert first_job == set(keys[:3])
    chosen.delete_many([*sorted(first_job), "projects/3/jobs/1/never-written.png"])
    left = {found.key for found in chosen.list_objects("projects/3/")}
    assert left == set(keys[3:])


def test_s3_deletes_in_batches_of_the_most_a_request_takes(
    storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segq.storage

    keys = [f"projects/4/jobs/{job}/items/1/attempt-1/prompt-0/mask-0.png" for job in range(5)]
    for key in keys:
        storage.put(key, b"png", "image/png")
    requests: list[int] = []
    delete_objects = storage._client.delete_objects

    def counted(**kwargs: Any) -> Any:
        requests.append(len(kwargs["Delete"]["Objects"]))
        return delete_objects(**kwargs)

    monkeypatch.setattr(segq.storage, "S3_DELETE_BATCH", 2)
    monkeypatch.setattr(storage._client, "delete_objects", counted)
    storage.delete_many(keys)
    assert requests == [2, 2, 1]
    assert list(storage.list_objects("projects/4/")) == []
