"""Livepeer's and Moondream's own Python clients (livepeer-ai, moondream),
unmodified, against segq served on a loopback port with a real Celery
worker on Postgres, Redis and moto S3, and on the embedded default."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import moondream as md
import numpy as np
import numpy.typing as npt
import pytest
import requests
from celery import Celery
from celery.contrib.testing.worker import start_worker
from livepeer_ai import Livepeer
from livepeer_ai.models import errors
from livepeer_ai.models.errors.httpvalidationerror import HTTPValidationErrorData
from moondream.types import Base64EncodedImage
from PIL import Image
from segment_anything import SamPredictor
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.db import make_engine, make_session_factory
from segq.projects import create_project
from segq.schema_migrations import upgrade_to_head
from segq.settings import Settings, SettingsError
from segq.storage import S3Storage
from segq.url_guard import FetchPolicy, parse_networks
from segq.worker.celery_app import create_worker_app
from segq.worker.engines.sam import SamEngine
from segq.worker.item_inputs import ImageLimits
from segq.worker.masks import Ring, rasterize_rings
from tests.support.database import count_files, count_jobs
from tests.support.fake_dns import fake_dns
from tests.support.images import png_bytes, scene
from tests.support.in_process_workers import engine_worker, grabcut_worker
from tests.support.tenants import Tenant, serving
from tests.support.tiny_sam import load_tiny_sam, segment_anything_directly

WIDTH, HEIGHT = 160, 120
#: scene_prompt_body's point and box (on and around the object), in pixels.
POINT = [80, 60]
BOX = [32, 18, 128, 102]
NATIVE_PROMPT = {
    "points": [{"x": 0.5, "y": 0.5, "label": 1}],
    "boundingBox": {"xMin": 0.2, "yMin": 0.15, "xMax": 0.8, "yMax": 0.85},
}
#: segq's own names for the fields a peer's body fills: a peer's refusal
#: names the caller's field instead.
NATIVE_FIELD_NAMES = re.compile(
    r"\b(items|imageData|fileUrl|points|boundingBox|prompts)(\[|\.|:| must| repeats)"
)
PNG = png_bytes(WIDTH, HEIGHT)
PNG_DATA_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()


@pytest.fixture
def peer_settings(settings: Settings) -> Settings:
    # A GrabCut installation says so: the Livepeer route then asks for no logits.
    return replace(settings, model="grabcut")


@pytest.fixture
def base_url(
    peer_settings: Settings,
    storage: S3Storage,
    celery_app: Celery,
    sessions: sessionmaker[Session],
) -> Iterator[str]:
    app = create_app(peer_settings, storage=storage, celery=celery_app)
    with serving(app) as url:
        yield url


@pytest.fixture
def worker(
    celery_app: Celery, sessions: sessionmaker[Session], storage: S3Storage
) -> Iterator[None]:
    with grabcut_worker(celery_app, sessions, storage):
        yield


def native_segments(tenant: Tenant, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The segments of a native job on PNG with ``body``'s prompt and options."""
    file_id = tenant.upload(PNG).json["id"]
    job_id = tenant.post_job({"items": [{"fileId": file_id}], **body}).json["jobId"]
    deadline = time.monotonic() + 60
    while (job := tenant.get_job(job_id).json)["status"] not in ("Completed", "Failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "Completed", job
    segments: list[dict[str, Any]] = job["items"][0]["segments"]
    return segments


def mask_at(url: str) -> npt.NDArray[np.bool_]:
    png = requests.get(url, timeout=10)
    assert png.status_code == 200
    mask: npt.NDArray[np.bool_] = np.asarray(Image.open(io.BytesIO(png.content))) == 255
    return mask


# Livepeer


#: The status of each answer the SDK received (its HTTPError carries none).
statuses: list[int] = []


def livepeer_call(base_url: str, key: str, **fields: Any) -> Any:
    http = httpx.Client(
        event_hooks={"response": [lambda answer: statuses.append(answer.status_code)]}
    )
    with Livepeer(http_bearer=key, server_url=base_url, timeout_ms=60_000, client=http) as lp:
        request = {"image": {"file_name": "scene.png", "content": PNG}, **fields}
        return lp.generate.segment_anything2(request=request).masks_response


def test_livepeer_points_and_box_give_the_native_jobs_mask(
    base_url: str, tenant: Tenant, worker: None, sessions: sessionmaker[Session]
) -> None:
    answer = livepeer_call(
        base_url,
        tenant.key,
        model_id="facebook/sam2-hiera-large",
        point_coords=json.dumps([POINT]),
        point_labels="[1]",
        box=json.dumps(BOX),
        multimask_output=False,
    )
    masks = np.array(json.loads(answer.masks))
    scores = json.loads(answer.scores)
    assert masks.shape == (1, HEIGHT, WIDTH)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert len(scores) == 1
    # GrabCut gives no logits; the server says it runs GrabCut.
    assert json.loads(answer.logits) == []

    [native] = native_segments(tenant, NATIVE_PROMPT)
    assert np.array_equal(masks[0] == 1.0, mask_at(native["mask"]["url"]))
    assert scores[0] == native["score"]
    truth = scene(WIDTH, HEIGHT)[1]
    selected = masks[0] == 1.0
    assert (selected & truth).sum() / (selected | truth).sum() > 0.8
    # A Livepeer call is a segq job of the key's project, listed natively.
    listed = tenant.client.get(tenant.url("/context/vision/segment"), headers=tenant.headers)
    assert len(listed.json["items"]) == 2


def test_livepeer_coordinates_in_0_to_1_and_multimask(
    base_url: str, tenant: Tenant, worker: None
) -> None:
    answer = livepeer_call(
        base_url,
        tenant.key,
        point_coords="[[0.5, 0.5]]",
        point_labels="[1]",
        box="[[0.2, 0.15, 0.8, 0.85]]",
        normalize_coords=False,
        multimask_output=True,
    )
    masks = np.array(json.loads(answer.masks))
    scores = json.loads(answer.scores)
    native = native_segments(tenant, {**NATIVE_PROMPT, "multimaskOutput": True})
    assert masks.shape == (len(native), HEIGHT, WIDTH)
    assert scores == sorted(scores, reverse=True) == [s["score"] for s in native]
    for mask, segment in zip(masks, native, strict=True):
        assert np.array_equal(mask == 1.0, mask_at(segment["mask"]["url"]))


@pytest.mark.model
def test_livepeer_on_sam_gives_segment_anythings_masks_scores_and_logits(
    peer_settings: Settings,
    storage: S3Storage,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sam = load_tiny_sam(tmp_path, monkeypatch)
    # The API says it runs SAM, so the route asks its jobs for logits.
    app = create_app(replace(peer_settings, model="sam_vit_b"), storage=storage, celery=celery_app)
    prompt = {"point_coords": json.dumps([POINT]), "point_labels": "[1]", "box": json.dumps(BOX)}
    with (
        engine_worker(celery_app, sessions, storage, SamEngine(sam, "tiny")),
        serving(app) as url,
    ):
        thresholded = livepeer_call(url, tenant.key, **prompt, return_logits=False)
        raw = livepeer_call(url, tenant.key, **prompt)  # return_logits defaults to true
        # Refinement: the best candidate's logits sent back as mask_input.
        best_logits = json.loads(thresholded.logits)[0]
        refined = livepeer_call(
            url,
            tenant.key,
            **prompt,
            mask_input=json.dumps([best_logits]),
            multimask_output=False,
            return_logits=False,
        )
    image = scene(WIDTH, HEIGHT)[0]
    x, y = POINT
    x1, y1, x2, y2 = BOX
    expected = segment_anything_directly(sam, image, [(x, y, 1)], (x1, y1, x2, y2), multimask=True)
    masks = np.array(json.loads(thresholded.masks))
    logits = np.array(json.loads(thresholded.logits))
    assert masks.shape == (3, HEIGHT, WIDTH)
    assert logits.shape == (3, 16, 16)  # the tiny SAM's low-resolution frame (SAM's: 256)
    assert json.loads(thresholded.scores) == pytest.approx([e[1] for e in expected], abs=1e-6)
    for index, (mask, _, low_res) in enumerate(expected):
        assert np.array_equal(masks[index] == 1.0, mask)
        # Stored as float16: about three significant digits.
        np.testing.assert_allclose(logits[index], low_res, rtol=2e-3, atol=2e-3)
    assert raw.logits == thresholded.logits
    [(refined_mask, refined_score, _)] = segment_anything_directly(
        sam,
        image,
        [(x, y, 1)],
        (x1, y1, x2, y2),
        multimask=False,
        mask_input=np.array([best_logits], dtype=np.float32),
    )
    assert np.array_equal(np.array(json.loads(refined.masks))[0] == 1.0, refined_mask)
    assert json.loads(refined.scores) == pytest.approx([refined_score], abs=1e-6)

    # return_logits: the masks are SAM's own full-size logits.
    predictor = SamPredictor(sam)
    predictor.set_image(image, image_format="RGB")
    full, scores, _ = predictor.predict(
        point_coords=np.array([POINT], dtype=np.float32),
        point_labels=np.array([1]),
        box=np.array(BOX, dtype=np.float32),
        multimask_output=True,
        return_logits=True,
    )
    order = np.argsort(-scores, kind="stable")
    answered = np.array(json.loads(raw.masks))
    assert answered.shape == (3, HEIGHT, WIDTH)
    spread = float(np.abs(full).max())
    np.testing.assert_allclose(answered, full[order], atol=0.01 * spread)
    for index, (mask, _, _) in enumerate(expected):
        assert ((answered[index] > 0) == mask).mean() > 0.99


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        (
            {"point_coords": "[[80, 60]", "point_labels": "[1]"},
            400,
            "Error parsing JSON for point_coords",
        ),
        ({"point_coords": "[[80, 60]]"}, 400, "point_labels must be given"),
        ({"point_coords": "[[80, 60, 1]]", "point_labels": "[1]"}, 400, "point_coords[0] must be"),
        ({"point_coords": "[[800, 60]]", "point_labels": "[1]"}, 400, "outside the image"),
        ({"point_coords": "[[80, 60]]", "point_labels": "[2]"}, 400, "point_labels must be 1"),
        ({"box": "[10, 20, 30]"}, 400, "box must be one box"),
        ({"box": "[128, 18, 32, 102]"}, 400, "box must have xMin < xMax"),
        (
            {"point_coords": "[[80, 60], [90, 10], [80, 60]]", "point_labels": "[1, 0, 1]"},
            400,
            "point_coords[2] repeats an earlier point",
        ),
        ({"model_id": "stabilityai/sdxl"}, 400, "pipeline configured with"),
        ({"mask_input": "[[0.0, 1.0]]", "box": json.dumps(BOX)}, 400, "mask_input must be"),
        ({"point_coords": "[" * 100_000 + "]" * 100_000}, 400, "nested too deeply"),
        ({"mask_input": '[["a"]]', "box": json.dumps(BOX)}, 400, "mask_input must be"),
        ({"mask_input": "[[[NaN]]]", "box": json.dumps(BOX)}, 400, "for mask_input"),
        (
            {"mask_input": json.dumps([[[0] * 257] * 257]), "box": json.dumps(BOX)},
            400,
            "mask_input must",
        ),
        ({}, 400, "give point_coords (with point_labels) or box"),
        (
            {"image": {"file_name": "x.png", "content": b"not an image"}, "box": json.dumps(BOX)},
            400,
            "image",
        ),
    ],
)
def test_livepeer_refusals_are_the_sdks_http_error(
    base_url: str,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    fields: dict[str, Any],
    status: int,
    message: str,
) -> None:
    with pytest.raises(errors.HTTPError) as refused:
        livepeer_call(base_url, tenant.key, **fields)
    assert statuses[-1] == status
    assert message in refused.value.data.detail.msg
    assert not NATIVE_FIELD_NAMES.search(refused.value.data.detail.msg)
    assert count_jobs(sessions) == (0, 0)
    assert count_files(sessions) == 0


