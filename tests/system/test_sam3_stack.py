"""SAM 3 through the whole stack, as users run it: `segq serve` and `segq
worker` processes with ``SEGQ_MODEL=sam3`` and ``SEGQ_MODEL_CHECKPOINT``
naming a tiny random snapshot in facebook/sam3's layout, on Postgres,
Redis and S3 (moto) and on the embedded default. A text job and a mixed
job (a point and a phrase) come back Completed with the masks that the
same snapshot's engine, loaded here, gives for the same image; Moondream's
own client (2.6.1) with ``object`` only gets the best instance, streamed
and not; and OpenAI's client as VLM Run documents it gets every instance."""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import moondream as md
import numpy as np
import openai
import pytest
import requests
from moondream.types import Base64EncodedImage
from PIL import Image
from pydantic import BaseModel

from segq.worker.engines.base import Concept, Prompt
from segq.worker.engines.sam3 import Sam3Engine, load_sam3
from tests.support.images import png_bytes, scene
from tests.support.live_processes import LiveSegq, services_env
from tests.support.tiny_sam3 import save_tiny_sam3

WIDTH, HEIGHT = 130, 90


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sam3(tmp_path_factory.mktemp("weights") / "sam3")


@pytest.fixture(scope="module", params=["postgres-redis-s3", "embedded"])
def deployment(
    request: pytest.FixtureRequest,
    database_url: str,
    s3_endpoint: str,
    snapshot: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveSegq]:
    env = {"SEGQ_MODEL": "sam3", "SEGQ_MODEL_CHECKPOINT": str(snapshot)}
    if request.param == "postgres-redis-s3":
        env |= services_env(database_url, s3_endpoint, "sam3")
    live = LiveSegq(env, tmp_path_factory.mktemp(request.param))
    try:
        yield live
    finally:
        live.stop()


