"""Peers' clients naming the object in words, unmodified, against a SAM 3
server (SEGQ_MODEL=sam3, SEGQ_MODEL_CHECKPOINT a tiny random snapshot
this module writes) served on a loopback port with a real Celery worker on
Postgres, Redis and moto S3: Moondream's ``object`` alone and with
``spatial_refs``, Replicate's ``segq/sam3`` with ``text``, and OpenAI's
client used as VLM Run documents segmentation. Every answer is compared
with the native text job's segments on the same image; bad input is a 4xx
in each route's envelope with nothing stored or queued."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import moondream as md
import numpy as np
import numpy.typing as npt
import openai
import pytest
import requests
from celery import Celery
from moondream.types import Base64EncodedImage
from PIL import Image
from pydantic import BaseModel, Field
from replicate.client import Client
from replicate.exceptions import ReplicateError
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.api.peers.replicate import VERSION_IDS
from segq.settings import Settings
from segq.storage import S3Storage
from segq.url_guard import FetchPolicy, parse_networks
from segq.worker.engines import load_engine, resolve_engine
from segq.worker.engines.base import SegmentationEngine
from segq.worker.item_inputs import ImageLimits
from tests.support.database import count_files, count_jobs
from tests.support.images import png_bytes
from tests.support.in_process_workers import engine_worker
from tests.support.tenants import Tenant, make_tenant, serving
from tests.support.tiny_sam3 import save_tiny_sam3

WIDTH, HEIGHT = 160, 120
PNG = png_bytes(WIDTH, HEIGHT)
PNG_DATA_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
LOOPBACK = "127.0.0.1/32"
#: The worker may fetch from moto on loopback (the image-URL case), nothing else.
LIMITS = ImageLimits(
    max_pixels=4_000_000,
    fetch_policy=FetchPolicy(
        max_bytes=2_000_000, timeout_seconds=5, allowed_networks=parse_networks(LOOPBACK)
    ),
)


# VLM Run's page's models (docs.vlm.run, image segmentation), as its users write them.
class SegmentationMask(BaseModel):
    label: str = Field(..., description="Name of the segmented object or region")
    mask_url: str = Field(
        ..., description="Pre-signed URL to the PNG segmentation mask for this object instance"
    )


class Segmentations(BaseModel):
    segmentations: list[SegmentationMask] = Field(
        ..., description="List of segmented objects or regions with their mask URLs"
    )


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sam3(tmp_path_factory.mktemp("sam3") / "sam3")


@pytest.fixture(scope="module")
def sam3_engine(snapshot: Path) -> SegmentationEngine:
    """The engine a worker with SEGQ_MODEL=sam3 and SEGQ_MODEL_CHECKPOINT
    set to the snapshot runs; loaded once for the module."""
    return load_engine(resolve_engine("sam3", str(snapshot), snapshot.parent), "cpu")


@pytest.fixture
def sam3_settings(settings: Settings, snapshot: Path) -> Settings:
    return replace(
        settings, model="sam3", model_checkpoint=str(snapshot), fetch_allowed_networks=LOOPBACK
    )


@pytest.fixture
def stack(
    sam3_settings: Settings,
    storage: S3Storage,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    sam3_engine: SegmentationEngine,
) -> Iterator[tuple[str, Tenant]]:
    """The SAM 3 server on a loopback port with its worker: its URL and a tenant."""
    app = create_app(sam3_settings, storage=storage, celery=celery_app)
    tenant = make_tenant(app.test_client(), sessions, "acme")
    with (
        engine_worker(celery_app, sessions, storage, sam3_engine, limits=LIMITS),
        serving(app) as url,
    ):
        yield url, tenant


@pytest.fixture
def api_only(
    sam3_settings: Settings, storage: S3Storage, celery_app: Celery, sessions: sessionmaker[Session]
) -> Iterator[tuple[str, Tenant]]:
    """The SAM 3 server with no worker: for refusals, which run nothing."""
    app = create_app(sam3_settings, storage=storage, celery=celery_app)
    with serving(app) as url:
        yield url, make_tenant(app.test_client(), sessions, "acme")


def native_segments(tenant: Tenant, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The segments of a native job on PNG with ``body``'s prompt and options."""
    file_id = tenant.upload(PNG).json["id"]
    created = tenant.post_job({"items": [{"fileId": file_id}], **body})
    assert created.status_code == 200, created.json
    deadline = time.monotonic() + 60
    while (job := tenant.get_job(created.json["jobId"]).json)["status"] not in (
        "Completed",
        "Failed",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "Completed", job
    segments: list[dict[str, Any]] = job["items"][0]["segments"]
    return segments


def mask_at(url: str) -> npt.NDArray[np.bool_]:
    png = requests.get(url, timeout=10)
    assert png.status_code == 200, url
    mask: npt.NDArray[np.bool_] = np.asarray(Image.open(io.BytesIO(png.content))) == 255
    return mask


def moondream_view(segment: dict[str, Any]) -> tuple[list[list[tuple[int, int]]], dict[str, Any]]:
    """A native segment's rings in pixels and its box, as Moondream names it."""
    rings = [
        [(round(v["x"] * WIDTH), round(v["y"] * HEIGHT)) for v in polygon["vertices"]]
        for polygon in segment["polygons"]
    ]
    box = segment["boundingBox"]
    return rings, {
        "x_min": box["xMin"],
        "y_min": box["yMin"],
        "x_max": box["xMax"],
        "y_max": box["yMax"],
    }


def path_view(answer: dict[str, Any]) -> tuple[list[list[tuple[int, int]]], dict[str, Any]]:
    """A Moondream answer's rings in pixels (vertices at pixel centres) and box."""
    rings = []
    for subpath in answer["path"].split("M")[1:]:
        pairs = subpath.replace("Z", "").replace("L", "").split()
        rings.append(
            [
                (round(float(x) * WIDTH - 0.5), round(float(y) * HEIGHT - 0.5))
                for x, y in (pair.split(",") for pair in pairs)
            ]
        )
    return rings, answer.get("bbox") or {}


def interior_point(mask: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """A point (in 0..1) on ``mask`` whose 5x5 neighbourhood is all on it."""
    inner = mask.copy()
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            inner &= np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    ys, xs = np.nonzero(inner)
    assert len(xs), "the instance has no interior"
    return (xs[0] + 0.5) / WIDTH, (ys[0] + 0.5) / HEIGHT


# Moondream


def test_moondream_object_alone_and_with_spatial_refs_on_sam3(
    stack: tuple[str, Tenant],
) -> None:
    url, tenant = stack
    client = md.vl(endpoint=f"{url}/v1", api_key=tenant.key)
    image = Base64EncodedImage(image_url=PNG_DATA_URI)
    instances = native_segments(tenant, {"text": "cat", "outputs": ["polygons", "mask"]})
    assert len(instances) >= 2, instances  # the tiny SAM 3 finds several

    # object alone: the best instance of the phrase, whole and streamed.
    whole = client.segment(image, "cat")
    assert path_view(whole) == moondream_view(instances[0])
    events = list(client.segment(image, "cat", stream=True))
    assert events[0] == {"bbox": whole["bbox"]}
    assert "".join(event["chunk"] for event in events[1:-1]) == whole["path"]
    assert events[-1] == {"path": whole["path"], "bbox": whole["bbox"], "completed": True}

    # With refs: the best instance at them. A point inside the second
    # instance but off the first picks the second.
    first, second = (mask_at(s["mask"]["url"]) for s in instances[:2])
    x, y = interior_point(second & ~first)
    at_point = client.segment(image, "cat", spatial_refs=[[x, y]])
    assert path_view(at_point) == moondream_view(instances[1])
    around = client.segment(image, "cat", spatial_refs=[[0.1, 0.1, 0.9, 0.9]])
    assert path_view(around) == moondream_view(instances[0])

    # Refs at none of the instances: the object they outline (SAM 3's
    # tracker on the box, as a native box prompt gives it).
    corner = {"xMin": 0.0, "yMin": 0.0, "xMax": 0.2, "yMax": 0.2}
    [outlined] = native_segments(tenant, {"boundingBox": corner, "outputs": ["polygons"]})
    away = client.segment(image, "cat", spatial_refs=[[0.0, 0.0, 0.2, 0.2]])
    assert path_view(away) == moondream_view(outlined)


@pytest.mark.parametrize(
    ("target", "spatial_refs", "status", "message"),
    [
        ("   ", None, 400, b"object: String should have at least 1 character"),
        ("x" * 500, None, 400, b"object: String should have at most 200 characters"),
        ("x" * 10_000, None, 400, b"object must be a string of at most 1000 characters"),
        ("cat\x07", None, 400, b"object: String should match"),
        ("cat", [[0.5, 1.5]], 400, b"spatial_refs[0][1]: Input should be"),
        ("cat", [[0.8, 0.1, 0.2, 0.9]], 422, b"spatial_refs[0] must have xMin < xMax"),
        ("cat", [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]], 422, b"at most one box"),
    ],
)
def test_moondream_refusals_on_sam3(
    api_only: tuple[str, Tenant],
    sessions: sessionmaker[Session],
    target: str,
    spatial_refs: Any,
    status: int,
    message: bytes,
) -> None:
    url, tenant = api_only
    client = md.vl(endpoint=f"{url}/v1", api_key=tenant.key)
    with pytest.raises(urllib.error.HTTPError) as refused:
        client.segment(
            Base64EncodedImage(image_url=PNG_DATA_URI), target, spatial_refs=spatial_refs
        )
    assert refused.value.code == status
    assert message in refused.value.read()
    assert count_jobs(sessions) == (0, 0)
    assert count_files(sessions) == 0


# OpenAI's client, as VLM Run documents segmentation


def chat(client: openai.OpenAI, text: str, image_url: str, **options: Any) -> Any:
    return client.chat.completions.create(
        model="vlm-agent-1",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": image_url, "detail": "auto"}},
                ],
            }
        ],
        **options,
    )