def test_livepeer_bad_key_and_bad_form_field(base_url: str, tenant: Tenant) -> None:
    with pytest.raises(errors.HTTPError) as unknown:
        livepeer_call(base_url, "segq_not-a-key", box=json.dumps(BOX))
    assert statuses[-1] == 401
    assert "Authorization: Bearer" in unknown.value.data.detail.msg
    # What the SDK cannot send (it types these fields) answers in FastAPI's
    # shape, which the SDK's own model of it reads.
    bad_bool = requests.post(
        f"{base_url}/segment-anything-2",
        headers=tenant.headers,
        files={"image": ("a.png", PNG, "image/png")},
        data={"multimask_output": "maybe", "box": json.dumps(BOX)},
        timeout=10,
    )
    no_image = requests.post(
        f"{base_url}/segment-anything-2",
        headers=tenant.headers,
        data={"box": json.dumps(BOX)},
        timeout=10,
    )
    for answer, field in ((bad_bool, "multimask_output"), (no_image, "image")):
        assert answer.status_code == 422
        parsed = HTTPValidationErrorData.model_validate(answer.json())
        assert parsed.detail is not None and parsed.detail[0].loc == ["body", field]


def test_livepeer_waits_at_most_the_peer_wait_and_the_job_runs_on(
    peer_settings: Settings,
    storage: S3Storage,
    celery_app: Celery,
    tenant: Tenant,
    sessions: sessionmaker[Session],
) -> None:
    app = create_app(
        replace(peer_settings, peer_wait_seconds=1), storage=storage, celery=celery_app
    )
    started = time.monotonic()
    # No worker: the job stays queued.
    with serving(app) as url, pytest.raises(errors.SDKError) as late:
        livepeer_call(url, tenant.key, box=json.dumps(BOX))
    assert late.value.status_code == 504
    assert "did not finish within 1 s" in late.value.body
    assert time.monotonic() - started < 10
    job_id = int(re.search(r"job (\d+)", late.value.body).group(1))  # type: ignore[union-attr]
    assert tenant.get_job(job_id).json["status"] == "Queued"
    assert count_jobs(sessions) == (1, 1)


