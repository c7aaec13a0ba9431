"""Items run in encoder batches by the pipeline (worker/pipeline.py), against
Postgres and S3 (moto over HTTP), with a tiny SAM of random weights: each
item of a batch is claimed, finished and failed exactly as a lone one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from segq.models import ItemStatus, Job, JobItem, JobStatus
from segq.storage import S3Storage, StorageError
from segq.worker.claims import Claim
from segq.worker.engines.encoder_options import EncoderOptions, Precision
from segq.worker.engines.sam import SamEngine
from segq.worker.item_inputs import ImageLimits
from segq.worker.pipeline import ItemOutcome, StorageUnavailable, process_item
from tests.support.harness import TEST_LIMITS, Tenant, item_ids
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.tiny_sam import load_tiny_sam

#: Each test builds a SAM-family model (make test-fast skips them).
pytestmark = pytest.mark.model

LEASE = 60


def sam_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_size: int
) -> tuple[SamEngine, list[int]]:
    """A tiny SAM encoding ``batch_size`` images at once, and the batch
    sizes its encoder is called with."""
    sam = load_tiny_sam(tmp_path, monkeypatch)
    engine = SamEngine(
        sam,
        "sam_tiny_test",
        encoder_options=EncoderOptions(precision=Precision.FP32, batch_size=batch_size),
    )
    calls: list[int] = []
    sam.image_encoder.register_forward_hook(
        lambda _module, args, _out: calls.append(args[0].shape[0])
    )
    return engine, calls


@pytest.fixture
def batching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SamEngine, list[int]]:
    """sam_engine encoding four images at once: the batch most tests run."""
    return sam_engine(tmp_path, monkeypatch, batch_size=4)


def submit(tenant: Tenant, sizes: list[tuple[int, int]]) -> tuple[int, list[int]]:
    """One job over an image of each size; (job id, item ids by position)."""
    ids = [tenant.upload(png_bytes(w, h, seed=i)).json["id"] for i, (w, h) in enumerate(sizes)]
    body = {**scene_prompt_body(ids[0]), "items": [{"fileId": i} for i in ids]}
    response = tenant.post_job(body)
    assert response.status_code == 200, response.json
    job_id = int(response.json["jobId"])
    return job_id, item_ids(tenant, job_id)


def run(
    sessions: sessionmaker[Session],
    storage: Any,
    engine: SamEngine,
    item_id: int,
    *,
    wait_ms: int = 0,
    limits: ImageLimits = TEST_LIMITS,
    requeue: Any = None,
) -> ItemOutcome:
    return process_item(
        sessions,
        storage,
        engine,
        item_id,
        lease_seconds=LEASE,
        max_attempts=3,
        limits=limits,
        batch_wait_ms=wait_ms,
        taken_along=None
        if requeue is None
        else lambda run: requeue(run.claim) if run.outcome == ItemOutcome.RELEASED else None,
    ).outcome


def statuses(sessions: sessionmaker[Session], item_ids: list[int]) -> list[tuple[str, int]]:
    with sessions() as session:
        return [
            (item.status, item.attempt) for item in (session.get_one(JobItem, i) for i in item_ids)
        ]


SIZES = [(130, 90), (140, 95), (150, 100), (160, 105), (120, 80), (110, 75)]
DONE = (ItemStatus.COMPLETED, 1)
WAITING = (ItemStatus.QUEUED, 0)


def test_items_of_one_job_are_encoded_as_one_batch_and_spare_messages_skip(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    batching: tuple[SamEngine, list[int]],
) -> None:
    engine, calls = batching
    job_id, items = submit(tenant, SIZES)
    assert run(sessions, storage, engine, items[0]) == ItemOutcome.COMPLETED
    assert calls == [4]
    assert statuses(sessions, items) == [DONE] * 4 + [WAITING] * 2
    # The message of an item taken along wakes a worker for what is left;
    # once nothing is, the other messages skip.
    assert run(sessions, storage, engine, items[1]) == ItemOutcome.COMPLETED
    assert calls == [4, 2]
    assert statuses(sessions, items) == [DONE] * 6
    for item_id in items[2:]:
        assert run(sessions, storage, engine, item_id) == ItemOutcome.SKIPPED
    with sessions() as session:
        assert session.get_one(Job, job_id).status == JobStatus.COMPLETED


def test_masks_are_the_same_in_a_batch_as_alone(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same model (same seed), once four items at a time, once one at a
    time: the stored masks are the same bytes (fp32: batching only reorders
    sums, at most 1e-5 apart in the logits, far from SAM's 0 threshold
    here; tests/engines/test_image_encoder.py bounds the logits)."""
    batching, batch_calls = sam_engine(tmp_path, monkeypatch, batch_size=4)
    alone, alone_calls = sam_engine(tmp_path, monkeypatch, batch_size=1)
    _, batched_items = submit(tenant, SIZES[:4])
    _, lone_items = submit(tenant, SIZES[:4])
    run(sessions, storage, batching, batched_items[0])
    for item_id in lone_items:
        run(sessions, storage, alone, item_id)
    assert (batch_calls, alone_calls) == ([4], [1, 1, 1, 1])
    with sessions() as session:
        for batched_id, lone_id in zip(batched_items, lone_items, strict=True):
            batched = session.get_one(JobItem, batched_id).result
            lone = session.get_one(JobItem, lone_id).result
            assert batched is not None and lone is not None
            [one], [other] = batched["segments"], lone["segments"]
            assert storage.get(one["maskKey"]) == storage.get(other["maskKey"])
            assert one["score"] == pytest.approx(other["score"], abs=1e-5)


