"""Segment everything: segq's segments against segment_anything's own
SamAutomaticMaskGenerator on the same image (scores within 1e-5, masks
equal pixel for pixel), one embedding shared with prompted jobs on the
same image, and the requests refused before anything is stored or queued."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from celery import Celery
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.models import JobItem
from segq.settings import Settings
from segq.storage import S3Storage
from segq.worker.engines.base import EverythingOptions, Prompt
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.engines.sam import SamEngine
from segq.worker.pipeline import process_item
from tests.support.harness import (
    TEST_LIMITS,
    Tenant,
    assert_job_refused,
    count_jobs,
    make_tenant,
    queued_messages,
)
from tests.support.images import png_bytes, scene
from tests.support.tiny_sam import load_tiny_sam

WIDTH, HEIGHT = 130, 90
#: Loose enough that the random weights keep more than one mask (two, of
#: different areas, for this image and seed).
LOOSE = EverythingOptions(
    points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, max_segments=20
)
LOOSE_BODY = {
    "pointsPerSide": 8,
    "predIouThresh": 0.0,
    "stabilityScoreThresh": 0.0,
    "maxSegments": 20,
}


@pytest.fixture
def tiny_sam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sam:
    return load_tiny_sam(tmp_path, monkeypatch)


def generated(
    sam: Sam, image: npt.NDArray[np.uint8], options: EverythingOptions
) -> list[tuple[npt.NDArray[np.bool_], float]]:
    """segment_anything itself: (mask, predicted IoU), best first, capped."""
    found = SamAutomaticMaskGenerator(
        sam,
        points_per_side=options.points_per_side,
        pred_iou_thresh=options.pred_iou_thresh,
        stability_score_thresh=options.stability_score_thresh,
        min_mask_region_area=options.min_area,
    ).generate(image)
    found.sort(key=lambda mask: -float(mask["predicted_iou"]))
    return [(m["segmentation"], float(m["predicted_iou"])) for m in found][: options.max_segments]


@pytest.mark.model
def test_everything_answers_as_the_automatic_mask_generator_does(tiny_sam: Sam) -> None:
    image, _ = scene(WIDTH, HEIGHT)
    expected = generated(tiny_sam, image, LOOSE)
    assert len(expected) >= 2
    candidates = SamEngine(tiny_sam, "tiny").segment_everything(image, LOOSE)
    assert len(candidates) == len(expected)
    for candidate, (mask, score) in zip(candidates, expected, strict=True):
        assert candidate.score == pytest.approx(score, abs=1e-5)
        assert np.array_equal(candidate.mask, mask)


@pytest.mark.model
def test_max_segments_keeps_the_best(tiny_sam: Sam) -> None:
    image, _ = scene(WIDTH, HEIGHT)
    every = SamEngine(tiny_sam, "tiny").segment_everything(image, LOOSE)
    best = SamEngine(tiny_sam, "tiny").segment_everything(image, replace(LOOSE, max_segments=1))
    assert len(every) > 1
    assert [c.score for c in best] == [max(c.score for c in every)]


@pytest.mark.model
def test_everything_after_a_prompt_on_the_same_image_embeds_it_once(
    tiny_sam: Sam, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, _ = scene(WIDTH, HEIGHT)
    engine = SamEngine(tiny_sam, "tiny")
    embeds: list[int] = []
    tiny_sam.image_encoder.register_forward_hook(lambda *_: embeds.append(1))
    box = Prompt(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.array([10.0, 10, 90, 80]))
    engine.segment(image, box, False)
    engine.segment_everything(image, LOOSE)
    engine.segment(image, box, False)
    assert len(embeds) == 1


def run_item(
    sessions: sessionmaker[Session], storage: S3Storage, engine: Any, job_id: int
) -> JobItem:
    with sessions() as session:
        [item_id] = session.scalars(select(JobItem.id).where(JobItem.job_id == job_id))
    process_item(
        sessions, storage, engine, item_id, lease_seconds=60, max_attempts=3, limits=TEST_LIMITS
    )
    with sessions() as session:
        item = session.get(JobItem, item_id)
        assert item is not None
        return item


@pytest.mark.model
def test_an_everything_job_stores_every_segment_without_a_prompt_index(
    tiny_sam: Sam, tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    png = png_bytes(WIDTH, HEIGHT, seed=2)
    file_id = tenant.upload(png).json["id"]
    created = tenant.post_job(
        {"items": [{"fileId": file_id}], "mode": "everything", "everything": LOOSE_BODY}
    )
    assert created.status_code == 200, created.json
    item = run_item(sessions, storage, SamEngine(tiny_sam, "tiny"), created.json["jobId"])
    assert item.result is not None, item.error_message
    segments = item.result["segments"]
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    expected = generated(tiny_sam, image, LOOSE)
    assert len(segments) == len(expected) >= 2
    for segment, (mask, score) in zip(segments, expected, strict=True):
        assert "promptIndex" not in segment
        assert "/everything/" in segment["maskKey"]
        assert segment["score"] == pytest.approx(score, abs=1e-5)
        stored = np.asarray(Image.open(io.BytesIO(storage.get(segment["maskKey"]))))
        assert np.array_equal(np.equal(stored, 255), mask)
    job = tenant.get_job(created.json["jobId"]).json
    shown = job["items"][0]["segments"]
    assert len(shown) == len(segments)
    assert all("promptIndex" not in segment for segment in shown)
    # The job says how it was asked, with the options it left out filled in.
    assert job["mode"] == "everything"
    assert job["everything"] == {**LOOSE_BODY, "minArea": 0}
    assert job["multimaskOutput"] is False


def test_a_prompted_job_says_so_with_no_everything_options(tenant: Tenant) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT, seed=3)).json["id"]
    created = tenant.post_job(
        {
            "items": [{"fileId": file_id}],
            "points": [{"x": 0.5, "y": 0.5}],
            "multimaskOutput": True,
            "outputs": ["rle", "mask"],
        }
    )
    job = tenant.get_job(created.json["jobId"]).json
    assert job["mode"] == "prompted" and "everything" not in job
    assert job["multimaskOutput"] is True
    assert job["outputs"] == ["rle", "mask"]


def test_grabcut_fails_an_everything_item_saying_why(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    job_id = tenant.post_job({"items": [{"fileId": file_id}], "mode": "everything"}).json["jobId"]
    item = run_item(sessions, storage, GrabCutEngine(), job_id)
    assert item.result is None
    assert item.error_message == "segment everything needs a SAM engine; this server runs grabcut"


BOX = {"xMin": 0.1, "yMin": 0.1, "xMax": 0.9, "yMax": 0.9}
POINT = {"x": 0.5, "y": 0.5, "label": 1}

BAD_EVERYTHING: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "everything with prompts",
        {"mode": "everything", "prompts": [{"boundingBox": BOX}]},
        422,
        "takes no prompt",
    ),
    ("everything with points", {"mode": "everything", "points": [POINT]}, 422, "no prompt"),
    (
        "maxSegments 10000",
        {"mode": "everything", "everything": {"maxSegments": 10_000}},
        400,
        "everything.maxSegments",
    ),
    (
        "options without the mode",
        {"points": [POINT], "everything": {"maxSegments": 5}},
        422,
        '"mode": "everything"',
    ),
    ("unknown mode", {"mode": "all", "points": [POINT]}, 400, "mode"),
    (
        "logits of everything",
        {"mode": "everything", "outputs": ["mask", "logits"]},
        422,
        "prompted segments only",
    ),
]


@pytest.mark.parametrize(
    ("case", "fields", "status", "mentions"), BAD_EVERYTHING, ids=[b[0] for b in BAD_EVERYTHING]
)
def test_bad_everything_requests_are_refused_and_nothing_is_stored_or_queued(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    case: str,
    fields: dict[str, Any],
    status: int,
    mentions: str,
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    assert_job_refused(
        tenant, sessions, {"items": [{"fileId": file_id}], **fields}, status, mentions
    )


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [
        (
            {"mode": "everything"},
            "segment everything needs an engine with segment everything; "
            "this server runs grabcut, which has none",
        ),
        (
            {"points": [POINT], "outputs": ["logits"]},
            "logits needs an engine with logits; this server runs grabcut",
        ),
    ],
    ids=["everything", "logits"],
)
def test_a_server_configured_for_grabcut_refuses_what_needs_sam(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    celery_app: Celery,
    fields: dict[str, Any],
    mentions: str,
) -> None:
    app = create_app(replace(settings, model="grabcut"), storage=storage, celery=celery_app)
    tenant = make_tenant(app.test_client(), sessions, "acme")
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    response = tenant.post_job({"items": [{"fileId": file_id}], **fields})
    assert response.status_code == 422, response.json
    assert mentions in response.json["error"]["message"]
    assert count_jobs(sessions) == (0, 0)
    assert queued_messages() == 0