def test_waiting_calls_hold_at_most_half_the_threads_and_the_rest_stay_free(
    peer_settings: Settings,
    storage: S3Storage,
    celery_app: Celery,
    tenant: Tenant,
    sessions: sessionmaker[Session],
) -> None:
    """On a server that cannot park a request (werkzeug here; `segq serve`
    parks it: tests/system/test_peer_waiting_live.py), a synchronous call
    holds its request thread while its job runs: with every waiting place
    for a thread taken (half the threads), another is answered 503 with
    Retry-After at once, before its job is made, and other routes still
    answer."""
    app = create_app(
        replace(peer_settings, peer_wait_seconds=4),
        storage=storage,
        celery=celery_app,
        request_threads=2,
    )
    answers: list[int] = []
    with serving(app) as url:
        waiting = threading.Thread(
            target=lambda: answers.append(
                requests.post(
                    f"{url}/segment-anything-2",
                    headers=tenant.headers,
                    files={"image": ("a.png", PNG, "image/png")},
                    data={"box": json.dumps(BOX)},
                    timeout=30,
                ).status_code
            )
        )
        waiting.start()
        time.sleep(1)  # it holds the one slot; no worker runs its job
        started = time.monotonic()
        with pytest.raises(errors.SDKError) as busy:
            livepeer_call(url, tenant.key, box=json.dumps(BOX))
        assert busy.value.status_code == 503 and time.monotonic() - started < 3
        assert "waiting for their jobs" in busy.value.body
        assert requests.get(f"{url}/healthz", timeout=2).status_code == 200
        waiting.join(timeout=30)
    assert answers == [504]
    assert count_jobs(sessions) == (1, 1)