def test_openai_client_as_vlm_run_documents_it(
    stack: tuple[str, Tenant], storage: S3Storage
) -> None:
    url, tenant = stack
    client = openai.OpenAI(base_url=f"{url}/v1/openai", api_key=tenant.key, max_retries=0)
    vlm_run_format = {"type": "json_schema", "schema": Segmentations.model_json_schema()}
    response = chat(
        client, "Segment all the cars in this image", PNG_DATA_URI, response_format=vlm_run_format
    )
    answer = Segmentations.model_validate_json(response.choices[0].message.content)
    native = native_segments(tenant, {"text": "car", "outputs": ["mask"]})
    assert len(answer.segmentations) == len(native) >= 2
    for entry, segment in zip(answer.segmentations, native, strict=True):
        assert entry.label == "car"
        assert np.array_equal(mask_at(entry.mask_url), mask_at(segment["mask"]["url"]))
    assert response.object == "chat.completion" and response.model == "vlm-agent-1"
    assert response.id.startswith("chatcmpl-") and response.created > 0
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.role == "assistant"
    assert response.usage is not None and response.usage.total_tokens == 0

    # OpenAI's own spelling of a schema, with the score asked for too; the
    # image by URL, fetched by the worker through the guard (loopback is
    # allowed here only so that moto can serve it).
    storage.put("peer/scene.png", PNG, "image/png")
    image_url = storage.presigned_get_url("peer/scene.png", 600)
    scored = {
        "type": "object",
        "properties": {
            "segmentations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "label": {"type": "string"},
                        "mask_url": {"type": "string"},
                        "score": {"type": "number"},
                    },
                    "required": ["label", "mask_url", "score"],
                },
            }
        },
        "required": ["segmentations"],
    }
    by_url = chat(
        client,
        "car",
        image_url,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": scored}},
    )
    entries = json.loads(by_url.choices[0].message.content)["segmentations"]
    assert [entry["score"] for entry in entries] == [segment["score"] for segment in native]
    assert [entry["label"] for entry in entries] == ["car"] * len(native)
    assert [set(entry) for entry in entries] == [{"label", "mask_url", "score"}] * len(native)


