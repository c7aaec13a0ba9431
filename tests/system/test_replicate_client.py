"""Replicate's own Python client (``replicate`` 1.0.7), unmodified, against
segq's predictions API served on a loopback port, with a real Celery worker
(GrabCut) on Postgres, Redis and moto S3; and once on the embedded default."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import replicate.webhook
from celery import Celery
from celery.contrib.testing.worker import start_worker
from PIL import Image
from replicate.client import Client
from replicate.exceptions import ModelError, ReplicateError
from replicate.prediction import Prediction
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook
from werkzeug.serving import make_server

from segq.api.app import create_app
from segq.api.peers import replicate as replicate_routes
from segq.db import make_engine, make_session_factory
from segq.models import Job, JobStatus
from segq.projects import create_project
from segq.schema_migrations import upgrade_to_head
from segq.settings import Settings
from segq.storage import S3Storage
from segq.worker.celery_app import create_worker_app
from tests.support.database import count_jobs
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.in_process_workers import grabcut_worker
from tests.support.live_processes import REPO, Worker
from tests.support.services import TEST_BUCKET, free_port, queued_messages
from tests.support.tenants import Tenant
from tests.worker.test_webhooks import LOOPBACK, Receiver, all_settled, drain, receiver, rules

__all__ = ["receiver"]  # the fixture, shared with the native webhook tests

#: The scene's object (tests/support/images.py) in pixels of a 160x120 image: a point
#: on it and a box around it, the same as scene_prompt_body's normalized one.
POINT = [80, 60]
BOX = [32, 18, 128, 102]
#: A box in 0..1 of the image, for images given by URL.
UNIT_BOX = {"box": [0.2, 0.15, 0.8, 0.85], "normalize_coords": True}
WAIT_LIMIT_SECONDS = 60


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def base_url(
    settings: Settings, storage: S3Storage, celery_app: Celery, sessions: sessionmaker[Session]
) -> Iterator[str]:
    """segq on a loopback port, public at that address (as `segq serve` sets
    it); webhooks may reach loopback receivers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_app(
        replace(settings, public_url=url, webhook_allowed_networks=LOOPBACK),
        storage=storage,
        celery=celery_app,
    )
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def running_worker(
    celery_app: Celery, sessions: sessionmaker[Session], storage: S3Storage
) -> Iterator[None]:
    with grabcut_worker(celery_app, sessions, storage):
        yield


@pytest.fixture
def rc(base_url: str, tenant: Tenant, monkeypatch: pytest.MonkeyPatch) -> Client:
    """Replicate's client as its users make it, pointed at segq."""
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.1")
    return Client(api_token=tenant.key, base_url=base_url)


def waited(prediction: Prediction) -> Prediction:
    """``prediction.wait()``, which has no deadline of its own, with one."""
    done = threading.Thread(target=prediction.wait, daemon=True)
    done.start()
    done.join(WAIT_LIMIT_SECONDS)
    assert not done.is_alive(), f"prediction {prediction.id} still {prediction.status}"
    return prediction


def mask_pixels(url: str) -> npt.NDArray[np.uint8]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, url
    return np.asarray(Image.open(io.BytesIO(response.content)))