def test_the_peer_wait_is_a_setting(tmp_path: Path) -> None:
    data = {"SEGQ_DATA_DIR": str(tmp_path)}
    assert Settings.from_env(data).peer_wait_seconds == 60
    assert Settings.from_env({**data, "SEGQ_PEER_WAIT_SECONDS": "7"}).peer_wait_seconds == 7
    with pytest.raises(SettingsError):
        Settings.from_env({**data, "SEGQ_PEER_WAIT_SECONDS": "0"})


# Moondream


def moondream_client(base_url: str, key: str | None) -> Any:
    return md.vl(endpoint=f"{base_url}/v1", api_key=key)


def path_pixels(path: str) -> list[list[tuple[int, int]]]:
    """The rings of a Moondream path as integer pixel columns and rows
    (vertices sit at pixel centres in 0..1)."""
    rings = []
    for subpath in path.split("M")[1:]:
        pairs = subpath.replace("Z", "").replace("L", "").split()
        rings.append(
            [
                (round(float(x) * WIDTH - 0.5), round(float(y) * HEIGHT - 0.5))
                for x, y in (pair.split(",") for pair in pairs)
            ]
        )
    return rings


def test_moondream_points_and_box_give_the_native_jobs_polygons(
    base_url: str, tenant: Tenant, worker: None
) -> None:
    answer = moondream_client(base_url, tenant.key).segment(
        Base64EncodedImage(image_url=PNG_DATA_URI),
        "ellipse",
        spatial_refs=[[0.5, 0.5], [0.2, 0.15, 0.8, 0.85]],
    )
    [native] = native_segments(tenant, {**NATIVE_PROMPT, "outputs": ["polygons", "mask"]})
    native_rings = [
        [(round(v["x"] * WIDTH), round(v["y"] * HEIGHT)) for v in polygon["vertices"]]
        for polygon in native["polygons"]
    ]
    assert path_pixels(answer["path"]) == native_rings
    box = native["boundingBox"]
    assert answer["bbox"] == {
        "x_min": box["xMin"],
        "y_min": box["yMin"],
        "x_max": box["xMax"],
        "y_max": box["yMax"],
    }
    # The same rings, with the native job's hole flags, are its mask.
    rings = [
        Ring(tuple((x / WIDTH, y / HEIGHT) for x, y in ring), polygon["isHole"])
        for ring, polygon in zip(path_pixels(answer["path"]), native["polygons"], strict=True)
    ]
    assert np.array_equal(rasterize_rings(rings, HEIGHT, WIDTH), mask_at(native["mask"]["url"]))