UNSUPPORTED_SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string"}},
    "required": ["caption"],
}


@pytest.mark.parametrize(
    ("text", "image_url", "options", "error", "message"),
    [
        ("Describe this image", PNG_DATA_URI, {}, openai.UnprocessableEntityError,
         "segq understands a noun phrase"),
        ("What is in this picture?", PNG_DATA_URI, {}, openai.UnprocessableEntityError,
         "not 'What is in this picture?'"),
        ("count the dogs", PNG_DATA_URI, {}, openai.UnprocessableEntityError, "noun phrase"),
        ("   ", PNG_DATA_URI, {}, openai.UnprocessableEntityError, "give a text part"),
        ("car", PNG_DATA_URI,
         {"response_format": {"type": "json_schema", "schema": UNSUPPORTED_SCHEMA}},
         openai.UnprocessableEntityError, "segq cannot fill caption"),
        ("car", PNG_DATA_URI, {"response_format": {"type": "json_schema"}},
         openai.UnprocessableEntityError, "needs its schema"),
        ("car", PNG_DATA_URI, {"n": 2}, openai.BadRequestError, "n: Input should be less"),
        ("car", PNG_DATA_URI, {"extra_body": {"tools": []}}, openai.BadRequestError,
         "tools: Extra inputs are not permitted"),
        ("car", "ftp://example.com/cat.png", {}, openai.BadRequestError,
         "image_url.url must be a data: URL or an http(s) URL"),
        ("car", "http://localhost/cat.png", {}, openai.BadRequestError,
         "messages[0].content[1].image_url.url: URL host names this machine"),
        ("car", "http://10.0.0.7/cat.png", {}, openai.BadRequestError,
         "messages[0].content[1].image_url.url: URL points at a private"),
        ("car", "data:image/png;base64,@@@", {}, openai.BadRequestError, "not valid base64"),
        ("car", "data:image/png;base64," + base64.b64encode(b"not a png").decode(), {},
         openai.APIStatusError, "image"),
    ],
)  # fmt: skip
def test_openai_refusals_are_openais_envelope_with_nothing_stored(
    api_only: tuple[str, Tenant],
    sessions: sessionmaker[Session],
    text: str,
    image_url: str,
    options: dict[str, Any],
    error: type[openai.APIStatusError],
    message: str,
) -> None:
    url, tenant = api_only
    client = openai.OpenAI(base_url=f"{url}/v1/openai", api_key=tenant.key, max_retries=0)
    with pytest.raises(error) as refused:
        chat(client, text, image_url, **options)
    assert 400 <= refused.value.status_code < 500
    body = refused.value.body
    assert isinstance(body, dict) and message in body["message"], body
    assert body["type"] == "invalid_request_error"
    assert count_jobs(sessions) == (0, 0)
    assert count_files(sessions) == 0


