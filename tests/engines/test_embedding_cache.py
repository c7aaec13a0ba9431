"""One encoding per image: the embedding cache's two tiers, on the tiny SAM
with random weights, tier 2 in S3 (moto) or on local disk."""

from __future__ import annotations

import json
import os
import struct
import time
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.api.health_routes import ENGINE_SECONDS_BUCKETS
from segq.models import JobItem
from segq.settings import Settings
from segq.storage import LocalStorage, ObjectStorage, S3Storage
from segq.worker.engines import EngineChoice, load_engine
from segq.worker.engines.base import Candidate, Prompt, SegmentationEngine
from segq.worker.engines.embedding_cache import (
    EMBEDDINGS_PREFIX,
    MAGIC,
    CorruptEntry,
    Embedding,
    EmbeddingCache,
    EmbeddingKey,
    EmbeddingSource,
    checkpoint_digest,
    decode_entry,
    encode_entry,
    model_id,
    sweep_expired_embeddings,
)
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.engines.item_metrics import ItemMetrics, recording_item_metrics
from segq.worker.engines.sam import SamEngine, load_sam
from segq.worker.pipeline import ItemOutcome, process_item
from tests.support.harness import TEST_LIMITS, Tenant
from tests.support.images import cognite_sample_body, png_bytes, scene
from tests.support.tiny_sam import register_tiny_architecture, save_tiny_sam_checkpoint

MB = 1024 * 1024
PROMPT = Prompt(
    points=np.array([[40.0, 30.0], [5.0, 5.0]]),
    labels=np.array([1, 0]),
    box=np.array([10.0, 8.0, 70.0, 55.0]),
)


class CountingSam:
    """A loaded tiny SAM whose image-encoder runs are counted."""

    def __init__(self, checkpoint: Path, architecture: str) -> None:
        self.sam = load_sam(architecture, checkpoint, "cpu")
        self.encodes = 0
        self.sam.image_encoder.register_forward_hook(self._count)
        self.model_id = model_id("sam_tiny_test", checkpoint_digest(checkpoint))

    def _count(self, *_args: object) -> None:
        self.encodes += 1

    def engine(self, cache: EmbeddingCache) -> SamEngine:
        return SamEngine(self.sam, "sam_tiny_test", embeddings=cache, model_id=self.model_id)


@pytest.fixture
def architecture(monkeypatch: pytest.MonkeyPatch) -> str:
    return register_tiny_architecture(monkeypatch)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_tiny_sam_checkpoint(tmp_path / "tiny.pth", seed=0)


def fresh_cache(storage: ObjectStorage | None, max_bytes: int = 64 * MB) -> EmbeddingCache:
    """What a new worker process starts with: an empty tier 1."""
    return EmbeddingCache(storage, max_bytes=max_bytes, ttl_seconds=3600)


def segment(engine: SamEngine, image: npt.NDArray[np.uint8]) -> tuple[list[Candidate], ItemMetrics]:
    with recording_item_metrics() as metrics:
        candidates = engine.segment(image, PROMPT, multimask=True)
    return candidates, metrics


def assert_same_candidates(a: list[Candidate], b: list[Candidate], *, exact: bool) -> None:
    assert len(a) == len(b) == 3
    for left, right in zip(a, b, strict=True):
        if exact:
            assert np.array_equal(left.mask, right.mask)
            assert left.score == right.score
        else:
            # Tier 2 keeps float16 features: a decoder fed them may flip a
            # pixel whose logit sits within float16 rounding of zero.
            assert np.mean(left.mask != right.mask) <= 0.001
            assert abs(left.score - right.score) <= 1e-2


@pytest.mark.model
def test_hits_give_the_masks_of_a_miss_and_encode_nothing(
    architecture: str, checkpoint: Path, storage: S3Storage
) -> None:
    counting = CountingSam(checkpoint, architecture)
    image, _ = scene(80, 60)
    cache = fresh_cache(storage)
    computed, metrics = segment(counting.engine(cache), image)
    assert metrics.embedding == EmbeddingSource.COMPUTED and counting.encodes == 1

    # Another engine in the same process: tier 1.
    local, metrics = segment(counting.engine(cache), image)
    assert metrics.embedding == EmbeddingSource.LOCAL and counting.encodes == 1
    assert_same_candidates(computed, local, exact=True)

    # Another process: an empty tier 1, the same storage.
    shared, metrics = segment(counting.engine(fresh_cache(storage)), image)
    assert metrics.embedding == EmbeddingSource.SHARED and counting.encodes == 1
    assert_same_candidates(computed, shared, exact=False)

    # Without any cache the engine encodes, and its masks are the same.
    uncached, _ = segment(SamEngine(counting.sam, "sam_tiny_test"), image)
    assert counting.encodes == 2
    assert_same_candidates(computed, uncached, exact=True)


