"""segq.client against a live segq (HTTP on loopback, Postgres, Redis, moto
S3 and a real GrabCut worker)."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
from celery import Celery
from flask import Flask, request
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.client import SegqClient, SegqError, WaitTimeout
from segq.settings import Settings
from segq.storage import S3Storage
from tests.support.database import count_jobs
from tests.support.images import encode, scene
from tests.support.in_process_workers import grabcut_worker
from tests.support.tcp_proxy import TcpProxy
from tests.support.tenants import Tenant, serving

PROMPT = {
    "points": [{"x": 0.5, "y": 0.5, "label": 1}],
    "boundingBox": {"xMin": 0.2, "yMin": 0.15, "xMax": 0.8, "yMax": 0.85},
}


@pytest.fixture
def segq(live_server: str, tenant: Tenant) -> Iterator[SegqClient]:
    with SegqClient(live_server, tenant.name, tenant.key) as client:
        yield client


@pytest.fixture
def running_worker(
    celery_app: Celery, sessions: sessionmaker[Session], storage: S3Storage
) -> Iterator[None]:
    with grabcut_worker(celery_app, sessions, storage):
        yield


def test_upload_segment_wait_and_read_masks(
    segq: SegqClient, running_worker: None, tmp_path: Path, app: Flask
) -> None:
    prefers: list[str | None] = []

    @app.before_request
    def _record_prefer() -> None:
        prefers.append(request.headers.get("Prefer"))

    pixels, truth = scene(160, 120)
    path = tmp_path / "scene.png"
    path.write_bytes(encode(pixels))
    from_path = segq.upload(path)
    from_bytes = segq.upload(encode(pixels), external_id="cam/1")
    from_pil = segq.upload(Image.fromarray(pixels), name="pil.png")
    assert from_path["name"] == "scene.png" and from_path["sha256"] == from_bytes["sha256"]
    assert from_bytes["externalId"] == "cam/1"
    assert segq.file_by_external_id("cam/1") == from_bytes
    assert segq.file_by_external_id("cam/none") is None
    # PIL images go up as PNG: the same pixels.
    assert (from_pil["mimeType"], from_pil["width"], from_pil["height"]) == ("image/png", 160, 120)

    created = segq.create_job(
        {"items": [{"fileId": f["id"]} for f in (from_path, from_bytes, from_pil)], **PROMPT}
    )
    job = segq.wait(created["jobId"], timeout=60)
    assert job["status"] == "Completed" and job["progress"]["completed"] == 3
    # The wait asked the server to hold its GETs (a server without it answers at once).
    assert any(prefer and prefer.startswith("wait=") for prefer in prefers)

    segment = job["items"][1]["segments"][0]
    mask = segq.mask_array(segment)
    assert mask.dtype == np.bool_ and mask.shape == (120, 160)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.8
    image = segq.mask_image(segment)
    assert image.mode == "L" and image.size == (160, 120)
    stored = Image.open(io.BytesIO(requests.get(segment["mask"]["url"], timeout=10).content))
    assert np.array_equal(np.asarray(stored) == 255, mask)

    page = requests.get(segq.view_url(job), timeout=10)
    assert page.status_code == 200 and "job_view.js" in page.text


def test_idempotency_keys_and_errors(
    segq: SegqClient, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    file_id = segq.upload(encode(scene(80, 60)[0]))["id"]
    body = {"items": [{"fileId": file_id}], **PROMPT}
    first = segq.create_job(body, idempotency_key="batch-1")
    assert segq.create_job(body, idempotency_key="batch-1")["jobId"] == first["jobId"]
    # Without a key each call is its own job (its retries share a random one).
    assert segq.create_job(body)["jobId"] != segq.create_job(body)["jobId"]
    with pytest.raises(SegqError) as conflict:
        segq.create_job({**body, "multimaskOutput": True}, idempotency_key="batch-1")
    assert conflict.value.status == 409

    with pytest.raises(SegqError) as missing:
        segq.get_job(999_999)
    assert missing.value.status == 404 and "not found" in missing.value.message
    with pytest.raises(SegqError) as refused:
        segq.create_job({"items": [{"fileId": file_id}], "points": [{"x": 2, "y": 0.5}]})
    assert refused.value.status == 400 and "points[0]" in refused.value.message
    with pytest.raises(SegqError) as unauthorized:
        SegqClient(segq.base_url, tenant.name, "segq_wrong").get_job(first["jobId"])
    assert unauthorized.value.status == 401
    # Text prompts on a server whose workers run no SAM 3: refused, nothing stored.
    stored = count_jobs(sessions)
    with pytest.raises(SegqError) as no_sam3:
        segq.segment_text([file_id], "person")
    assert no_sam3.value.status == 422 and "SEGQ_MODEL=sam3" in no_sam3.value.message
    assert count_jobs(sessions) == stored


def test_wait_gives_up_after_its_timeout_and_cancel(segq: SegqClient) -> None:
    file_id = segq.upload(encode(scene(80, 60)[0]))["id"]
    job = segq.create_job({"items": [{"fileId": file_id}], **PROMPT})  # no worker runs
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timeout:
        segq.wait(job["jobId"], timeout=1.5)
    assert 1.4 < time.monotonic() - started < 5
    assert timeout.value.job["status"] == "Queued"
    assert segq.cancel_job(job["jobId"])["status"] == "Canceled"
    assert segq.wait(job["jobId"], timeout=5)["status"] == "Canceled"


def test_listing_iterates_every_page(segq: SegqClient) -> None:
    file_id = segq.upload(encode(scene(80, 60)[0]))["id"]
    ids = [segq.create_job({"items": [{"fileId": file_id}], **PROMPT})["jobId"] for _ in range(5)]
    listed = [job["jobId"] for job in segq.jobs(page_size=2)]
    assert listed == sorted(ids, reverse=True)
    assert [job["jobId"] for job in segq.jobs(status="Completed")] == []


def test_429_is_retried_after_its_retry_after(
    settings: Settings, storage: S3Storage, celery_app: Celery, tenant: Tenant
) -> None:
    limited = create_app(
        replace(settings, rate_limit_per_second=2), storage=storage, celery=celery_app
    )
    with serving(limited) as url:
        impatient = SegqClient(url, tenant.name, tenant.key, retries=0)
        with pytest.raises(SegqError) as refused:  # noqa: PT012  (the 3rd call is refused)
            for _ in range(10):
                list(impatient.jobs())
        assert refused.value.status == 429

        patient = SegqClient(url, tenant.name, tenant.key)
        started = time.monotonic()
        for _ in range(8):
            assert list(patient.jobs()) == []
        # Over the limit of 2 a second, so some calls waited out a Retry-After of 1 s.
        assert time.monotonic() - started >= 1.0


def test_a_wait_longer_than_the_read_timeout_ends_as_a_wait_timeout(
    live_server: str, tenant: Tenant
) -> None:
    """The server holds a Prefer: wait answer for up to the wait: the read
    timeout is the client's plus that wait, so a job that stays queued ends
    in WaitTimeout, never in a read timeout of the HTTP library."""
    with SegqClient(live_server, tenant.name, tenant.key, timeout=1.0) as client:
        file_id = client.upload(encode(scene()[0], "PNG"))["id"]
        job = client.create_job(
            {
                "items": [{"fileId": file_id}],
                "points": [{"x": 0.5, "y": 0.5, "label": 1}],
            },
            wait=2,
        )
        assert job["status"] == "Queued"  # no worker runs
        started = time.monotonic()
        with pytest.raises(WaitTimeout):
            client.wait(job["jobId"], timeout=3)
        assert time.monotonic() - started >= 2.5


def test_a_reset_or_refused_connection_is_retried_only_when_safe_to_repeat(
    live_server: str, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    """A server process that stops under a request (the connection is reset
    with the request sent) or a server restarting (connections refused)."""
    host_port = live_server.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    with (
        TcpProxy(host, int(port)) as proxy,
        SegqClient(proxy.url_for(live_server, host_port), tenant.name, tenant.key) as client,
    ):
        file_id = client.upload(encode(scene(80, 60)[0]))["id"]
        proxy.reset_requests(2)
        job = client.create_job({"items": [{"fileId": file_id}], **PROMPT})
        proxy.reset_requests(1)
        assert client.get_job(job["jobId"])["jobId"] == job["jobId"]

        proxy.refuse()
        threading.Timer(0.5, proxy.heal).start()
        assert client.cancel_job(job["jobId"])["status"] == "Canceled"
        assert count_jobs(sessions)[0] == 1

        # An upload carries no key: sent again, it could store a second file.
        proxy.reset_requests(1)
        with pytest.raises(requests.ConnectionError):
            client.upload(encode(scene(80, 60)[0]))


def test_files_are_listed_page_by_page_under_a_filter_with_their_names(
    segq: SegqClient, tmp_path: Path
) -> None:
    path = tmp_path / "from-disk.png"
    path.write_bytes(encode(scene(80, 60, seed=1)[0]))
    uploaded = [
        segq.upload(path),
        segq.upload(encode(scene(80, 60, seed=2)[0]), external_id="cam-2/0001"),
        segq.upload(encode(scene(80, 60, seed=3)[0], "JPEG"), name="named.jpg"),
        segq.upload(Image.fromarray(scene(80, 60, seed=4)[0])),
    ]
    # A file is named by the caller, else by its path, else by its externalId.
    assert [f["name"] for f in uploaded] == ["from-disk.png", "cam-2/0001", "named.jpg", "image"]
    listed = list(segq.files(page_size=3))
    assert sorted(f["id"] for f in listed) == sorted(f["id"] for f in uploaded)
    assert [f["name"] for f in segq.files(filter={"mimeType": "image/jpeg"})] == ["named.jpg"]
    assert list(segq.files(filter={"externalIdPrefix": "cam-2/"})) == [uploaded[1]]


def test_a_job_is_deleted_once_it_can_no_longer_write(
    live_server: str, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    host_port = live_server.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    with (
        TcpProxy(host, int(port)) as proxy,
        SegqClient(proxy.url_for(live_server, host_port), tenant.name, tenant.key) as client,
    ):
        file_id = client.upload(encode(scene(80, 60)[0]))["id"]
        queued = client.create_job({"items": [{"fileId": file_id}], **PROMPT})["jobId"]
        with pytest.raises(SegqError) as running:
            client.delete_job(queued)  # a worker may still take it
        assert running.value.status == 409
        client.cancel_job(queued)
        # A connection reset under the DELETE: sent again, it deletes.
        proxy.reset_requests(1)
        client.delete_job(queued)
        assert count_jobs(sessions)[0] == 0
        with pytest.raises(SegqError) as gone:
            client.get_job(queued)
        assert gone.value.status == 404
        with pytest.raises(SegqError) as again:
            client.delete_job(queued)
        assert again.value.status == 404


def test_events_follow_a_running_job_to_its_end_and_resume_after_an_id(
    segq: SegqClient, running_worker: None
) -> None:
    files = [segq.upload(encode(scene(80, 60, seed=seed)[0]))["id"] for seed in (1, 2)]
    job = segq.create_job({"items": [{"fileId": f} for f in files], **PROMPT})
    # The test server cannot hold a stream open: it sends the events there
    # are and ends, and the iterator reconnects with Last-Event-ID.
    events = list(segq.events(job["jobId"]))
    assert [event.type for event in events] == [
        "job.started",
        "item.completed",
        "item.completed",
        "job.completed",
    ]
    assert [event.id for event in events] == [1, 2, 3, 4] and events[-1].ends_job
    assert events[-1].data["status"] == "Completed" and events[-1].data["jobId"] == job["jobId"]
    assert events[2].data["progress"]["completed"] == 2
    resumed = list(segq.events(job["jobId"], after=2))
    assert resumed == events[2:]
    with pytest.raises(SegqError) as missing:
        next(segq.events(999_999))
    assert missing.value.status == 404