def test_moondream_endpoint_may_end_in_a_slash(base_url: str, tenant: Tenant, worker: None) -> None:
    """``endpoint=".../v1/"``: the client asks for ``/v1//segment``."""
    refs = [[0.2, 0.15, 0.8, 0.85]]
    image = Base64EncodedImage(image_url=PNG_DATA_URI)
    with_slash = md.vl(endpoint=f"{base_url}/v1/", api_key=tenant.key)
    answer = with_slash.segment(image, "ellipse", spatial_refs=refs)
    assert answer == moondream_client(base_url, tenant.key).segment(
        image, "ellipse", spatial_refs=refs
    )
    assert answer["path"].startswith("M")


def test_moondream_stream_is_the_same_answer_in_events(
    base_url: str, tenant: Tenant, worker: None
) -> None:
    client = moondream_client(base_url, tenant.key)
    image = Base64EncodedImage(image_url=PNG_DATA_URI)
    whole = client.segment(image, "ellipse", spatial_refs=[[0.2, 0.15, 0.8, 0.85]])
    events = list(
        client.segment(image, "ellipse", spatial_refs=[[0.2, 0.15, 0.8, 0.85]], stream=True)
    )
    assert events[0] == {"bbox": whole["bbox"]}
    chunks = [event["chunk"] for event in events[1:-1]]
    assert chunks and "".join(chunks) == whole["path"]
    assert events[-1] == {"path": whole["path"], "bbox": whole["bbox"], "completed": True}