@pytest.mark.model
def test_the_engine_keeps_the_last_image_as_a_local_hit(
    architecture: str, checkpoint: Path, storage: S3Storage
) -> None:
    counting = CountingSam(checkpoint, architecture)
    engine = counting.engine(fresh_cache(storage))
    image, _ = scene(80, 60)
    segment(engine, image)
    _, metrics = segment(engine, image)
    assert metrics.embedding == EmbeddingSource.LOCAL and counting.encodes == 1
    assert metrics.encode_ms < 1000


@pytest.mark.model
def test_another_checkpoint_or_a_rotated_image_never_hits(
    architecture: str, checkpoint: Path, storage: S3Storage, tmp_path: Path
) -> None:
    image, _ = scene(64, 64)  # square: its rotation has the same shape
    counting = CountingSam(checkpoint, architecture)
    segment(counting.engine(fresh_cache(storage)), image)

    rotated = np.ascontiguousarray(np.rot90(image))
    _, metrics = segment(counting.engine(fresh_cache(storage)), rotated)
    assert metrics.embedding == EmbeddingSource.COMPUTED and counting.encodes == 2

    other = CountingSam(save_tiny_sam_checkpoint(tmp_path / "other.pth", seed=1), architecture)
    assert other.model_id != counting.model_id
    _, metrics = segment(other.engine(fresh_cache(storage)), image)
    assert metrics.embedding == EmbeddingSource.COMPUTED and other.encodes == 1
    keys = {stored.key for stored in storage.list_objects(EMBEDDINGS_PREFIX)}
    assert len(keys) == 3
    assert {key.split("/")[1] for key in keys} == {counting.model_id, other.model_id}


@pytest.mark.model
@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "garbage", "empty"])
def test_a_damaged_shared_entry_is_recomputed_and_replaced(
    architecture: str, checkpoint: Path, storage: S3Storage, damage: str
) -> None:
    counting = CountingSam(checkpoint, architecture)
    image, _ = scene(80, 60)
    computed, _ = segment(counting.engine(fresh_cache(storage)), image)
    [stored] = list(storage.list_objects(EMBEDDINGS_PREFIX))
    whole = storage.get(stored.key)
    damaged = {
        "truncated": whole[: len(whole) - 100],
        "flipped byte": whole[:-50] + bytes([whole[-50] ^ 0x01]) + whole[-49:],
        "garbage": b"\x00" * len(whole),
        "empty": b"",
    }[damage]
    storage.put(stored.key, damaged, "application/octet-stream")

    again, metrics = segment(counting.engine(fresh_cache(storage)), image)
    assert metrics.embedding == EmbeddingSource.COMPUTED and counting.encodes == 2
    assert_same_candidates(computed, again, exact=True)
    decode_entry(storage.get(stored.key))  # whole again

    _, metrics = segment(counting.engine(fresh_cache(storage)), image)
    assert metrics.embedding == EmbeddingSource.SHARED and counting.encodes == 2


def embedding(seed: int, channels: int = 8) -> Embedding:
    rng = np.random.default_rng(seed)
    return Embedding(
        features=rng.standard_normal((1, channels, 16, 16)).astype(np.float32),
        original_size=(60, 80),
        input_size=(48, 64),
    )


