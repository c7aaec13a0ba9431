"""The whole line: HTTP API → Postgres → Redis → a real Celery worker →
engine → S3 (moto over HTTP) → GET with a pre-signed URL that really serves
the mask."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
from celery import Celery
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from segq.storage import S3Storage
from segq.worker.masks import Ring, rasterize_rings
from tests.support.images import cognite_sample_body, jpeg_bytes, scene, scene_prompt_body
from tests.support.in_process_workers import grabcut_worker
from tests.support.tenants import Tenant


@pytest.fixture
def running_worker(
    celery_app: Celery, sessions: sessionmaker[Session], storage: S3Storage
) -> Iterator[None]:
    with grabcut_worker(celery_app, sessions, storage):
        yield


def wait_finished(tenant: Tenant, job_id: int, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = tenant.get_job(job_id)
        if response.json["status"] in ("Completed", "Failed", "Canceled"):
            return response
        assert response.headers["Retry-After"]
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {response.json}")


def test_upload_submit_poll_fetch(
    tenant: Tenant, running_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploaded = tenant.upload(jpeg_bytes(200, 150), "scene.jpg", externalId="cam-3/0001").json
    created = tenant.post_job(scene_prompt_body(uploaded["id"]))
    assert created.status_code == 200
    finished = wait_finished(tenant, created.json["jobId"])
    job = finished.json
    assert job["status"] == "Completed", job
    assert job["engine"] == "grabcut"
    assert job["startTime"] >= job["createdTime"] and job["statusTime"] >= job["startTime"]
    assert "Retry-After" not in finished.headers
    [item] = job["items"]
    assert item["fileExternalId"] == "cam-3/0001"
    [segment] = item["segments"]

    link = segment["mask"]
    assert link["format"] == "image/png" and (link["width"], link["height"]) == (200, 150)
    now_ms = time.time() * 1000
    # Signed once per signing window (300 s), stating the window's start
    # plus the lifetime: never later than the signature's own expiry.
    assert now_ms + 3300_000 < link["expiresTime"] <= now_ms + 3600_000
    png = requests.get(link["url"], timeout=10)
    assert png.status_code == 200
    mask = np.asarray(Image.open(io.BytesIO(png.content)))
    assert mask.shape == (150, 200)
    selected = mask == 255
    truth = scene(200, 150)[1]
    assert (selected & truth).sum() / (selected | truth).sum() > 0.8

    # The polygons describe the same pixels as the mask.
    rings = [
        Ring(tuple((v["x"], v["y"]) for v in polygon["vertices"]), polygon["isHole"])
        for polygon in segment["polygons"]
    ]
    assert all(
        0 <= v["x"] <= 1 and 0 <= v["y"] <= 1 for p in segment["polygons"] for v in p["vertices"]
    )
    assert np.array_equal(rasterize_rings(rings, 150, 200), selected)

    # URLs are never stored: the same within a signing window, signed
    # afresh in the next one.
    same = tenant.get_job(created.json["jobId"]).json["items"][0]["segments"][0]["mask"]
    assert same == link
    later = time.time_ns() // 1_000_000 + 300_000
    monkeypatch.setattr("segq.api.signed_links.now_ms", lambda: later)
    time.sleep(1.1)
    again = tenant.get_job(created.json["jobId"]).json["items"][0]["segments"][0]["mask"]
    assert again["url"] != link["url"]
    assert again["expiresTime"] > link["expiresTime"]


def test_cognite_sample_body_runs_to_completion(tenant: Tenant, running_worker: None) -> None:
    file_id = tenant.upload(jpeg_bytes(640, 480)).json["id"]
    created = tenant.post_job(cognite_sample_body(file_id))
    job = wait_finished(tenant, created.json["jobId"]).json
    assert job["status"] == "Completed", job
    [segment] = job["items"][0]["segments"]
    png = requests.get(segment["mask"]["url"], timeout=10)
    mask = np.asarray(Image.open(io.BytesIO(png.content))) == 255
    assert mask.shape == (480, 640) and mask.any()
    rings = [
        Ring(tuple((v["x"], v["y"]) for v in polygon["vertices"]), polygon["isHole"])
        for polygon in segment["polygons"]
    ]
    assert np.array_equal(rasterize_rings(rings, 480, 640), mask)
    assert segment["area"] == pytest.approx(mask.mean())


def test_many_items_spread_as_separate_messages(tenant: Tenant, running_worker: None) -> None:
    ids = [tenant.upload(jpeg_bytes(120, 90, seed=seed)).json["id"] for seed in range(4)]
    created = tenant.post_job(
        {
            "items": [{"fileId": i} for i in ids],
            "boundingBox": {"xMin": 0.2, "yMin": 0.15, "xMax": 0.8, "yMax": 0.85},
        }
    )
    job = wait_finished(tenant, created.json["jobId"]).json
    assert job["status"] == "Completed"
    assert job["progress"] == {"total": 4, "completed": 4, "failed": 0}
    assert [item["fileId"] for item in job["items"]] == ids
    assert all(len(item["segments"]) == 1 for item in job["items"])