def test_a_deep_queue_of_one_item_jobs_batches_too(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    batching: tuple[SamEngine, list[int]],
) -> None:
    engine, calls = batching
    jobs = [submit(tenant, [size]) for size in SIZES[:5]]
    items = [job_items[0] for _, job_items in jobs]
    assert run(sessions, storage, engine, items[0]) == ItemOutcome.COMPLETED
    assert calls == [4]
    # The longest waiting first: the first four jobs, each rolled up.
    assert statuses(sessions, items) == [DONE] * 4 + [WAITING]
    with sessions() as session:
        assert [session.get_one(Job, job_id).status for job_id, _ in jobs] == [
            JobStatus.COMPLETED
        ] * 4 + [JobStatus.QUEUED]


def test_a_batch_waits_for_company_no_longer_than_the_batch_wait(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    batching: tuple[SamEngine, list[int]],
) -> None:
    engine, calls = batching
    _, [first] = submit(tenant, SIZES[:1])
    _, [second] = submit(tenant, SIZES[1:2])
    # Company is there: taken at once, and no wait asked for.
    assert run(sessions, storage, engine, first, wait_ms=0) == ItemOutcome.COMPLETED
    assert calls == [2]
    _, [lone] = submit(tenant, SIZES[2:3])
    started = time.monotonic()
    assert run(sessions, storage, engine, lone, wait_ms=0) == ItemOutcome.COMPLETED
    unwaited = time.monotonic() - started
    _, [waiting] = submit(tenant, SIZES[3:4])
    started = time.monotonic()
    assert run(sessions, storage, engine, waiting, wait_ms=1500) == ItemOutcome.COMPLETED
    waited = time.monotonic() - started
    # The lone item waited for company about the bound, not much longer.
    assert waited >= 1.5 and waited - unwaited >= 1.0
    assert waited < 1.5 + unwaited + 10.0  # generous: a shared, noisy machine
    assert calls == [2, 1, 1]
    assert statuses(sessions, [first, second, lone, waiting]) == [DONE] * 4