def native_masks(tenant: Tenant, image: bytes, body_extra: dict[str, Any]) -> list[Any]:
    """The masks segq's own route gives for the same image and prompt."""
    file_id = tenant.upload(image).json["id"]
    job_id = tenant.post_job({**scene_prompt_body(file_id), **body_extra}).json["jobId"]
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while (job := tenant.get_job(job_id).json)["status"] not in ("Completed", "Failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "Completed", job
    return [mask_pixels(s["mask"]["url"]) for s in job["items"][0]["segments"]]


def test_create_and_poll_with_points_and_a_box(
    rc: Client, tenant: Tenant, running_worker: None
) -> None:
    image = png_bytes(160, 120)
    prediction = rc.predictions.create(
        version="any-version",
        input={"image": data_uri(image), "point_coords": [POINT], "box": BOX},
    )
    assert prediction.status == "starting"
    assert prediction.model == "segq/sam" and prediction.version == "any-version"
    assert prediction.urls is not None
    assert prediction.urls["get"].endswith(f"/v1/predictions/{prediction.id}")
    prediction = waited(prediction)
    assert str(prediction.status) == "succeeded", prediction.error
    assert prediction.error is None
    assert prediction.metrics is not None and prediction.metrics["predict_time"] >= 0
    assert prediction.started_at is not None and prediction.completed_at is not None
    assert prediction.logs is not None and "engine: grabcut" in prediction.logs
    assert prediction.input is not None and prediction.input["point_coords"] == [POINT]
    output = prediction.output
    assert isinstance(output, dict)
    [mask_url] = output["masks"]
    [score] = output["scores"]
    assert isinstance(score, float)
    mask = mask_pixels(mask_url)
    assert mask.shape == (120, 160)
    # The same masks as segq's own route, for the same image and prompt.
    [native] = native_masks(tenant, image, {})
    assert np.array_equal(mask, native)
    assert 0.05 < (mask == 255).mean() < 0.5

    again = rc.predictions.get(prediction.id)
    assert again.status == "succeeded" and again.output["scores"] == [score]
    # A prediction is a segq job: it is in the native listing too.
    listed = tenant.client.get(tenant.url("/context/vision/segment"), headers=tenant.headers).json
    assert int(prediction.id) in [job["jobId"] for job in listed["items"]]
    assert tenant.get_job(int(prediction.id)).json["status"] == "Completed"


def test_run_returns_masks_the_client_can_read(
    rc: Client, tenant: Tenant, running_worker: None
) -> None:
    image = png_bytes(160, 120, seed=3)
    output = rc.run(
        "segq/sam",
        input={
            "image": data_uri(image),
            "point_coords": [[0.5, 0.5], [0.05, 0.05]],
            "point_labels": [1, 0],
            "normalize_coords": True,
            "multimask_output": True,
        },
    )
    assert isinstance(output, dict)
    masks, scores = output["masks"], output["scores"]
    assert 1 <= len(masks) <= 3 and len(scores) == len(masks)
    assert scores == sorted(scores, reverse=True)
    # Pre-signed URLs on loopback moto: plain http, so the client leaves them str.
    pixels = [mask_pixels(url) for url in masks]
    assert all(p.shape == (120, 160) for p in pixels)
    native = native_masks(
        tenant,
        image,
        {
            "points": [{"x": 0.5, "y": 0.5, "label": 1}, {"x": 0.05, "y": 0.05, "label": 0}],
            "boundingBox": None,
            "multimaskOutput": True,
        },
    )
    assert len(native) == len(pixels)
    assert all(np.array_equal(a, b) for a, b in zip(pixels, native, strict=True))

    # "owner/name:version" goes through POST /v1/predictions and the version's schema.
    versioned = rc.run("segq/sam:v2", input={"image": data_uri(image), "box": BOX})
    assert isinstance(versioned, dict) and len(versioned["masks"]) == 1
    # The output is what the model's version says it is.
    declared = rc.models.get("segq/sam").latest_version
    assert declared is not None
    output_schema = declared.openapi_schema["components"]["schemas"]["Output"]
    assert set(output) == set(output_schema["properties"])
    assert set(output_schema.get("required", ())) <= set(output)


def mark_running_when_created(sessions: sessionmaker[Session]) -> threading.Thread:
    """A stand-in for a worker that claims the next job and is still at work
    on it: marks the first job that appears Running, within 5 s."""

    def mark() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with sessions.begin() as session:
                marked = session.scalars(
                    update(Job)
                    .where(Job.status == JobStatus.QUEUED)
                    .values(status=JobStatus.RUNNING)
                    .returning(Job.id)
                ).all()
            if marked:
                return
            time.sleep(0.02)

    thread = threading.Thread(target=mark, daemon=True)
    thread.start()
    return thread


def test_file_inputs_are_uploaded_to_v1_files(
    rc: Client,
    base_url: str,
    tenant: Tenant,
    other_tenant: Tenant,
    running_worker: None,
    tmp_path: Path,
) -> None:
    """A file object as an input: the client uploads it to /v1/files and
    passes the file's URL; its size is known, so pixel coordinates work."""
    image = png_bytes(160, 120, seed=5)
    path = tmp_path / "photo.png"
    path.write_bytes(image)
    with path.open("rb") as photo:
        output = rc.run("segq/sam", input={"image": photo, "point_coords": [POINT], "box": BOX})
    assert isinstance(output, dict)
    [native] = native_masks(tenant, image, {})
    assert np.array_equal(mask_pixels(output["masks"][0]), native)

    uploaded = rc.files.create(path, metadata={"site": "north"})
    assert (uploaded.name, uploaded.content_type, uploaded.size) == (
        "photo.png",
        "image/png",
        len(image),
    )
    assert uploaded.metadata == {"site": "north"}
    assert rc.files.get(uploaded.id).checksums == uploaded.checksums
    # A file of the project, as a native upload makes it.
    native_file = tenant.client.get(tenant.url(f"/files/{uploaded.id}"), headers=tenant.headers)
    assert native_file.json["width"] == 160 and native_file.json["metadata"] == {"site": "north"}

    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ReplicateError) as refused:
        rc.files.create(tmp_path / "notes.txt")
    assert refused.value.status == 422  # Replicate has no 415 (api/refusals.py)
    with pytest.raises(ReplicateError) as refused:
        rc.files.create(path, metadata={"site": 3})
    assert refused.value.status == 422
    # Another project's file is not found, as an input or read.
    other = Client(api_token=other_tenant.key, base_url=base_url)
    with pytest.raises(ReplicateError) as refused:
        other.predictions.create(version="v", input={"image": uploaded.urls["get"], "box": BOX})
    assert refused.value.status == 422 and "not found" in (refused.value.detail or "")
    with pytest.raises(ReplicateError) as refused:
        other.files.get(uploaded.id)
    assert refused.value.status == 404


