"""The worker's pipeline called directly, against Postgres and S3 (moto over HTTP)."""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from celery import Celery
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from segq.models import ItemStatus, Job, JobItem, JobStatus, WebhookDelivery
from segq.storage import S3Storage
from segq.worker.claims import (
    Claim,
    claim_item,
    claim_next_item,
    finish_item,
    release_item,
    renew_lease,
)
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.item_inputs import ImageLimits
from segq.worker.lease_keeper import LeaseKeeper
from segq.worker.masks import Ring, rasterize_rings
from segq.worker.pipeline import ItemOutcome, process_item
from tests.support.harness import TEST_LIMITS, Tenant, grabcut_worker, item_ids
from tests.support.images import png_bytes, scene, scene_prompt_body, with_exif_orientation

LEASE = 60


@pytest.fixture(scope="module")
def engine() -> GrabCutEngine:
    return GrabCutEngine()


def submit(
    tenant: Tenant, body: dict[str, Any] | None = None, **extra: Any
) -> tuple[int, list[int]]:
    """Upload the test scene, create a job on it; (job id, item ids)."""
    if body is None:
        file_id = tenant.upload(png_bytes(160, 120)).json["id"]
        body = {**scene_prompt_body(file_id), **extra}
    response = tenant.post_job(body)
    assert response.status_code == 200, response.json
    job_id = response.json["jobId"]
    return job_id, item_ids(tenant, job_id)


def load(sessions: sessionmaker[Session], model: type[Any], row_id: int) -> Any:
    with sessions() as session:
        return session.get(model, row_id)


def run(
    sessions: sessionmaker[Session],
    storage: Any,
    engine: GrabCutEngine,
    item_id: int,
    max_attempts: int = 3,
) -> ItemOutcome:
    return process_item(
        sessions,
        storage,
        engine,
        item_id,
        lease_seconds=LEASE,
        max_attempts=max_attempts,
        limits=TEST_LIMITS,
    ).outcome


def test_the_run_answers_what_metrics_need_without_the_item_read_again(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, engine: GrabCutEngine
) -> None:
    job_id, [item_id] = submit(tenant)
    ran = process_item(
        sessions, storage, engine, item_id, lease_seconds=LEASE, max_attempts=3, limits=TEST_LIMITS
    )
    item = load(sessions, JobItem, item_id)
    assert (ran.outcome, ran.item_id, ran.engine) == (ItemOutcome.COMPLETED, item_id, "grabcut")
    assert ran.claim is not None
    assert (ran.claim.job_id, ran.claim.attempt) == (job_id, 1)
    assert ran.metrics == item.result["metrics"] and ran.metrics["decodeMs"] > 0
    assert ran.claim.queue_wait_ms == item.started_time - item.published_time
    # A second message for it finds nothing to run and says so.
    again = process_item(
        sessions, storage, engine, item_id, lease_seconds=LEASE, max_attempts=3, limits=TEST_LIMITS
    )
    assert (again.outcome, again.claim, again.metrics) == (ItemOutcome.SKIPPED, None, None)


def test_item_is_segmented_stored_and_rolled_up(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, engine: GrabCutEngine
) -> None:
    job_id, [item_id] = submit(tenant)
    assert run(sessions, storage, engine, item_id) == ItemOutcome.COMPLETED

    item = load(sessions, JobItem, item_id)
    assert item.status == ItemStatus.COMPLETED and item.attempt == 1
    job = load(sessions, Job, job_id)
    assert job.status == JobStatus.COMPLETED and job.engine == "grabcut"
    assert job.start_time is not None and job.status_time >= job.start_time

    [segment] = item.result["segments"]
    mask = np.asarray(Image.open(io.BytesIO(storage.get(segment["maskKey"]))))
    assert mask.shape == (120, 160) and set(np.unique(mask)) <= {0, 255}
    truth = scene(160, 120)[1]
    selected = mask == 255
    iou = (selected & truth).sum() / (selected | truth).sum()
    assert iou > 0.85
    rings = [Ring(tuple(tuple(v) for v in r["vertices"]), r["isHole"]) for r in segment["polygons"]]
    assert np.array_equal(rasterize_rings(rings, 120, 160), selected)
    assert segment["area"] == pytest.approx(selected.mean())
    ys, xs = np.nonzero(selected)
    assert segment["boundingBox"] == pytest.approx(
        {
            "xMin": xs.min() / 160,
            "yMin": ys.min() / 120,
            "xMax": (xs.max() + 1) / 160,
            "yMax": (ys.max() + 1) / 120,
        }
    )