@pytest.mark.parametrize(
    ("image_url", "spatial_refs", "status", "message"),
    [
        (PNG_DATA_URI, None, 422, b"text prompts need SEGQ_MODEL=sam3; this server runs grabcut"),
        (PNG_DATA_URI, [[0.5, 0.5], [0.1, 1.5]], 400, b"spatial_refs[1][1]: Input should be"),
        (
            PNG_DATA_URI,
            [[0.5, 0.5], [0.8, 0.1, 0.2, 0.9]],
            422,
            b"spatial_refs[1] must have xMin < xMax",
        ),
        (PNG_DATA_URI, [[0.2, 0.3], [0.2, 0.3]], 422, b"spatial_refs[1] repeats an earlier point"),
        (PNG_DATA_URI, [[0.5]], 400, b"spatial_refs[0] must be"),
        (PNG_DATA_URI, [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]], 422, b"at most one box"),
        (
            "data:image/png;base64," + base64.b64encode(b"not a png").decode(),
            [[0.5, 0.5]],
            415,
            b"image",
        ),
        ("data:image/png;base64,@@@", [[0.5, 0.5]], 400, b"image_url is not valid base64"),
        ("data:image/gif;base64,R0lG", [[0.5, 0.5]], 415, b"image_url must be image/png"),
        (
            "http://127.0.0.1:9/cat.png",
            [[0.5, 0.5]],
            400,
            b"image_url: URL points at a private, loopback",
        ),
        ("http://localhost/cat.png", [[0.5, 0.5]], 400, b"image_url: URL host names this machine"),
        ("ftp://example.com/cat.png", [[0.5, 0.5]], 400, b"image_url: URL must be http"),
    ],
)
def test_moondream_refusals(
    base_url: str,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    image_url: str,
    spatial_refs: Any,
    status: int,
    message: bytes,
) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        moondream_client(base_url, tenant.key).segment(
            Base64EncodedImage(image_url=image_url), "cat", spatial_refs=spatial_refs
        )
    assert refused.value.code == status
    answer = refused.value.read()
    assert message in answer
    assert not NATIVE_FIELD_NAMES.search(answer.decode())
    assert count_jobs(sessions) == (0, 0)
    assert count_files(sessions) == 0


