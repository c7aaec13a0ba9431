"""What the peers' synchronous routes decide before and around a job, with
the app in this process (no worker: jobs stay queued): the places of the
process's waiting requests, what makes two calls the same call, and the
window within which a repeated call gets the first call's job.
tests/system/test_peer_waiting_live.py has `segq serve` and the SDKs."""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import replace
from typing import Any

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.api.job_waiting import WaitingRequests
from segq.api.peers.synchronous_jobs import call_sha256
from segq.api.schemas import SegmentRequest
from segq.models import Job, JobStatus
from segq.settings import Settings, SettingsError
from segq.storage import S3Storage
from tests.support.harness import count_jobs, make_tenant
from tests.support.images import png_bytes

PNG = png_bytes(64, 48)
BOX = [8, 6, 56, 42]
RETRY_WINDOW_SECONDS = 300


@pytest.fixture
def peer_app(
    settings: Settings, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> Flask:
    """Calls wait a second for their job (none finishes: no worker)."""
    tuned = replace(
        settings,
        model="grabcut",
        peer_wait_seconds=1,
        peer_retry_window_seconds=RETRY_WINDOW_SECONDS,
    )
    return create_app(tuned, storage=storage, celery=celery_app)


def livepeer_call(client: FlaskClient, key: str, box: list[int] = BOX, **fields: str) -> Any:
    return client.post(
        "/segment-anything-2",
        data={"image": (io.BytesIO(PNG), "scene.png"), "box": json.dumps(box), **fields},
        headers={"Authorization": f"Bearer {key}"},
        content_type="multipart/form-data",
    )


def test_waiting_places_are_bounded_and_let_go_of_once() -> None:
    waiting = WaitingRequests(limit=3, blocking_limit=1)
    parked = waiting.reserve(parkable=True)
    blocking = waiting.reserve(parkable=False)
    assert parked is not None and blocking is not None
    # Only one may hold a thread.
    assert waiting.reserve(parkable=False) is None
    third = waiting.reserve(parkable=True)
    assert third is not None
    assert waiting.reserve(parkable=True) is None
    assert waiting.waiting == 3
    blocking.release()
    blocking.release()  # harmless: counted once
    assert waiting.waiting == 2
    assert waiting.reserve(parkable=False) is not None
    parked.release()
    third.release()
    assert waiting.waiting == 1


def test_the_same_call_is_the_same_image_prompt_and_mask_input() -> None:
    def request(image_url: str, x_max: float = 0.8) -> SegmentRequest:
        return SegmentRequest.model_validate(
            {
                "items": [{"imageData": image_url}],
                "boundingBox": {"xMin": 0.2, "yMin": 0.1, "xMax": x_max, "yMax": 0.9},
                "outputs": ["mask"],
            }
        )

    data = base64.b64encode(PNG).decode()
    typed, untyped = f"data:image/png;base64,{data}", f"data:;base64,{data}"
    assert call_sha256(request(typed), None) == call_sha256(request(untyped), None)
    other_image = "data:;base64," + base64.b64encode(png_bytes(64, 48, seed=1)).decode()
    assert call_sha256(request(other_image), None) != call_sha256(request(typed), None)
    assert call_sha256(request(typed, 0.7), None) != call_sha256(request(typed), None)
    assert call_sha256(request(typed), b"logits") != call_sha256(request(typed), None)
    assert call_sha256(request(typed), b"logits") != call_sha256(request(typed), b"other")


def test_a_repeated_call_gets_the_first_calls_job_within_the_window(
    peer_app: Flask, sessions: sessionmaker[Session]
) -> None:
    client = peer_app.test_client()
    key = make_tenant(client, sessions, "acme").key
    first = livepeer_call(client, key)
    assert first.status_code == 504, first.json
    assert "the same call again" in first.json["detail"]["msg"]
    # How the answer is rendered is not part of the call.
    again = livepeer_call(client, key, return_logits="false", model_id="facebook/sam2-hiera-large")
    assert again.status_code == 504
    assert count_jobs(sessions) == (1, 1)
    assert livepeer_call(client, key, box=[9, 6, 56, 42]).status_code == 504
    assert count_jobs(sessions) == (2, 2)
    # Past the window, the same call makes a new job; the old one stays.
    window_ms = RETRY_WINDOW_SECONDS * 1000
    with sessions.begin() as session:
        session.execute(update(Job).values(created_time=Job.created_time - window_ms - 1))
    assert livepeer_call(client, key).status_code == 504
    assert count_jobs(sessions) == (3, 3)
    # A first job that failed is not attached to either.
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.idempotency_key.is_not(None)).values(status=JobStatus.FAILED)
        )
    assert livepeer_call(client, key).status_code == 504
    assert count_jobs(sessions) == (4, 4)
    assert livepeer_call(client, key).status_code == 504
    assert count_jobs(sessions) == (4, 4)


def test_another_projects_same_call_is_its_own(
    peer_app: Flask, sessions: sessionmaker[Session]
) -> None:
    client = peer_app.test_client()
    acme, globex = (make_tenant(client, sessions, name).key for name in ("acme", "globex"))
    assert livepeer_call(client, acme).status_code == 504
    assert livepeer_call(client, globex).status_code == 504
    assert count_jobs(sessions) == (2, 2)


def test_a_call_with_no_waiting_place_is_refused_before_its_job(
    peer_app: Flask, sessions: sessionmaker[Session]
) -> None:
    client = peer_app.test_client()
    key = make_tenant(client, sessions, "acme").key
    waiting = peer_app.extensions["segq"].waiting_requests
    held = [waiting.reserve(parkable=False) for _ in range(waiting.blocking_limit)]
    try:
        started = time.monotonic()
        refused = livepeer_call(client, key)
        assert time.monotonic() - started < 1
        assert refused.status_code == 503
        assert "no job was made" in refused.json["detail"]["msg"]
        assert refused.headers["Retry-After"] == "1"
        assert count_jobs(sessions) == (0, 0)
    finally:
        for place in held:
            assert place is not None
            place.release()
    assert livepeer_call(client, key).status_code == 504
    assert count_jobs(sessions) == (1, 1)
    assert waiting.waiting == 0


def test_waiting_settings_are_read_and_checked(settings: Settings) -> None:
    data = {"SEGQ_DATA_DIR": str(settings.data_dir)}
    assert Settings.from_env(data).max_waiting_requests == 500
    assert Settings.from_env(data).peer_retry_window_seconds == 300
    read = Settings.from_env(
        {**data, "SEGQ_MAX_WAITING_REQUESTS": "7", "SEGQ_PEER_RETRY_WINDOW_SECONDS": "9"}
    )
    assert (read.max_waiting_requests, read.peer_retry_window_seconds) == (7, 9)
    for name in ("SEGQ_MAX_WAITING_REQUESTS", "SEGQ_PEER_RETRY_WINDOW_SECONDS"):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({**data, name: "0"})