def test_a_repeated_delivery_does_nothing(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, engine: GrabCutEngine
) -> None:
    _, [item_id] = submit(tenant)
    assert run(sessions, storage, engine, item_id) == ItemOutcome.COMPLETED
    first = load(sessions, JobItem, item_id)
    assert run(sessions, storage, engine, item_id) == ItemOutcome.SKIPPED
    again = load(sessions, JobItem, item_id)
    assert (again.attempt, again.finished_time, again.result) == (
        first.attempt,
        first.finished_time,
        first.result,
    )


def test_a_held_lease_keeps_others_out_and_a_lost_one_drops_the_result(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, engine: GrabCutEngine
) -> None:
    _, [item_id] = submit(tenant)
    first = claim_item(
        sessions, item_id, lease_seconds=LEASE, engine_name="grabcut", max_attempts=3
    )
    assert first is not None and first.attempt == 1
    assert (
        claim_item(sessions, item_id, lease_seconds=LEASE, engine_name="grabcut", max_attempts=3)
        is None
    )

    # The first attempt stalls past its lease; another takes the item over.
    with sessions.begin() as session:
        session.execute(update(JobItem).where(JobItem.id == item_id).values(lease_expires_time=0))
    assert run(sessions, storage, engine, item_id) == ItemOutcome.COMPLETED
    winner = load(sessions, JobItem, item_id)
    assert winner.attempt == 2

    # The stalled attempt finishes late: its completion must not land.
    assert finish_item(sessions, first, result={"width": 1, "height": 1, "segments": []}) is False
    assert load(sessions, JobItem, item_id).result == winner.result


