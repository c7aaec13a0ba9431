"""Text prompts at the API: what is taken (a phrase alone or with exemplar
boxes, in ``prompts`` or at the top level, with SAM 3's defaults echoed),
and what is refused with a clear 4xx and nothing stored or queued,
including any text prompt where no SAM 3 can run it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from celery import Celery
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.models import Job
from segq.settings import Settings
from segq.storage import S3Storage
from tests.support.images import png_bytes
from tests.support.tenants import Tenant, make_tenant


@pytest.fixture
def sam3_client(
    settings: Settings, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> FlaskClient:
    """An API whose workers run SEGQ_MODEL=sam3 (the setting they share)."""
    app = create_app(replace(settings, model="sam3"), storage=storage, celery=celery_app)
    return app.test_client()


@pytest.fixture
def sam3_tenant(sam3_client: FlaskClient, sessions: sessionmaker[Session]) -> Tenant:
    return make_tenant(sam3_client, sessions, "acme")


def job_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_a_text_prompt_is_taken_and_echoed_with_sam3s_defaults(sam3_tenant: Tenant) -> None:
    file_id = sam3_tenant.upload(png_bytes()).json["id"]
    exemplars = [
        {"xMin": 0.1, "yMin": 0.2, "xMax": 0.3, "yMax": 0.4, "label": 1},
        {"xMin": 0.5, "yMin": 0.5, "xMax": 0.9, "yMax": 0.8, "label": 0},
    ]
    created = sam3_tenant.post_job(
        {
            "items": [{"fileId": file_id}],
            "prompts": [
                {"text": "  person "},
                {"text": "red car", "boxes": exemplars},
                {"points": [{"x": 0.5, "y": 0.5, "label": 1}]},
            ],
        }
    )
    assert created.status_code == 200, created.json
    assert created.json["prompts"][0] == {"text": "person"}  # trimmed
    job = sam3_tenant.get_job(created.json["jobId"]).json
    assert job["prompt"]["prompts"][1] == {"text": "red car", "boxes": exemplars}
    assert job["textOptions"] == {"scoreThreshold": 0.3, "maskThreshold": 0.5, "maxSegments": 256}

    top_level = sam3_tenant.post_job(
        {"items": [{"fileId": file_id}], "text": "cat", "textOptions": {"maxSegments": 5}}
    )
    assert top_level.status_code == 200, top_level.json
    assert top_level.json["text"] == "cat"
    job = sam3_tenant.get_job(top_level.json["jobId"]).json
    assert job["prompt"]["text"] == "cat"
    assert job["textOptions"] == {"scoreThreshold": 0.3, "maskThreshold": 0.5, "maxSegments": 5}

    # A job without text prompts shows no text options.
    plain = sam3_tenant.post_job(
        {"items": [{"fileId": file_id}], "points": [{"x": 0.5, "y": 0.5, "label": 1}]}
    )
    assert "textOptions" not in sam3_tenant.get_job(plain.json["jobId"]).json


BOX = {"xMin": 0.1, "yMin": 0.2, "xMax": 0.3, "yMax": 0.4}
POINT = {"x": 0.5, "y": 0.5, "label": 1}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompts": [{"text": "   "}]}, 400, "prompts[0].text: String should have at least 1"),
        (
            {"prompts": [{"text": "x" * 10_000}]},
            400,
            "prompts[0].text: String should have at most 200",
        ),
        ({"prompts": [{"text": 5}]}, 400, "prompts[0].text: Input should be a valid string"),
        ({"text": ["cat"]}, 400, "text: Input should be a valid string"),
        ({"prompts": [{"text": "cat\x07"}]}, 400, "prompts[0].text: String should match"),
        ({"prompts": [{"boxes": [BOX]}]}, 422, "prompts[0].boxes are exemplars"),
        ({"boxes": [BOX]}, 422, "boxes are exemplars of a text prompt"),
        (
            {"prompts": [{"text": "cat", "points": [POINT]}]},
            422,
            "a text prompt takes exemplar boxes, not points",
        ),
        ({"text": "cat", "boundingBox": BOX}, 422, "a text prompt takes exemplar boxes"),
        ({"text": "cat", "prompts": [{"text": "dog"}]}, 400, "not both"),
        (
            {"text": "cat", "boxes": [{**BOX, "xMax": 0.05}]},
            422,
            "boxes[0] must have xMin < xMax",
        ),
        ({"text": "cat", "boxes": [{**BOX, "label": 2}]}, 400, "boxes[0].label"),
        ({"text": "cat", "textOptions": {"maxSegments": 10_000}}, 400, "maxSegments"),
        ({"text": "cat", "textOptions": {"scoreThreshold": 1.5}}, 400, "scoreThreshold"),
        ({"points": [POINT], "textOptions": {}}, 422, "textOptions are for text prompts"),
        ({"mode": "everything", "text": "cat"}, 422, "segment everything takes no prompt"),
        (
            {"mode": "everything"},
            422,
            "segment everything needs an engine with segment everything; this server runs sam3",
        ),
    ],
)
def test_bad_text_prompts_are_refused_with_nothing_queued(
    sam3_tenant: Tenant,
    sessions: sessionmaker[Session],
    body: dict[str, Any],
    status: int,
    message: str,
) -> None:
    answer = sam3_tenant.post_job({"items": [{"fileId": 1}], **body})
    assert answer.status_code == status, answer.json
    assert message in answer.json["error"]["message"]
    assert job_count(sessions) == 0


@pytest.mark.parametrize("model", [None, "grabcut", "sam_vit_b", "sam2.1_hiera_tiny"])
def test_a_text_prompt_where_no_sam3_runs_is_refused_naming_the_setting(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    celery_app: Celery,
    model: str | None,
) -> None:
    app = create_app(replace(settings, model=model), storage=storage, celery=celery_app)
    tenant = make_tenant(app.test_client(), sessions, "acme")
    file_id = tenant.upload(png_bytes()).json["id"]
    for body in ({"text": "cat"}, {"prompts": [{"points": [POINT]}, {"text": "cat"}]}):
        answer = tenant.post_job({"items": [{"fileId": file_id}], **body})
        assert answer.status_code == 422, answer.json
        assert answer.json["error"]["message"].startswith("text prompts need SEGQ_MODEL=sam3")
        assert (model or "SEGQ_MODEL unset") in answer.json["error"]["message"]
    assert job_count(sessions) == 0