def finished_job(live: LiveSegq, headers: dict[str, str], route: str, body: Any) -> Any:
    created = requests.post(route, json=body, headers=headers, timeout=30)
    assert created.status_code == 200, created.text
    deadline = time.monotonic() + 180
    while True:
        job = requests.get(f"{route}/{created.json()['jobId']}", headers=headers, timeout=30).json()
        if job["status"] in ("Completed", "Failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.3)


def mask_at(url: str) -> np.ndarray[Any, np.dtype[np.bool_]]:
    body = requests.get(url, timeout=30)
    assert body.status_code == 200
    mask: np.ndarray[Any, np.dtype[np.bool_]] = np.equal(
        np.asarray(Image.open(io.BytesIO(body.content))), 255
    )
    return mask


def test_text_and_mixed_jobs_through_serve_and_worker(deployment: LiveSegq, snapshot: Path) -> None:
    name = f"p-{uuid.uuid4().hex[:10]}"
    headers = {"Authorization": f"Bearer {deployment.new_project(name)}"}
    base = f"{deployment.url}/api/v1/projects/{name}"
    uploaded = requests.post(
        f"{base}/files",
        files={"file": ("scene.png", png_bytes(WIDTH, HEIGHT), "image/png")},
        headers=headers,
        timeout=30,
    )
    assert uploaded.status_code == 201, uploaded.text
    file_id = uploaded.json()["id"]
    route = f"{base}/context/vision/segment"

    engine = Sam3Engine(load_sam3(snapshot, "cpu"), "sam3")
    image = scene(WIDTH, HEIGHT)[0]
    cat = Concept("cat", np.zeros((0, 4)), np.zeros(0, dtype=np.int64), 0.3, 0.5, 3)
    [expected] = engine.segment_concepts(image, [cat])
    [clicked] = engine.segment(
        image, Prompt(np.array([[0.5 * WIDTH, 0.5 * HEIGHT]]), np.array([1]), None), False
    )

    text_job = finished_job(
        deployment,
        headers,
        route,
        {"items": [{"fileId": file_id}], "text": "cat", "textOptions": {"maxSegments": 3}},
    )
    assert text_job["status"] == "Completed", text_job.get("failedItems")
    assert text_job["engine"] == "sam3"
    assert text_job["textOptions"] == {
        "scoreThreshold": 0.3,
        "maskThreshold": 0.5,
        "maxSegments": 3,
    }
    segments = text_job["items"][0]["segments"]
    assert len(segments) == len(expected) == 3
    for segment, candidate in zip(segments, expected, strict=True):
        assert segment["promptIndex"] == 0
        assert segment["score"] == pytest.approx(candidate.score, abs=1e-6)
        assert np.array_equal(mask_at(segment["mask"]["url"]), candidate.mask)

    mixed = finished_job(
        deployment,
        headers,
        route,
        {
            "items": [{"fileId": file_id}],
            "prompts": [{"points": [{"x": 0.5, "y": 0.5, "label": 1}]}, {"text": "cat"}],
            "textOptions": {"maxSegments": 3},
        },
    )
    assert mixed["status"] == "Completed", mixed
    segments = mixed["items"][0]["segments"]
    assert [s["promptIndex"] for s in segments] == [0, 1, 1, 1]
    assert np.array_equal(mask_at(segments[0]["mask"]["url"]), clicked.mask)
    # The second job's image was encoded by the first: the worker kept it.
    assert mixed["items"][0]["metrics"]["embedding"] in ("local", "shared")


def test_moondreams_client_with_object_only_gets_the_best_instance(
    deployment: LiveSegq, snapshot: Path
) -> None:
    name = f"p-{uuid.uuid4().hex[:10]}"
    key = deployment.new_project(name)
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(WIDTH, HEIGHT)).decode()
    client = md.vl(endpoint=f"{deployment.url}/v1", api_key=key)
    answer = client.segment(Base64EncodedImage(image_url=data_uri), "cat")

    engine = Sam3Engine(load_sam3(snapshot, "cpu"), "sam3")
    cat = Concept("cat", np.zeros((0, 4)), np.zeros(0, dtype=np.int64), 0.3, 0.5, 1)
    [[best]] = engine.segment_concepts(scene(WIDTH, HEIGHT)[0], [cat])
    assert best.box is not None
    assert answer["bbox"] == pytest.approx(
        {
            "x_min": max(best.box[0], 0) / WIDTH,
            "y_min": max(best.box[1], 0) / HEIGHT,
            "x_max": min(best.box[2], WIDTH) / WIDTH,
            "y_max": min(best.box[3], HEIGHT) / HEIGHT,
        },
        abs=1e-6,
    )
    assert answer["path"].startswith("M") and answer["path"].endswith("Z")
    # Streamed: the same answer in events.
    events = list(client.segment(Base64EncodedImage(image_url=data_uri), "cat", stream=True))
    assert events[-1] == {"path": answer["path"], "bbox": answer["bbox"], "completed": True}


class VlmRunMask(BaseModel):
    """VLM Run's documented answer, as its page's pydantic models read it."""

    label: str
    mask_url: str


class VlmRunSegmentations(BaseModel):
    segmentations: list[VlmRunMask]


def test_openai_client_as_vlm_run_documents_it_through_serve_and_worker(
    deployment: LiveSegq, snapshot: Path
) -> None:
    name = f"p-{uuid.uuid4().hex[:10]}"
    client = openai.OpenAI(
        base_url=f"{deployment.url}/v1/openai", api_key=deployment.new_project(name), max_retries=0
    )
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(WIDTH, HEIGHT)).decode()
    response = client.chat.completions.create(
        model="vlm-agent-1",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Segment all the cats in this image"},
                    {"type": "image_url", "image_url": {"url": data_uri}},
                ],
            }
        ],
        response_format={  # type: ignore[call-overload]
            "type": "json_schema",
            "schema": VlmRunSegmentations.model_json_schema(),
        },
    )
    content = response.choices[0].message.content
    assert content is not None
    answer = VlmRunSegmentations.model_validate_json(content)

    engine = Sam3Engine(load_sam3(snapshot, "cpu"), "sam3")
    cat = Concept("cat", np.zeros((0, 4)), np.zeros(0, dtype=np.int64), 0.3, 0.5, 256)
    [expected] = engine.segment_concepts(scene(WIDTH, HEIGHT)[0], [cat])
    assert len(answer.segmentations) == len(expected) >= 1
    for entry, candidate in zip(answer.segmentations, expected, strict=True):
        assert entry.label == "cat"
        assert np.array_equal(mask_at(entry.mask_url), candidate.mask)
