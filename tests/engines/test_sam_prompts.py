"""Prompts reach SAM where the client put them. Shapes, counts and score
order stay the same when x and y are swapped or a box is replaced, so these
tests compare with answers known independently: the normalized-to-pixel
conversion by construction, and the engine against segment_anything's own
SamPredictor called directly with the same pixel prompts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from segment_anything.modeling import Sam
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.models import JobItem
from segq.storage import S3Storage
from segq.worker.engines.sam import SamEngine, load_sam
from segq.worker.item_inputs import pixel_prompt
from segq.worker.pipeline import ItemOutcome, process_item
from tests.support.harness import TEST_LIMITS, Tenant
from tests.support.images import png_bytes, scene
from tests.support.tiny_sam import (
    as_prompt,
    register_tiny_architecture,
    save_tiny_sam_checkpoint,
    segment_anything_directly,
)

WIDTH, HEIGHT = 130, 90  # not square, so a swapped x and y cannot land where they belong


@pytest.fixture
def tiny_sam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sam:
    architecture = register_tiny_architecture(monkeypatch)
    return load_sam(architecture, save_tiny_sam_checkpoint(tmp_path / "tiny.pth", seed=5), "cpu")


def three_best_first(
    sam: Sam,
    image: npt.NDArray[np.uint8],
    points: list[tuple[float, float, int]],
    box: tuple[float, float, float, float] | None,
) -> tuple[list[npt.NDArray[np.bool_]], list[float]]:
    """segment_anything itself: three masks and their scores, best first."""
    answers = segment_anything_directly(sam, image, points, box, multimask=True)
    return [mask for mask, _, _ in answers], [score for _, score, _ in answers]


def test_normalized_prompts_land_on_the_pixels_they_name() -> None:
    prompt = pixel_prompt(
        {
            "points": [{"x": 0.25, "y": 0.75, "label": 1}, {"x": 1.0, "y": 0.0, "label": 0}],
            "boundingBox": {"xMin": 0.1, "yMin": 0.2, "xMax": 0.5, "yMax": 0.9},
        },
        width=200,
        height=100,
    )
    assert prompt.points.tolist() == [[50.0, 75.0], [200.0, 0.0]]
    assert prompt.labels.tolist() == [1, 0]
    assert prompt.box is not None
    assert np.allclose(prompt.box, [20.0, 20.0, 100.0, 90.0])


PROMPTS: list[tuple[list[tuple[float, float, int]], tuple[float, float, float, float] | None]] = [
    ([(97.0, 20.0, 1)], None),
    ([(97.0, 20.0, 1), (10.0, 80.0, 0)], None),
    ([], (12.0, 30.0, 70.0, 88.0)),
    ([(40.0, 60.0, 1)], (12.0, 30.0, 70.0, 88.0)),
]


@pytest.mark.model
@pytest.mark.parametrize(("points", "box"), PROMPTS, ids=["point", "points", "box", "both"])
def test_the_engine_answers_as_segment_anything_does(
    tiny_sam: Sam,
    points: list[tuple[float, float, int]],
    box: tuple[float, float, float, float] | None,
) -> None:
    image, _ = scene(WIDTH, HEIGHT)
    masks, scores = three_best_first(tiny_sam, image, points, box)
    candidates = SamEngine(tiny_sam, "tiny").segment(image, as_prompt(points, box), True)
    assert [c.score for c in candidates] == pytest.approx(scores, abs=1e-6)
    for candidate, mask in zip(candidates, masks, strict=True):
        assert np.array_equal(candidate.mask, mask)


@pytest.mark.model
def test_the_model_tells_prompts_apart(tiny_sam: Sam) -> None:
    """What makes the comparison above worth anything: with these random
    weights, moving a prompt (x and y swapped, scaled, a box widened to the
    whole image) changes SAM's answer."""
    image, _ = scene(WIDTH, HEIGHT)
    _, reference = three_best_first(tiny_sam, image, [(97.0, 20.0, 1)], (12.0, 30.0, 70.0, 88.0))
    for points, box in (
        ([(20.0, 97.0, 1)], (30.0, 12.0, 88.0, 70.0)),
        ([(9.7, 2.0, 1)], (1.2, 3.0, 7.0, 8.8)),
        ([(97.0, 20.0, 1)], (0.0, 0.0, 1.0, 1.0)),
        ([(97.0, 20.0, 1)], (0.0, 0.0, float(WIDTH), float(HEIGHT))),
    ):
        _, moved = three_best_first(tiny_sam, image, points, box)
        assert not np.allclose(moved, reference, atol=1e-4), (points, box)


@pytest.mark.model
def test_a_job_s_prompt_reaches_sam_at_the_pixels_it_names(
    tiny_sam: Sam, tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    png = png_bytes(WIDTH, HEIGHT, seed=2)
    file_id = tenant.upload(png).json["id"]
    body = {
        "items": [{"fileId": file_id}],
        "points": [{"x": 0.7, "y": 0.2, "label": 1}, {"x": 0.1, "y": 0.9, "label": 0}],
        "boundingBox": {"xMin": 0.1, "yMin": 0.3, "xMax": 0.6, "yMax": 0.95},
        "multimaskOutput": True,
    }
    job_id = tenant.post_job(body).json["jobId"]
    with sessions() as session:
        [item_id] = session.scalars(select(JobItem.id).where(JobItem.job_id == job_id))
    engine = SamEngine(tiny_sam, "tiny")
    outcome = process_item(
        sessions, storage, engine, item_id, lease_seconds=60, max_attempts=3, limits=TEST_LIMITS
    ).outcome
    assert outcome == ItemOutcome.COMPLETED

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    masks, scores = three_best_first(
        tiny_sam,
        image,
        [(0.7 * WIDTH, 0.2 * HEIGHT, 1), (0.1 * WIDTH, 0.9 * HEIGHT, 0)],
        (0.1 * WIDTH, 0.3 * HEIGHT, 0.6 * WIDTH, 0.95 * HEIGHT),
    )
    with sessions() as session:
        item = session.get(JobItem, item_id)
        assert item is not None and item.result is not None
        stored = item.result["segments"]
    assert [s["score"] for s in stored] == pytest.approx(scores, abs=1e-4)
    for segment, mask in zip(stored, masks, strict=True):
        png_mask = np.asarray(Image.open(io.BytesIO(storage.get(segment["maskKey"]))))
        assert np.array_equal(png_mask == 255, mask)
