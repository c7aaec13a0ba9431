"""Text jobs through the pipeline on the tiny SAM 3: the API takes the job
(SEGQ_MODEL=sam3), a worker's pipeline runs it on the engine, and the
stored segments are the engine's instances for the same image, best first,
with every output format; a mixed job answers words and clicks; nothing
found completes with no segments; a worker on another engine fails the
item naming the setting."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.settings import Settings
from segq.storage import S3Storage
from segq.worker.engines.base import Concept, Prompt
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.engines.sam3 import Sam3Engine, load_sam3
from segq.worker.pipeline import ItemOutcome
from tests.support.images import png_bytes, scene
from tests.support.in_process_workers import run_job_item, stored_mask
from tests.support.tenants import Tenant, make_tenant
from tests.support.tiny_sam3 import save_tiny_sam3

WIDTH, HEIGHT = 130, 90


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Sam3Engine:
    snapshot = save_tiny_sam3(tmp_path_factory.mktemp("sam3") / "sam3")
    return Sam3Engine(load_sam3(snapshot, "cpu"), "sam3")


@pytest.fixture
def tenant(
    settings: Settings, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> Tenant:
    app = create_app(replace(settings, model="sam3"), storage=storage, celery=celery_app)
    return make_tenant(app.test_client(), sessions, "acme")


def cat(max_segments: int = 256, score_threshold: float = 0.3) -> Concept:
    return Concept(
        "cat",
        np.zeros((0, 4)),
        np.zeros(0, dtype=np.int64),
        score_threshold=score_threshold,
        mask_threshold=0.5,
        max_segments=max_segments,
    )


def test_a_text_job_stores_every_instance_best_first(
    engine: Sam3Engine,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    created = tenant.post_job(
        {
            "items": [{"fileId": file_id}],
            "text": "cat",
            "textOptions": {"maxSegments": 4},
            "outputs": ["mask", "polygons", "rle", "svgPath", "logits"],
        }
    )
    assert created.status_code == 200, created.json
    outcome, item = run_job_item(sessions, storage, engine, created.json["jobId"])
    assert outcome == ItemOutcome.COMPLETED, item.error_message
    assert item.result is not None
    [expected] = engine.segment_concepts(scene(WIDTH, HEIGHT)[0], [cat(max_segments=4)])
    segments = item.result["segments"]
    assert len(segments) == len(expected) == 4
    for segment, candidate in zip(segments, expected, strict=True):
        assert segment["promptIndex"] == 0
        assert segment["score"] == pytest.approx(candidate.score, abs=1e-6)
        assert np.array_equal(stored_mask(storage, segment["maskKey"]), candidate.mask)
        assert candidate.box is not None
        box = segment["boundingBox"]
        assert box["xMin"] == pytest.approx(max(candidate.box[0], 0) / WIDTH)
        assert box["yMax"] == pytest.approx(min(candidate.box[3], HEIGHT) / HEIGHT)
        assert {"polygons", "rle", "svgPath", "logitsKey"} <= set(segment)
    job = tenant.get_job(created.json["jobId"]).json
    assert job["status"] == "Completed" and job["engine"] == "sam3"
    [answer] = job["items"]
    scores = [segment["score"] for segment in answer["segments"]]
    assert scores == sorted(scores, reverse=True)
    assert all(segment["mask"]["url"] for segment in answer["segments"])


def test_a_mixed_job_answers_words_and_clicks(
    engine: Sam3Engine,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    created = tenant.post_job(
        {
            "items": [{"fileId": file_id}],
            "prompts": [{"points": [{"x": 0.5, "y": 0.5, "label": 1}]}, {"text": "cat"}],
            "outputs": ["mask"],
        }
    )
    outcome, item = run_job_item(sessions, storage, engine, created.json["jobId"])
    assert outcome == ItemOutcome.COMPLETED, item.error_message
    assert item.result is not None
    image = scene(WIDTH, HEIGHT)[0]
    [clicked] = engine.segment(
        image, Prompt(np.array([[0.5 * WIDTH, 0.5 * HEIGHT]]), np.array([1]), None), False
    )
    [found] = engine.segment_concepts(image, [cat()])
    segments = item.result["segments"]
    assert [s["promptIndex"] for s in segments] == [0] + [1] * len(found)
    assert np.array_equal(stored_mask(storage, segments[0]["maskKey"]), clicked.mask)
    for segment, candidate in zip(segments[1:], found, strict=True):
        assert np.array_equal(stored_mask(storage, segment["maskKey"]), candidate.mask)


def test_nothing_found_completes_with_no_segments(
    engine: Sam3Engine,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    created = tenant.post_job(
        {"items": [{"fileId": file_id}], "text": "cat", "textOptions": {"scoreThreshold": 1.0}}
    )
    outcome, item = run_job_item(sessions, storage, engine, created.json["jobId"])
    assert outcome == ItemOutcome.COMPLETED and item.result is not None
    assert item.result["segments"] == []
    job = tenant.get_job(created.json["jobId"]).json
    assert job["status"] == "Completed" and job["items"][0]["segments"] == []


def test_a_worker_on_another_engine_fails_a_text_item_naming_the_setting(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    created = tenant.post_job({"items": [{"fileId": file_id}], "text": "cat"})
    outcome, item = run_job_item(sessions, storage, GrabCutEngine(), created.json["jobId"])
    assert outcome == ItemOutcome.FAILED
    assert item.error_message == "text prompts need SEGQ_MODEL=sam3; this server runs grabcut"
