"""The SAM path, through the real loader and SamPredictor, on a tiny SAM with random weights."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.models import JobItem
from segq.storage import S3Storage
from segq.worker.engines import EngineChoice, load_engine
from segq.worker.engines.base import Prompt
from segq.worker.engines.sam import SAM_ARCHITECTURES, SamEngine, load_sam
from segq.worker.engines.torch_support import CheckpointError
from segq.worker.pipeline import ItemOutcome, process_item
from tests.support.harness import TEST_LIMITS, Tenant
from tests.support.images import cognite_sample_body, png_bytes, scene
from tests.support.tiny_sam import (
    assert_unreadable_checkpoints_named,
    register_tiny_architecture,
    save_tiny_sam_checkpoint,
)

#: Each test builds a SAM-family model (make test-fast skips them).
pytestmark = pytest.mark.model


@pytest.fixture
def tiny_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SamEngine:
    architecture = register_tiny_architecture(monkeypatch)
    checkpoint = save_tiny_sam_checkpoint(tmp_path / "tiny.pth")
    return SamEngine(load_sam(architecture, checkpoint, "cpu"), "sam_tiny_test")


def prompt(
    points: list[tuple[float, float]], labels: list[int], box: tuple[float, ...] | None
) -> Prompt:
    return Prompt(
        points=np.array(points, dtype=np.float64).reshape(-1, 2),
        labels=np.array(labels, dtype=np.int64),
        box=None if box is None else np.array(box, dtype=np.float64),
    )


def test_loader_restores_exactly_the_saved_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    architecture = register_tiny_architecture(monkeypatch)
    checkpoint = save_tiny_sam_checkpoint(tmp_path / "tiny.pth", seed=3)
    saved = torch.load(checkpoint, weights_only=True)
    loaded = load_sam(architecture, checkpoint, "cpu").state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)


@pytest.mark.parametrize("multimask", [False, True])
def test_masks_have_the_image_size_and_are_ranked(tiny_engine: SamEngine, multimask: bool) -> None:
    image, _ = scene(130, 90)  # not square, not SAM's size
    candidates = tiny_engine.segment(
        image, prompt([(65.0, 45.0), (5.0, 5.0)], [1, 0], (30.0, 20.0, 100.0, 70.0)), multimask
    )
    assert len(candidates) == (3 if multimask else 1)
    for candidate in candidates:
        assert candidate.mask.shape == (90, 130) and candidate.mask.dtype == np.bool_
        assert np.isfinite(candidate.score)
    scores = [c.score for c in candidates]
    assert scores == sorted(scores, reverse=True)


def test_a_single_point_keeps_the_best_of_three(tiny_engine: SamEngine) -> None:
    image, _ = scene(96, 64)
    single = prompt([(48.0, 32.0)], [1], None)
    [best] = tiny_engine.segment(image, single, multimask=False)
    three = tiny_engine.segment(image, single, multimask=True)
    assert best.score == three[0].score
    assert np.array_equal(best.mask, three[0].mask)


def test_box_only_prompt(tiny_engine: SamEngine) -> None:
    image, _ = scene(80, 60)
    [candidate] = tiny_engine.segment(
        image, prompt([], [], (10.0, 10.0, 70.0, 50.0)), multimask=False
    )
    assert candidate.mask.shape == (60, 80)


def test_bad_checkpoints_are_named_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    architecture = register_tiny_architecture(monkeypatch)
    assert_unreadable_checkpoints_named(
        lambda path: load_sam(architecture, path, "cpu"), tmp_path, ".pth"
    )
    # A tiny checkpoint is not a ViT-B one: the shapes do not fit.
    tiny = save_tiny_sam_checkpoint(tmp_path / "tiny.pth")
    monkeypatch.setitem(SAM_ARCHITECTURES, "vit_b_stand_in", SAM_ARCHITECTURES[architecture])
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="does not fit SAM"):
        load_sam("vit_b_stand_in", tmp_path / "partial.pth", "cpu")
    with pytest.raises(CheckpointError, match="unknown SAM architecture"):
        load_sam("vit_q", tiny, "cpu")


def test_load_engine_builds_sam_from_a_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_tiny_architecture(monkeypatch)
    checkpoint = save_tiny_sam_checkpoint(tmp_path / "tiny.pth")
    engine = load_engine(EngineChoice("sam_tiny_test", checkpoint), "auto")
    assert engine.name == "sam_tiny_test"
    assert len(engine.segment(scene(40, 30)[0], prompt([(20.0, 15.0)], [1], None), False)) == 1


def test_sam_runs_a_job_through_the_pipeline(
    tiny_engine: SamEngine,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    file_id = tenant.upload(png_bytes(130, 90)).json["id"]
    job_id = tenant.post_job({**cognite_sample_body(file_id), "multimaskOutput": True}).json[
        "jobId"
    ]
    with sessions() as session:
        [item_id] = session.scalars(select(JobItem.id).where(JobItem.job_id == job_id))
    outcome = process_item(
        sessions,
        storage,
        tiny_engine,
        item_id,
        lease_seconds=60,
        max_attempts=3,
        limits=TEST_LIMITS,
    ).outcome
    assert outcome == ItemOutcome.COMPLETED
    job = tenant.get_job(job_id).json
    assert job["status"] == "Completed" and job["engine"] == "sam_tiny_test"
    segments = job["items"][0]["segments"]
    assert len(segments) == 3
    with sessions() as session:
        item = session.get(JobItem, item_id)
        assert item is not None and item.result is not None
        keys = [segment["maskKey"] for segment in item.result["segments"]]
    for key in keys:
        mask = Image.open(io.BytesIO(storage.get(key)))
        assert mask.mode == "L" and mask.size == (130, 90)