def test_moondream_image_urls_are_fetched_by_the_worker_through_the_guard(
    peer_settings: Settings,
    storage: S3Storage,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loopback is allowed here only so that moto can serve the image; a
    name that resolves to a private address is refused by the worker."""
    loopback = "127.0.0.1/32"
    limits = ImageLimits(
        max_pixels=4_000_000,
        fetch_policy=FetchPolicy(
            max_bytes=2_000_000, timeout_seconds=5, allowed_networks=parse_networks(loopback)
        ),
    )
    storage.put("peer/scene.png", PNG, "image/png")
    image_url = storage.presigned_get_url("peer/scene.png", 600)
    assert image_url.startswith("http://127.0.0.1:")
    dns = fake_dns(monkeypatch)
    dns.set("cats.segq.test", ["10.1.2.3"])
    app = create_app(
        replace(peer_settings, fetch_allowed_networks=loopback), storage=storage, celery=celery_app
    )
    refs = [[0.2, 0.15, 0.8, 0.85]]
    with grabcut_worker(celery_app, sessions, storage, limits=limits), serving(app) as url:
        client = moondream_client(url, tenant.key)
        by_url = client.segment(Base64EncodedImage(image_url=image_url), "x", spatial_refs=refs)
        inline = client.segment(Base64EncodedImage(image_url=PNG_DATA_URI), "x", spatial_refs=refs)
        with pytest.raises(urllib.error.HTTPError) as refused:
            client.segment(
                Base64EncodedImage(image_url="http://cats.segq.test/cat.png"),
                "x",
                spatial_refs=refs,
            )
    assert by_url == inline
    assert refused.value.code == 422
    message = json.loads(refused.value.read())["error"]["message"]
    assert message.endswith(
        "failed: fileUrl: cats.segq.test resolves to a private, loopback or reserved address"
    )
    assert dns.asked == ["cats.segq.test"]


def test_moondream_bad_or_missing_key(base_url: str, tenant: Tenant) -> None:
    for key in ("segq_not-a-key", None):
        with pytest.raises(urllib.error.HTTPError) as refused:
            moondream_client(base_url, key).segment(
                Base64EncodedImage(image_url=PNG_DATA_URI), "cat", spatial_refs=[[0.5, 0.5]]
            )
        assert refused.value.code == 401
        assert b"X-Moondream-Auth" in refused.value.read()


# The embedded default


def test_both_clients_on_the_embedded_default(tmp_path: Path) -> None:
    settings = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path)})
    engine = make_engine(settings.database_url)
    upgrade_to_head(engine)
    with make_session_factory(engine).begin() as session:
        _, key = create_project(session, "local")
    worker_app = create_worker_app(settings)
    with (
        start_worker(worker_app, pool="solo", perform_ping_check=False, shutdown_timeout=10),
        serving(create_app(settings)) as url,
    ):
        livepeer = livepeer_call(url, key, box=json.dumps(BOX), multimask_output=False)
        moondream = moondream_client(url, key).segment(
            Base64EncodedImage(image_url=PNG_DATA_URI),
            "ellipse",
            spatial_refs=[[0.2, 0.15, 0.8, 0.85]],
        )
    engine.dispose()
    [mask] = np.array(json.loads(livepeer.masks)) == 1.0
    truth = scene(WIDTH, HEIGHT)[1]
    assert (mask & truth).sum() / (mask | truth).sum() > 0.8
    # SEGQ_MODEL unset: the route cannot know the engine gives logits, and asks for none.
    assert json.loads(livepeer.logits) == []
    assert moondream["path"].startswith("M") and moondream["bbox"]["x_min"] < 0.5


def test_livepeer_answer_over_its_bound_is_413_before_the_job_runs(
    peer_settings: Settings,
    storage: S3Storage,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    worker: None,
) -> None:
    # Three 0.0/1.0 masks of 160 x 120 take up to 290 KB as the answer's
    # JSON, one 97 KB.
    app = create_app(
        replace(peer_settings, max_answer_bytes=200_000), storage=storage, celery=celery_app
    )
    with sessions.begin() as session:
        _, key = create_project(session, "acme")
    with serving(app) as url:
        answer = requests.post(
            f"{url}/segment-anything-2",
            headers={"Authorization": f"Bearer {key}"},
            files={"image": ("a.png", PNG, "image/png")},
            data={"box": json.dumps(BOX)},
            timeout=10,
        )
        assert answer.status_code == 413, answer.text[:300]
        assert "SEGQ_MAX_ANSWER_BYTES" in answer.json()["detail"]["msg"]
        assert count_jobs(sessions) == (0, 0)
        one = livepeer_call(url, key, box=json.dumps(BOX), multimask_output=False)
    assert np.asarray(json.loads(one.masks)).shape == (1, HEIGHT, WIDTH)