def test_the_local_tier_stays_within_its_byte_bound() -> None:
    one = embedding(0).nbytes  # 8 KiB
    cache = fresh_cache(None, max_bytes=3 * one + one // 2)

    for seed in range(10):
        cache.get_or_compute(EmbeddingKey("m", f"image-{seed}"), partial(embedding, seed))
        assert cache.local_bytes <= cache.local_max_bytes
    assert cache.local_bytes == 3 * one
    # The three most recent stayed; the first was evicted.
    for seed in (7, 8, 9):
        _, source = cache.get_or_compute(EmbeddingKey("m", f"image-{seed}"), lambda: embedding(0))
        assert source == EmbeddingSource.LOCAL
    _, source = cache.get_or_compute(EmbeddingKey("m", "image-0"), lambda: embedding(0))
    assert source == EmbeddingSource.COMPUTED
    # One larger than the whole bound is computed, used, and not kept.
    big = embedding(1, channels=64)
    found, source = cache.get_or_compute(EmbeddingKey("m", "big"), lambda: big)
    assert found is big and source == EmbeddingSource.COMPUTED
    assert cache.local_bytes <= cache.local_max_bytes


def test_a_shared_entry_is_float16_with_its_sizes() -> None:
    original = embedding(2)
    data = encode_entry(original, created_time=1000.0)
    assert len(data) < original.nbytes * 0.6  # float16, a small header
    decoded, created = decode_entry(data)
    assert created == 1000.0
    assert decoded.original_size == (60, 80) and decoded.input_size == (48, 64)
    assert decoded.features.dtype == np.float32
    np.testing.assert_allclose(decoded.features, original.features, rtol=1e-3, atol=1e-3)


def test_an_expired_shared_entry_is_a_miss_and_the_sweep_deletes_it(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "objects", secret_key="k")
    now = [10_000.0]
    writer = EmbeddingCache(storage, max_bytes=MB, ttl_seconds=600, clock=lambda: now[0])
    key, fresh_key = EmbeddingKey("m", "old"), EmbeddingKey("m", "new")
    writer.get_or_compute(key, lambda: embedding(0))
    now[0] += 601
    writer.get_or_compute(fresh_key, lambda: embedding(1))
    reader = EmbeddingCache(storage, max_bytes=MB, ttl_seconds=600, clock=lambda: now[0])
    assert reader.get_or_compute(key, lambda: embedding(0))[1] == EmbeddingSource.COMPUTED
    assert reader.get_or_compute(fresh_key, lambda: embedding(1))[1] == EmbeddingSource.SHARED

    # The sweep goes by the object's own age.
    path = storage.root / key.object_key
    os.utime(path, (time.time() - 700, time.time() - 700))
    (storage.root / "projects").mkdir()
    (storage.root / "projects" / "mask.png").write_bytes(b"not an embedding")
    os.utime(storage.root / "projects" / "mask.png", (0, 0))
    assert sweep_expired_embeddings(storage, ttl_seconds=600) == 1
    assert not path.exists()
    assert (storage.root / fresh_key.object_key).exists()
    assert (storage.root / "projects" / "mask.png").exists()


def test_the_sweep_lists_s3_by_prefix(storage: S3Storage) -> None:
    cache = fresh_cache(storage)
    cache.get_or_compute(EmbeddingKey("m", "a"), lambda: embedding(0))
    storage.put("projects/1/mask.png", b"x", "image/png")
    assert [s.key for s in storage.list_objects(EMBEDDINGS_PREFIX)] == ["embeddings/m/a"]
    # Nothing is old enough yet; with a TTL in the past everything listed is.
    assert sweep_expired_embeddings(storage, ttl_seconds=3600) == 0
    assert sweep_expired_embeddings(storage, ttl_seconds=-60) == 1
    assert list(storage.list_objects(EMBEDDINGS_PREFIX)) == []
    assert storage.get("projects/1/mask.png") == b"x"


def test_settings_read_the_cache_bounds() -> None:
    settings = Settings.from_env(
        {
            "SEGQ_DATA_DIR": "/tmp/segq-settings-test",
            "SEGQ_SECRET_KEY": "k",
            "SEGQ_EMBEDDING_CACHE_MB": "64",
            "SEGQ_EMBEDDING_TTL_SECONDS": "120",
        }
    )
    assert settings.embedding_cache_mb == 64 and settings.embedding_ttl_seconds == 120
    default = Settings.from_env(
        {"SEGQ_DATA_DIR": "/tmp/segq-settings-test", "SEGQ_SECRET_KEY": "k"}
    )
    assert default.embedding_cache_mb == 512


def run_job(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    engine: SegmentationEngine,
    file_id: int,
) -> dict[str, object]:
    job_id = tenant.post_job(cognite_sample_body(file_id)).json["jobId"]
    with sessions() as session:
        [item_id] = session.scalars(select(JobItem.id).where(JobItem.job_id == job_id))
    outcome = process_item(
        sessions, storage, engine, item_id, lease_seconds=60, max_attempts=3, limits=TEST_LIMITS
    ).outcome
    assert outcome == ItemOutcome.COMPLETED
    job = tenant.get_job(job_id).json
    [item] = job["items"]
    metrics: dict[str, object] = item["metrics"]
    return metrics


@pytest.mark.model
def test_a_second_job_in_another_worker_reports_shared_and_encodes_nothing(
    architecture: str,
    checkpoint: Path,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    file_id = tenant.upload(png_bytes(130, 90)).json["id"]
    counting = CountingSam(checkpoint, architecture)
    first = run_job(tenant, sessions, storage, counting.engine(fresh_cache(storage)), file_id)
    assert first["embedding"] == "computed" and counting.encodes == 1
    assert isinstance(first["encodeMs"], float) and first["encodeMs"] > 0
    assert isinstance(first["decodeMs"], float) and first["decodeMs"] > 0
    second = run_job(tenant, sessions, storage, counting.engine(fresh_cache(storage)), file_id)
    assert second["embedding"] == "shared" and counting.encodes == 1
    metrics = tenant.client.get("/metrics").get_data(as_text=True)
    assert 'segq_recent_item_embeddings{source="computed"} 1\n' in metrics
    assert 'segq_recent_item_embeddings{source="shared"} 1\n' in metrics
    assert 'segq_recent_item_embeddings{source="local"} 0\n' in metrics
    # The engine-time histogram holds both items, each in the buckets its
    # own encode + decode time falls in.
    figures = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("segq_recent_item_engine_seconds")
    }
    engine_seconds = [
        (float(str(job["encodeMs"])) + float(str(job["decodeMs"]))) / 1000
        for job in (first, second)
    ]
    assert figures["segq_recent_item_engine_seconds_count"] == 2
    assert figures["segq_recent_item_engine_seconds_sum"] == pytest.approx(
        sum(engine_seconds), abs=0.002
    )
    assert figures['segq_recent_item_engine_seconds_bucket{le="+Inf"}'] == 2
    for bound in ENGINE_SECONDS_BUCKETS:
        expected = sum(1 for seconds in engine_seconds if seconds <= bound)
        assert figures[f'segq_recent_item_engine_seconds_bucket{{le="{bound:g}"}}'] == expected


@pytest.mark.model
def test_load_engine_keys_the_cache_by_the_checkpoints_digest(
    architecture: str, checkpoint: Path, storage: S3Storage
) -> None:
    cache = fresh_cache(storage)
    engine = load_engine(EngineChoice("sam_tiny_test", checkpoint), "cpu", cache)
    assert isinstance(engine, SamEngine)
    segment(engine, scene(40, 30)[0])
    [stored] = list(storage.list_objects(EMBEDDINGS_PREFIX))
    assert stored.key.split("/")[1] == model_id("sam_tiny_test", checkpoint_digest(checkpoint))


def test_grabcut_items_report_no_embedding(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    file_id = tenant.upload(png_bytes(130, 90)).json["id"]
    metrics = run_job(tenant, sessions, storage, GrabCutEngine(), file_id)
    assert metrics["embedding"] is None and metrics["encodeMs"] == 0
    assert isinstance(metrics["decodeMs"], float) and metrics["decodeMs"] > 0


def sam2_like(seed: int) -> Embedding:
    """SAM 2's layout at a small size: the image embedding and two finer maps."""
    rng = np.random.default_rng(seed)
    return Embedding(
        features=rng.standard_normal((1, 8, 4, 4)).astype(np.float32),
        original_size=(60, 80),
        input_size=(64, 64),
        high_res_features=(
            rng.standard_normal((1, 2, 16, 16)).astype(np.float32),
            rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        ),
    )


def test_a_shared_entry_keeps_every_feature_map_in_order() -> None:
    original = sam2_like(3)
    assert original.nbytes == (8 * 16 + 2 * 256 + 4 * 64) * 4
    decoded, _ = decode_entry(encode_entry(original, created_time=5.0))
    assert [a.shape for a in decoded.high_res_features] == [(1, 2, 16, 16), (1, 4, 8, 8)]
    for mine, theirs in zip(
        (decoded.features, *decoded.high_res_features),
        (original.features, *original.high_res_features),
        strict=True,
    ):
        assert mine.dtype == np.float32
        np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-3)
    # SAM's entries hold one array, as before.
    assert decode_entry(encode_entry(embedding(0), created_time=5.0))[0].high_res_features == ()


def test_array_lengths_that_do_not_fill_the_payload_are_corrupt() -> None:
    data = encode_entry(sam2_like(4), created_time=5.0)
    start = len(MAGIC) + 4
    (length,) = struct.unpack(">I", data[len(MAGIC) : start])
    header = json.loads(data[start : start + length])
    first, second, third = header["arrayBytes"]
    for lengths in ([first, second], [first + second + third], [first + 1, second - 1, third]):
        forged = json.dumps({**header, "arrayBytes": lengths}).encode()
        damaged = MAGIC + struct.pack(">I", len(forged)) + forged + data[start + length :]
        with pytest.raises(CorruptEntry):
            decode_entry(damaged)