def test_openai_key_stream_and_message_shape_refusals(
    api_only: tuple[str, Tenant], sessions: sessionmaker[Session]
) -> None:
    url, tenant = api_only
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(openai.OpenAI(base_url=f"{url}/v1/openai", api_key="segq_nope", max_retries=0),
             "car", PNG_DATA_URI)  # fmt: skip
    assert refused.value.code == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{url}/v1/openai", api_key=tenant.key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="stream"):
        chat(client, "car", PNG_DATA_URI, stream=True)
    no_image = [{"role": "user", "content": "Segment the cars"}]
    with pytest.raises(
        openai.UnprocessableEntityError, match="exactly one image_url part"
    ) as shape:
        client.chat.completions.create(model="m", messages=no_image)  # type: ignore[arg-type]
    # OpenAI's param names the field at fault.
    assert shape.value.param == "messages[0].content"
    unknown = requests.post(f"{url}/v1/openai/embeddings", json={}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == (
        "invalid_request_error"
    )
    assert count_jobs(sessions) == (0, 0)


def test_a_public_looking_image_url_is_taken_by_the_api_and_never_fetched_here(
    sam3_settings: Settings,
    storage: S3Storage,
    celery_app: Celery,
    sessions: sessionmaker[Session],
) -> None:
    """The API's guard passes a public address (the worker fetches it, and
    checks again what the name resolves to); with no worker here, the job
    waits and the route's wait runs out, answered in OpenAI's envelope."""
    app = create_app(
        replace(sam3_settings, peer_wait_seconds=1), storage=storage, celery=celery_app
    )
    with serving(app) as url:
        tenant = make_tenant(app.test_client(), sessions, "acme")
        client = openai.OpenAI(base_url=f"{url}/v1/openai", api_key=tenant.key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as waited:
            chat(client, "cars", "https://images.example.com/cars.jpg")
    assert waited.value.status_code == 504
    assert "did not finish within 1 s" in str(waited.value.body)
    assert count_jobs(sessions) == (1, 1)


def test_openai_route_on_a_server_without_sam3_names_the_setting(
    settings: Settings,
    storage: S3Storage,
    celery_app: Celery,
    sessions: sessionmaker[Session],
) -> None:
    app = create_app(replace(settings, model="grabcut"), storage=storage, celery=celery_app)
    with serving(app) as url:
        tenant = make_tenant(app.test_client(), sessions, "acme")
        client = openai.OpenAI(base_url=f"{url}/v1/openai", api_key=tenant.key, max_retries=0)
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            chat(client, "Segment all the cars in this image", PNG_DATA_URI)
        # Moondream's object alone keeps today's answer, naming the setting.
        with pytest.raises(urllib.error.HTTPError) as moondream_refused:
            md.vl(endpoint=f"{url}/v1", api_key=tenant.key).segment(
                Base64EncodedImage(image_url=PNG_DATA_URI), "cat"
            )
        rc = Client(api_token=tenant.key, base_url=url)
        with pytest.raises(ReplicateError) as replicate_refused:
            rc.models.predictions.create(
                model="segq/sam3", input={"image": PNG_DATA_URI, "text": "cat"}
            )
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["message"] == (
        "text prompts need SEGQ_MODEL=sam3; this server runs grabcut"
    )
    assert moondream_refused.value.code == 422
    moondream_message = moondream_refused.value.read()
    assert b"a text prompt, and text prompts need SEGQ_MODEL=sam3; this server runs grabcut" in (
        moondream_message
    )
    assert replicate_refused.value.status == 422
    assert "text prompts need SEGQ_MODEL=sam3" in (replicate_refused.value.detail or "")
    assert count_jobs(sessions) == (0, 0)
    assert count_files(sessions) == 0


# Replicate


def test_replicate_segq_sam3_takes_text(
    stack: tuple[str, Tenant], sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, tenant = stack
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.1")
    rc = Client(api_token=tenant.key, base_url=url)
    assert [model.id for model in rc.models.list().results] == ["segq/sam", "segq/sam3"]
    model = rc.models.get("segq/sam3")
    [version] = model.versions.list().results
    assert model.latest_version is not None and version.id == model.latest_version.id
    assert version.id == VERSION_IDS["segq/sam3"] != VERSION_IDS["segq/sam"]
    schema = version.openapi_schema["components"]["schemas"]["Input"]
    assert list(schema["properties"]) == [
        "image",
        "point_coords",
        "point_labels",
        "box",
        "multimask_output",
        "normalize_coords",
        "text",
    ]
    assert (
        "text"
        not in rc.models.get("segq/sam").latest_version.openapi_schema[  # type: ignore[union-attr]
            "components"
        ]["schemas"]["Input"]["properties"]
    )

    output = rc.run("segq/sam3", input={"image": PNG_DATA_URI, "text": "person"})
    native = native_segments(tenant, {"text": "person", "outputs": ["mask"]})
    assert output["scores"] == [segment["score"] for segment in native]
    assert len(output["masks"]) == len(native) >= 2
    for mask_url, segment in zip(output["masks"], native, strict=True):
        assert np.array_equal(mask_at(str(mask_url)), mask_at(segment["mask"]["url"]))
    # By version id alone, the version names the model.
    by_version = rc.predictions.create(
        version=version.id, input={"image": PNG_DATA_URI, "text": "person"}
    )
    assert by_version.model == "segq/sam3"
    by_version.wait()
    assert by_version.status == "succeeded" and by_version.output is not None
    assert by_version.output["scores"] == output["scores"]
    assert rc.models.get("segq/sam3").run_count == 2

    jobs_before = count_jobs(sessions)
    refusals: list[tuple[str, dict[str, Any], int, str]] = [
        ("segq/sam3", {"text": "cat", "box": [1, 1, 50, 50]}, 422, "input.text is a text prompt"),
        ("segq/sam3", {"text": "   "}, 422, "input.text: String should have at least 1"),
        ("segq/sam3", {"text": "x" * 10_000}, 422, "input.text: String should have at most 200"),
        ("segq/sam3", {"text": 5}, 422, "input.text: Input should be a valid string"),
        ("segq/sam3", {}, 422, "give point_coords or box (or both), or text"),
        ("segq/sam", {"text": "cat"}, 422, "input.text: segq/sam has no such input"),
    ]
    for model_name, refused_input, status, detail in refusals:
        with pytest.raises(ReplicateError) as refused:
            rc.models.predictions.create(
                model=model_name, input={"image": PNG_DATA_URI, **refused_input}
            )
        assert refused.value.status == status and detail in (refused.value.detail or ""), (
            refused.value.detail
        )
    assert count_jobs(sessions) == jobs_before