def test_prefer_wait_answers_finished_or_starting(
    rc: Client,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    image = data_uri(png_bytes(160, 120))
    # A prediction still running when the wait runs out is answered as
    # "starting", so that run() goes on polling rather than take it as final.
    marker = mark_running_when_created(sessions)
    started = time.monotonic()
    running = rc.models.predictions.create(
        model="segq/sam", input={"image": image, "box": BOX}, wait=2
    )
    # Within the 2 s asked for (the client gives up half a second later).
    assert 1.0 < time.monotonic() - started < 2.5
    marker.join()
    assert running.status == "starting" and running.output is None
    assert rc.predictions.get(running.id).status == "processing"
    rc.predictions.cancel(running.id)

    pending = rc.models.predictions.create(
        model="segq/sam", input={"image": image, "box": BOX}, wait=1
    )
    assert pending.status == "starting"
    with grabcut_worker(celery_app, sessions, storage):
        done = rc.predictions.create(version="v", input={"image": image, "box": BOX}, wait=30)
        assert done.status == "succeeded"
        assert len(done.output["masks"]) == 1
        # The earlier prediction ran meanwhile.
        assert waited(rc.predictions.get(pending.id)).status == "succeeded"


def test_the_model_its_versions_and_the_key_s_account(rc: Client, tenant: Tenant) -> None:
    model = rc.models.get("segq/sam")
    assert (model.id, model.owner, model.name, model.run_count) == ("segq/sam", "segq", "sam", 0)
    [version] = model.versions.list().results
    assert model.latest_version is not None and model.latest_version.id == version.id
    assert model.versions.get(version.id).openapi_schema == version.openapi_schema
    assert [listed.id for listed in rc.models.list().results] == ["segq/sam", "segq/sam3"]
    assert rc.models.get("segq", "sam").latest_version == model.latest_version

    # The schema's Input is what a prediction takes: every input it names is
    # accepted, one it does not name is refused, and what it requires is.
    schema = version.openapi_schema["components"]["schemas"]["Input"]
    every_input = {
        "image": data_uri(png_bytes(160, 120)),
        "point_coords": [[0.5, 0.5]],
        "point_labels": [1],
        "box": [0.2, 0.15, 0.8, 0.85],
        "multimask_output": True,
        "normalize_coords": True,
    }
    assert set(every_input) == set(schema["properties"])
    assert schema["required"] == ["image"]
    created = rc.predictions.create(version=version.id, input=every_input)
    assert (created.status, created.version) == ("starting", version.id)
    # A prediction of the model (no version) runs this version.
    by_model = rc.models.predictions.create(model="segq/sam", input=every_input)
    assert by_model.version == version.id
    assert rc.models.get("segq/sam").run_count == 2
    for refused_input, field in [
        ({**every_input, "threshold": 0.5}, "input.threshold: segq/sam has no such input"),
        ({key: value for key, value in every_input.items() if key != "image"}, "input.image"),
    ]:
        with pytest.raises(ReplicateError) as refused:
            rc.predictions.create(version=version.id, input=refused_input)
        assert refused.value.status == 422 and field in (refused.value.detail or "")

    with pytest.raises(ReplicateError) as unknown:
        rc.models.get("meta/sam-2")
    assert unknown.value.status == 404 and "this server runs segq/sam" in (
        unknown.value.detail or ""
    )
    account = rc.accounts.current()
    assert (account.type, account.username, account.name) == (
        "organization",
        tenant.name,
        tenant.name,
    )


def test_cancel(rc: Client, tenant: Tenant) -> None:
    prediction = rc.predictions.create(
        version="v", input={"image": data_uri(png_bytes()), "box": BOX}
    )
    prediction.cancel()
    canceled = rc.predictions.get(prediction.id)
    assert canceled.status == "canceled" and canceled.output is None
    assert canceled.completed_at is not None
    assert tenant.get_job(int(prediction.id)).json["status"] == "Canceled"
    # Canceling what has finished answers it as it is, as Replicate does.
    assert rc.predictions.cancel(prediction.id).status == "canceled"


def test_listing_pages_newest_first(
    rc: Client, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replicate_routes, "PAGE_SIZE", 2)
    image = data_uri(png_bytes())
    ids = [
        rc.predictions.create(version="v", input={"image": image, "box": BOX}).id for _ in range(5)
    ]
    # A native job is not a prediction: not in this listing.
    file_id = tenant.upload(png_bytes()).json["id"]
    assert tenant.post_job(scene_prompt_body(file_id)).status_code == 200
    first = rc.predictions.list()
    assert [p.id for p in first.results] == ids[::-1][:2]
    assert first.next is not None and first.previous is None
    pages = list(replicate.pagination.paginate(rc.predictions.list))
    assert [len(page.results) for page in pages] == [2, 2, 1]
    assert [p.id for page in pages for p in page.results] == ids[::-1]
    assert all(p.status == "starting" for page in pages for p in page.results)


def test_webhook_delivers_the_prediction_signed(
    rc: Client, sessions: sessionmaker[Session], receiver: Receiver, running_worker: None
) -> None:
    prediction = rc.predictions.create(
        version="v",
        input={"image": data_uri(png_bytes()), "box": BOX},
        webhook=f"{receiver.url}/replicate",
        webhook_events_filter=["start", "completed"],
    )
    waited(prediction)
    drain(sessions, rules(), all_settled(sessions))
    secret = rc.webhooks.default.secret()
    assert secret.key.startswith("whsec_")
    assert len(receiver.received) == 2
    bodies = [Webhook(secret.key).verify(r.body, r.headers) for r in receiver.received]
    assert {body["id"] for body in bodies} == {prediction.id}
    assert sorted(body["status"] for body in bodies) == ["processing", "succeeded"]
    finished = next(body for body in bodies if body["status"] == "succeeded")
    # Mask URLs expire, so webhooks carry the scores and the link to GET them by.
    assert finished["output"]["scores"] == prediction.output["scores"]
    assert "masks" not in finished["output"]
    assert finished["urls"]["get"] == prediction.urls["get"]
    # Replicate's own validator accepts the same signature (it raises if not).
    last = receiver.received[-1]
    replicate.webhook.Webhooks.validate(
        headers=last.headers, body=last.body.decode(), secret=secret
    )
    # A body changed on the way is refused.
    with pytest.raises(Exception, match="signature"):
        Webhook(secret.key).verify(last.body.replace(b"succeeded", b"failed"), last.headers)


def assert_refused(call: Any, status: int, mentions: str, sessions: Any) -> None:
    with pytest.raises(ReplicateError) as refused:
        call()
    assert refused.value.status == status, refused.value
    assert mentions in (refused.value.detail or ""), refused.value.detail
    assert refused.value.title
    assert count_jobs(sessions) == (0, 0)
    assert queued_messages() == 0


def test_each_error_is_the_clients_replicate_error(
    rc: Client, base_url: str, sessions: sessionmaker[Session]
) -> None:
    image = data_uri(png_bytes())
    bad_key = Client(api_token="segq_not-a-key", base_url=base_url)
    assert_refused(lambda: bad_key.predictions.list(), 401, "invalid API token", sessions)
    assert_refused(
        lambda: Client(api_token="", base_url=base_url).predictions.create(
            version="v", input={"image": image, "box": BOX}
        ),
        401,
        "missing API token",
        sessions,
    )

    def create(model_input: dict[str, Any], **params: Any) -> Any:
        return lambda: rc.predictions.create(version="v", input=model_input, **params)

    cases: list[tuple[dict[str, Any], str]] = [
        ({"image": image, "point_coords": "80,60"}, "input.point_coords"),
        ({"image": image, "point_coords": [[80]]}, "input.point_coords[0]"),
        ({"image": image, "box": BOX, "colour": "red"}, "input.colour"),
        ({"image": image}, "give point_coords or box"),
        ({"image": image, "box": [32, 18, 500, 102]}, "outside the 160x120 image"),
        ({"image": image, "box": [128, 18, 32, 102]}, "x1 < x2"),
        ({"image": image, "point_coords": [POINT], "point_labels": [1, 0]}, "one label per point"),
        ({"image": image, "box": [0.1, 0.1, 2, 0.5], "normalize_coords": True}, "0..1"),
        ({"box": BOX}, "input.image"),
        ({"image": "ftp://example.com/a.png", "box": BOX}, "http(s) URL or a data: URI"),
        # Unreadable images: bytes that are no image, and a truncated PNG.
        ({"image": data_uri(b"not an image at all"), "box": BOX}, "input.image"),
        ({"image": data_uri(png_bytes()[:200]), "box": BOX}, "input.image"),
        ({"image": "data:image/png;base64,@@@", "box": BOX}, "base64"),
        # URLs the guard refuses, before anything is stored or fetched.
        ({"image": "http://127.0.0.1/cat.png", **UNIT_BOX}, "input.image: URL points at a"),
        ({"image": "http://[::ffff:10.0.0.1]/cat.png", **UNIT_BOX}, "input.image: URL points"),
        ({"image": "https://example.com/cat.png", "box": BOX}, "normalize_coords=true"),
    ]
    for model_input, mentions in cases:
        assert_refused(create(model_input), 422, mentions, sessions)
    assert_refused(
        create({"image": image, "box": BOX}, webhook="http://10.1.2.3/hook"),
        422,
        "webhook",
        sessions,
    )
    assert_refused(create({"image": image, "box": BOX}, stream=True), 422, "stream", sessions)
    assert_refused(
        lambda: rc.models.predictions.create(model="meta/sam-2", input={"image": image}),
        404,
        "model meta/sam-2 not found",
        sessions,
    )
    assert_refused(lambda: rc.predictions.get("12345"), 404, "not found", sessions)
    assert_refused(lambda: rc.predictions.get("abc"), 404, "not found", sessions)


def test_token_scheme_and_problem_documents(base_url: str, tenant: Tenant) -> None:
    """Older Replicate clients send ``Token <key>``; refusals are RFC 7807
    documents with the request's id."""
    listed = httpx.get(
        f"{base_url}/v1/predictions", headers={"Authorization": f"Token {tenant.key}"}
    )
    assert listed.status_code == 200 and listed.json() == {
        "previous": None,
        "next": None,
        "results": [],
    }
    refused = httpx.post(
        f"{base_url}/v1/predictions",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json={"version": "v", "input": {"image": "data:image/png;base64,", "box": BOX}},
    )
    assert refused.status_code == 422
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.headers["X-Request-Id"]
    problem = refused.json()
    assert problem["status"] == 422 and problem["title"] == "Unprocessable Entity"
    assert problem["detail"].startswith("input.image")


def test_unknown_routes_and_wrong_methods_are_replicates_problems(
    rc: Client, base_url: str, tenant: Tenant
) -> None:
    """Under /v1/, a route segq lacks is 404 and a method a route does not
    take is 405, each an RFC 7807 document naming the method and the route,
    which Replicate's client raises with its ``detail``; Moondream's route
    in the same namespace keeps its shape, and Livepeer's route its own."""
    unknown_calls: list[tuple[Callable[[], object], str]] = [
        (rc.trainings.list, "GET /v1/trainings"),
        (rc.hardware.list, "GET /v1/hardware"),
        (rc.deployments.list, "GET /v1/deployments"),
        (rc.collections.list, "GET /v1/collections"),
    ]
    for call, route in unknown_calls:
        with pytest.raises(ReplicateError) as unknown:
            call()
        assert (unknown.value.status, unknown.value.title) == (404, "Not Found"), route
        assert route in (unknown.value.detail or ""), unknown.value
    with pytest.raises(ReplicateError) as wrong_method:
        rc.files.list()
    assert (wrong_method.value.status, wrong_method.value.title) == (405, "Method Not Allowed")
    assert "GET is not allowed on /v1/files" in (wrong_method.value.detail or "")
    with pytest.raises(ReplicateError) as wrong_method:
        rc.files.delete("12")
    assert wrong_method.value.status == 405
    assert "DELETE is not allowed on /v1/files/12" in (wrong_method.value.detail or "")

    auth = {"Authorization": f"Bearer {tenant.key}"}
    for method, path, status in [
        ("GET", "/v1/nothing", 404),
        ("POST", "/v1", 404),
        ("PATCH", "/v1/predictions/1", 405),
        ("PUT", "/v1/predictions", 405),
    ]:
        for headers in (auth, {}):  # routing comes before the key is read
            answer = httpx.request(method, f"{base_url}{path}", headers=headers)
            assert answer.status_code == status, (method, path, answer.text)
            assert answer.headers["Content-Type"] == "application/problem+json"
            problem = answer.json()
            assert problem["status"] == status and problem["title"]
            assert f"{method}" in problem["detail"] and path in problem["detail"]
            if status == 405:
                assert "POST" in answer.headers["Allow"] or "GET" in answer.headers["Allow"]
    # Moondream's POST /v1/segment asked with GET: Moondream's answers are
    # segq's envelope (its client reads no body).
    moondream = httpx.get(f"{base_url}/v1/segment")
    assert moondream.status_code == 405 and moondream.headers["Allow"] == "OPTIONS, POST"
    assert moondream.json()["error"]["code"] == 405
    assert "GET is not allowed on /v1/segment" in moondream.json()["error"]["message"]
    # Livepeer's route (outside /v1) answers in Livepeer's shape.
    livepeer = httpx.get(f"{base_url}/segment-anything-2")
    assert livepeer.status_code == 400
    assert "GET is not allowed" in livepeer.json()["detail"]["msg"]
    # segq's own routes keep segq's envelope.
    native = httpx.get(f"{base_url}/api/v1/nothing")
    assert native.status_code == 404 and native.json()["error"]["code"] == 404


def test_another_projects_prediction_is_not_found(
    rc: Client, base_url: str, other_tenant: Tenant
) -> None:
    prediction = rc.predictions.create(
        version="v", input={"image": data_uri(png_bytes()), "box": BOX}
    )
    other = Client(api_token=other_tenant.key, base_url=base_url)
    with pytest.raises(ReplicateError) as missing:
        other.predictions.get(prediction.id)
    assert missing.value.status == 404
    with pytest.raises(ReplicateError) as missing:
        other.predictions.cancel(prediction.id)
    assert missing.value.status == 404
    assert other.predictions.list().results == []


def test_a_failed_prediction_raises_model_error(rc: Client, running_worker: None) -> None:
    """The worker fails an image that it cannot fetch (the test worker
    fetches no URL at all); run() raises the client's ModelError with the
    prediction's error."""
    with pytest.raises(ModelError) as failed:
        rc.run(
            "segq/sam",
            input={
                "image": "https://example.invalid/cat.png",
                **UNIT_BOX,
            },
        )
    assert failed.value.prediction.status == "failed"
    assert failed.value.prediction.error


@pytest.fixture
def live_segq(
    settings: Settings, storage: S3Storage, celery_app: Celery, tmp_path: Path
) -> Iterator[str]:
    """`segq serve` (waitress in gunicorn) and `segq worker` processes, as
    deployed, on Postgres, Redis and moto; webhooks may reach loopback."""
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("SEGQ_")},
        "PYTHONPATH": str(REPO),
        "SEGQ_DATA_DIR": str(tmp_path / "data"),
        "SEGQ_DATABASE_URL": settings.database_url,
        "SEGQ_BROKER_URL": settings.broker_url,
        "SEGQ_STORAGE_URL": f"s3://{TEST_BUCKET}/{storage.prefix.rstrip('/')}",
        "SEGQ_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "SEGQ_MODEL": "grabcut",
        "SEGQ_WEBHOOK_ALLOWED_NETWORKS": LOOPBACK,
        "SEGQ_WEBHOOK_POLL_SECONDS": "1",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("ab")
    api = subprocess.Popen(
        [sys.executable, "-m", "segq.cli.main", "serve", f"--port={port}", "--workers=1"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    worker = Worker(env, 1, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert api.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "segq serve did not answer"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        worker.stop()
        api.terminate()
        api.wait(timeout=30)
        log.close()


def test_live_serve_and_worker(
    live_segq: str, tenant: Tenant, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run() with Prefer: wait through the real HTTP server, and a webhook
    that the worker process itself delivers."""
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.2")
    client = Client(api_token=tenant.key, base_url=live_segq)
    image = png_bytes(160, 120)
    output = client.run(
        "segq/sam", input={"image": data_uri(image), "point_coords": [POINT], "box": BOX}
    )
    assert isinstance(output, dict)
    [mask_url] = output["masks"]
    [native] = native_masks(tenant, image, {})
    assert np.array_equal(mask_pixels(mask_url), native)

    prediction = client.predictions.create(
        version="v", input={"image": data_uri(image), "box": BOX}, webhook=receiver.url
    )
    receiver.wait_for(2, timeout=WAIT_LIMIT_SECONDS)  # its output, then its end
    secret = client.webhooks.default.secret().key
    bodies = [Webhook(secret).verify(r.body, r.headers) for r in receiver.received]
    assert {body["id"] for body in bodies} == {prediction.id}
    assert "succeeded" in {body["status"] for body in bodies}


def test_embedded_default(tmp_path: Path) -> None:
    """No configuration: SQLite, the filesystem broker, local-disk storage
    and GrabCut; the masks are signed links to the API itself."""
    settings = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path)})
    engine = make_engine(settings.database_url)
    upgrade_to_head(engine)
    with make_session_factory(engine).begin() as session:
        _, key = create_project(session, "local")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = make_server("127.0.0.1", port, create_app(replace(settings, public_url=url)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with start_worker(
            create_worker_app(settings), pool="solo", perform_ping_check=False, shutdown_timeout=10
        ):
            client = Client(api_token=key, base_url=url)
            output = client.run(
                "segq/sam",
                input={"image": data_uri(png_bytes(160, 120)), "point_coords": [POINT]},
            )
        assert isinstance(output, dict)
        [mask_url] = output["masks"]
        assert mask_url.startswith(f"{url}/objects/")
        assert mask_pixels(mask_url).shape == (120, 160)
        [listed] = client.predictions.list().results
        assert listed.status == "succeeded"
        assert np.array_equal(mask_pixels(listed.output["masks"][0]), mask_pixels(mask_url))
    finally:
        server.shutdown()
        thread.join()
        engine.dispose()