def test_a_lost_attempt_is_fenced_while_another_attempt_runs(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    """The attempt, not only the status, guards every write: an attempt that
    lost its lease cannot complete, renew or release the item while the
    next attempt holds it (both see it Running)."""
    _, [item_id] = submit(tenant)
    first = claim_item(
        sessions, item_id, lease_seconds=LEASE, engine_name="grabcut", max_attempts=3
    )
    assert first is not None
    with sessions.begin() as session:
        session.execute(update(JobItem).where(JobItem.id == item_id).values(lease_expires_time=0))
    second = claim_item(
        sessions, item_id, lease_seconds=LEASE, engine_name="grabcut", max_attempts=3
    )
    assert second is not None and second.attempt == 2
    assert not finish_item(sessions, first, result={"width": 1, "height": 1, "segments": []})
    assert not renew_lease(sessions, first, LEASE)
    assert not release_item(sessions, first)
    item = load(sessions, JobItem, item_id)
    assert (item.status, item.attempt, item.result) == (ItemStatus.RUNNING, 2, None)
    assert finish_item(sessions, second, result={"width": 1, "height": 1, "segments": []})


def test_a_deleted_file_fails_its_item_and_the_job_keeps_the_rest(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, engine: GrabCutEngine
) -> None:
    kept = tenant.upload(png_bytes(), externalId="kept").json["id"]
    doomed = tenant.upload(png_bytes(seed=3), externalId="doomed").json["id"]
    job_id, [kept_item, doomed_item] = submit(
        tenant,
        {
            "items": [{"fileId": kept}, {"fileId": doomed}],
            "points": [{"x": 0.5, "y": 0.5, "label": 1}],
        },
    )
    assert (
        tenant.client.delete(tenant.url(f"/files/{doomed}"), headers=tenant.headers).status_code
        == 204
    )

    # Messages claim items in queue order: the kept item first.
    assert run(sessions, storage, engine, kept_item) == ItemOutcome.COMPLETED
    assert load(sessions, Job, job_id).status == JobStatus.RUNNING
    assert run(sessions, storage, engine, doomed_item) == ItemOutcome.FAILED

    job = tenant.get_job(job_id).json
    assert job["status"] == "Completed"
    assert job["progress"] == {"total": 2, "completed": 1, "failed": 1}
    assert [item["fileId"] for item in job["items"]] == [kept]
    assert job["failedItems"] == [
        {
            "errorMessage": "the file was deleted before the item ran",
            "items": [{"fileId": doomed, "fileExternalId": "doomed"}],
        }
    ]


def test_the_worker_applies_its_own_pixel_limit(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, engine: GrabCutEngine
) -> None:
    # Accepted by the API under its limit; this worker allows one pixel fewer.
    job_id, [item_id] = submit(tenant)
    outcome = process_item(
        sessions,
        storage,
        engine,
        item_id,
        lease_seconds=LEASE,
        max_attempts=3,
        limits=ImageLimits(max_pixels=160 * 120 - 1, fetch_policy=None),
    ).outcome
    assert outcome == ItemOutcome.FAILED
    assert tenant.get_job(job_id).json["failedItems"][0]["errorMessage"] == (
        "the image was refused: image has 160x120 pixels, more than the 19199 allowed"
    )


def test_masks_have_the_size_the_file_reports(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, engine: GrabCutEngine
) -> None:
    # Stored 160 wide and 120 tall, shown rotated a quarter turn: the file,
    # the result and the mask all say 120 x 160, and the mask lies on the
    # displayed object (the ellipse stands upright).
    uploaded = tenant.upload(with_exif_orientation(scene(160, 120)[0], 6)).json
    assert (uploaded["width"], uploaded["height"]) == (120, 160)
    _, [item_id] = submit(tenant, scene_prompt_body(uploaded["id"]))
    assert run(sessions, storage, engine, item_id) == ItemOutcome.COMPLETED

    item = load(sessions, JobItem, item_id)
    assert (item.result["width"], item.result["height"]) == (120, 160)
    [segment] = item.result["segments"]
    mask = np.asarray(Image.open(io.BytesIO(storage.get(segment["maskKey"])))) == 255
    assert mask.shape == (160, 120)
    upright = np.rot90(scene(160, 120)[1], k=-1)
    assert (mask & upright).sum() / (mask | upright).sum() > 0.8


def test_a_job_whose_items_all_fail_is_failed(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, engine: GrabCutEngine
) -> None:
    job_id, [item_id] = submit(tenant)
    file_id = tenant.get_job(job_id).json["items"][0]["fileId"]
    tenant.client.delete(tenant.url(f"/files/{file_id}"), headers=tenant.headers)
    assert run(sessions, storage, engine, item_id) == ItemOutcome.FAILED
    job = tenant.get_job(job_id)
    assert job.json["status"] == "Failed"
    assert job.json["errorMessage"] == "the file was deleted before the item ran"
    assert "Retry-After" not in job.headers


def test_multimask_and_extra_outputs(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, engine: GrabCutEngine
) -> None:
    job_id, [item_id] = submit(
        tenant, multimaskOutput=True, outputs=["polygons", "mask", "rle", "svgPath"]
    )
    assert run(sessions, storage, engine, item_id) == ItemOutcome.COMPLETED
    segments = tenant.get_job(job_id).json["items"][0]["segments"]
    assert 2 <= len(segments) <= 3
    scores = [s["score"] for s in segments]
    assert scores == sorted(scores, reverse=True)
    for segment in segments:
        assert segment["rle"]["size"] == [120, 160]
        assert sum(segment["rle"]["counts"]) == 120 * 160
        assert segment["svgPath"].startswith("M")
        assert segment["mask"]["width"] == 160


def test_only_the_requested_outputs_are_made(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, engine: GrabCutEngine
) -> None:
    job_id, [item_id] = submit(tenant, outputs=["rle"])
    assert run(sessions, storage, engine, item_id) == ItemOutcome.COMPLETED
    [segment] = tenant.get_job(job_id).json["items"][0]["segments"]
    assert "rle" in segment and "mask" not in segment and "polygons" not in segment


def releases(
    sessions: sessionmaker[Session],
    item_id: int,
    until: Any,
    seen: list[tuple[int, int]] | None = None,
    timeout: float = 60,
) -> list[tuple[int, int]]:
    """(attempt, due time) of each release of the item, as the worker wrote
    them to its row (release_item: published_time is when its retry is due),
    until ``until(item)`` holds. Times are the code's, never a poll's: a
    late look at the row can only miss a release, and a missed one fails
    the test's count rather than skewing a gap. Added to ``seen``."""
    seen = [] if seen is None else seen
    deadline = time.monotonic() + timeout
    while True:
        item = load(sessions, JobItem, item_id)
        if item.status == "Queued" and item.attempt > 0:
            release = (item.attempt, item.published_time)
            if release not in seen:
                seen.append(release)
        if until(item):
            return seen
        assert time.monotonic() < deadline, f"releases so far: {seen}"
        time.sleep(0.02)


def elsewhere(storage: S3Storage, bucket: str) -> S3Storage:
    """``storage``'s prefix in ``bucket`` of the same S3 server."""
    return S3Storage(
        bucket, storage.prefix.rstrip("/"), endpoint_url=storage._client.meta.endpoint_url
    )


def test_a_storage_error_requeues_with_the_tasks_countdown_until_storage_answers(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> None:
    """Storage that answers but refuses the item's work (its bucket is
    missing: a 404, not an outage) costs an attempt per try, with the
    Celery task's own countdown between them: retries due 2 and 4 seconds
    after each failed attempt ended, and the item completes once the
    bucket is there. Gaps are read from the times the worker recorded."""
    job_id, [item_id] = submit(tenant)
    missing = elsewhere(storage, f"segq-missing-{uuid.uuid4().hex[:8]}")
    image_key = load(sessions, JobItem, item_id).file_storage_key
    with grabcut_worker(celery_app, sessions, missing, max_attempts=4):
        # (The API published the item when it created the job.)
        failed = releases(
            sessions, item_id, lambda item: item.attempt >= 2 or item.status == "Failed"
        )
        missing._client.create_bucket(Bucket=missing.bucket)
        missing.put(image_key, storage.get(image_key), "image/png")
        releases(sessions, item_id, lambda item: item.status in ("Completed", "Failed"), failed)
    # Each release's due time less its countdown is when it was released.
    assert [attempt for attempt, _ in failed] == [1, 2]
    [(_, due_1), (_, due_2)] = failed
    released_1, released_2 = due_1 - 2000, due_2 - 4000
    # Attempt 2 was claimed when its retry was due, and released after.
    assert released_2 >= due_1 and released_2 - released_1 >= 2000
    item = load(sessions, JobItem, item_id)
    assert item.attempt == 3 and item.finished_time >= due_2
    job = tenant.get_job(job_id).json
    assert job["status"] == "Completed"
    [segment] = item.result["segments"]
    assert missing.get(segment["maskKey"]).startswith(b"\x89PNG")


def test_a_storage_error_fails_the_item_once_its_attempts_run_out(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> None:
    job_id, [item_id] = submit(tenant)
    from prometheus_client import REGISTRY

    def storage_errors() -> float:
        return REGISTRY.get_sample_value("segq_worker_storage_errors_total") or 0.0

    counted = storage_errors()
    missing = elsewhere(storage, f"segq-missing-{uuid.uuid4().hex[:8]}")
    with grabcut_worker(celery_app, sessions, missing, max_attempts=2):
        failed = releases(sessions, item_id, lambda item: item.status == "Failed")
    assert [attempt for attempt, _ in failed] == [1]
    [(_, due_1)] = failed
    # Each attempt storage failed, the last (which failed the item) too.
    assert storage_errors() - counted == 2
    item = load(sessions, JobItem, item_id)
    assert item.attempt == 2 and item.finished_time >= due_1
    job = tenant.get_job(job_id).json
    assert job["status"] == "Failed"
    assert job["errorMessage"].startswith("storage failed each of 2 attempts")
    assert "NoSuchBucket" in job["errorMessage"]


def test_storage_retries_wait_longer_each_time() -> None:
    from segq.worker.pipeline import storage_retry_delay

    delays = [storage_retry_delay(attempt) for attempt in range(1, 9)]
    assert delays[:5] == [2, 4, 8, 16, 32]
    assert delays[5:] == [60, 60, 60]


def test_an_engine_error_fails_the_item_with_its_message(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    class BrokenEngine(GrabCutEngine):
        def segment(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("CUDA out of memory")

    job_id, [item_id] = submit(tenant)
    assert run(sessions, storage, BrokenEngine(), item_id) == ItemOutcome.FAILED
    job = tenant.get_job(job_id).json
    assert job["status"] == "Failed"
    assert job["errorMessage"] == "segmentation failed: RuntimeError: CUDA out of memory"


def claim_all_at_once(sessions: sessionmaker[Session], item_ids: list[int]) -> list[Any]:
    """Claim every item from its own thread, all released together."""
    start = threading.Barrier(len(item_ids))

    def claim(item_id: int) -> Any:
        start.wait()
        return claim_item(
            sessions, item_id, lease_seconds=LEASE, engine_name="grabcut", max_attempts=3
        )

    with ThreadPoolExecutor(len(item_ids)) as pool:
        return list(pool.map(claim, item_ids))


def test_concurrent_claims_start_the_job_exactly_once(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    files = [tenant.upload(png_bytes(seed=seed)).json["id"] for seed in range(12)]
    body = {**scene_prompt_body(files[0]), "items": [{"fileId": i} for i in files]}
    job_id, items = submit(tenant, body)
    with sessions.begin() as session:
        # Set directly: the API refuses hooks it cannot reach, and none is sent here.
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(webhook={"url": "https://hooks.example/segq", "events": ["job.started"]})
        )

    claims = claim_all_at_once(sessions, items)

    assert all(claim is not None and claim.attempt == 1 for claim in claims)
    assert {claim.job_id for claim in claims} == {job_id}
    job = load(sessions, Job, job_id)
    assert (job.status, job.engine) == (JobStatus.RUNNING, "grabcut")
    # The job started no later than its first item.
    assert job.start_time <= min(load(sessions, JobItem, i).started_time for i in items)
    with sessions() as session:
        started = session.scalars(
            select(WebhookDelivery.event_type).where(WebhookDelivery.job_id == job_id)
        ).all()
    assert started == ["job.started"]


def test_wake_ups_at_once_each_claim_another_item_first_queued_first(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    """Ten messages, all for the last item, taken at once: each claims one
    item, the ten queued first (more than one round of candidates)."""
    files = [tenant.upload(png_bytes(seed=seed)).json["id"] for seed in range(16)]
    body = {**scene_prompt_body(files[0]), "items": [{"fileId": i} for i in files]}
    _, items = submit(tenant, body)
    start = threading.Barrier(10)

    def wake(_: int) -> Any:
        start.wait()
        return claim_next_item(
            sessions, items[-1], lease_seconds=LEASE, engine_name="grabcut", max_attempts=3
        )

    with ThreadPoolExecutor(10) as pool:
        claims = list(pool.map(wake, range(10)))
    assert sorted(claim.item_id for claim in claims) == items[:10]


def test_a_forked_process_starts_without_its_parents_leases(
    sessions: sessionmaker[Session],
) -> None:
    """Pool processes are forked: a child must not renew (or wait on the
    lock of) leases its parent held at the fork."""
    keeper = LeaseKeeper()
    claim = Claim(1, 1, 1, 1, "k", None, {}, {})
    keeper.hold(sessions, claim, lease_seconds=LEASE)
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover (the child reports by its exit code)
            os._exit(0 if not keeper._held and keeper._thread is None else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert keeper._held  # the parent's own is still there
    finally:
        keeper.let_go(claim)