def test_an_image_that_fails_fails_alone_and_the_batch_completes(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    batching: tuple[SamEngine, list[int]],
) -> None:
    engine, calls = batching
    job_id, items = submit(tenant, [(130, 90), (400, 300), (140, 95)])
    limits = ImageLimits(max_pixels=50_000, fetch_policy=None)  # the 400x300 is too large
    assert run(sessions, storage, engine, items[0], limits=limits) == ItemOutcome.COMPLETED
    assert calls == [2]
    assert statuses(sessions, items) == [DONE, (ItemStatus.FAILED, 1), DONE]
    with sessions() as session:
        message = session.get_one(JobItem, items[1]).error_message
        assert message is not None and "refused" in message
        assert session.get_one(Job, job_id).status == JobStatus.COMPLETED


class FailingReads:
    """S3 storage whose reads of some keys fail as an outage would."""

    def __init__(self, inner: S3Storage, failing: set[str]) -> None:
        self._inner = inner
        self.failing = failing

    def get(self, key: str) -> bytes:
        if key in self.failing:
            raise StorageError(f"storage did not answer for {key} (test)")
        return self._inner.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def file_key(sessions: sessionmaker[Session], item_id: int) -> str:
    from segq.models import StoredFile

    with sessions() as session:
        item = session.get_one(JobItem, item_id)
        stored = session.get_one(StoredFile, item.file_id)
        return stored.storage_key


def test_storage_failures_put_items_back_the_one_asked_for_raises(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    batching: tuple[SamEngine, list[int]],
) -> None:
    engine, calls = batching
    _, items = submit(tenant, SIZES[:3])
    flaky = FailingReads(storage, {file_key(sessions, items[1])})
    requeued: list[Claim] = []
    assert run(sessions, flaky, engine, items[0], requeue=requeued.append) == (
        ItemOutcome.COMPLETED
    )
    # The item taken along is back in the queue, for its next attempt, and
    # handed to the caller to send again; its company completed.
    assert [(c.item_id, c.attempt) for c in requeued] == [(items[1], 1)]
    assert statuses(sessions, items) == [DONE, (ItemStatus.QUEUED, 1), DONE]
    assert calls == [2]

    # Its own message, arriving before its retry is due, leaves it be.
    assert run(sessions, flaky, engine, items[1]) == ItemOutcome.SKIPPED
    retry_is_due(sessions, items[1])
    flaky.failing = {file_key(sessions, items[1])}
    with pytest.raises(StorageUnavailable) as unavailable:
        run(sessions, flaky, engine, items[1], requeue=requeued.append)
    assert unavailable.value.retry_in_seconds == 4  # its second attempt failed
    assert statuses(sessions, items)[1] == (ItemStatus.QUEUED, 2)
    retry_is_due(sessions, items[1])
    flaky.failing = set()
    assert run(sessions, flaky, engine, items[1]) == ItemOutcome.COMPLETED
    assert statuses(sessions, items)[1] == (ItemStatus.COMPLETED, 3)


def retry_is_due(sessions: sessionmaker[Session], item_id: int) -> None:
    """What waiting out the item's backoff would do, without the wait."""
    with sessions.begin() as session:
        session.get_one(JobItem, item_id).published_time = 0


def test_a_storage_outage_costs_each_item_one_attempt_per_backoff(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    batching: tuple[SamEngine, list[int]],
) -> None:
    """Each item's own message comes while the others wait out their
    backoff: no batch takes them along and no early message claims them,
    so an outage of a few seconds fails nothing."""
    engine, _ = batching
    _, items = submit(tenant, SIZES[:4])
    flaky = FailingReads(storage, {file_key(sessions, i) for i in items})
    with pytest.raises(StorageUnavailable):
        run(sessions, flaky, engine, items[0], requeue=lambda _: None)
    assert statuses(sessions, items) == [(ItemStatus.QUEUED, 1)] * 4
    for item_id in items[1:]:
        assert run(sessions, flaky, engine, item_id) == ItemOutcome.SKIPPED
    assert statuses(sessions, items) == [(ItemStatus.QUEUED, 1)] * 4
    flaky.failing = set()
    for item_id in items:
        retry_is_due(sessions, item_id)
    assert run(sessions, flaky, engine, items[0]) == ItemOutcome.COMPLETED
    assert statuses(sessions, items) == [(ItemStatus.COMPLETED, 2)] * 4
