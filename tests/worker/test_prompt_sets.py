"""Many objects per image (``prompts``), SAM's logits as an output, and a
prompt's ``maskInput``: segq's masks against segment_anything's own
SamPredictor called once per prompt on the same image, and the requests
that must be refused before anything is stored or queued.

Float tolerance: scores within 1e-5 of segment_anything's (batching the
decoder changes only the order of float sums); masks equal pixel for
pixel."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from segment_anything.modeling import Sam
from sqlalchemy.orm import Session, sessionmaker

from segq.mask_logits import decode_logits
from segq.models import JobItem
from segq.storage import S3Storage
from segq.worker.engines.base import Prompt
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.engines.sam import SamEngine
from segq.worker.pipeline import ItemOutcome
from tests.support.harness import (
    Tenant,
    assert_job_refused,
    count_jobs,
    queued_messages,
    run_job_item,
    stored_mask,
)
from tests.support.images import png_bytes, scene
from tests.support.tiny_sam import (
    Box,
    PointList,
    as_prompt,
    load_tiny_sam,
    segment_anything_directly,
)

WIDTH, HEIGHT = 130, 90
SCORE_TOLERANCE = 1e-5


#: Mixed shapes, so one job needs several decoder batches: points only (one
#: and two points), a box only, a box with points (one and three points),
#: and a second prompt of an earlier shape to share its batch.
MIXED: list[tuple[PointList, Box]] = [
    ([(97.0, 20.0, 1)], None),
    ([(97.0, 20.0, 1), (10.0, 80.0, 0)], None),
    ([], (12.0, 30.0, 70.0, 88.0)),
    ([(40.0, 60.0, 1)], (12.0, 30.0, 70.0, 88.0)),
    ([(40.0, 60.0, 1), (20.0, 40.0, 0), (65.0, 80.0, 1)], (5.0, 5.0, 120.0, 85.0)),
    ([], (60.0, 10.0, 125.0, 60.0)),
    ([(30.0, 30.0, 1)], None),
]


@pytest.fixture
def tiny_sam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sam:
    return load_tiny_sam(tmp_path, monkeypatch)


def normalized(points: PointList, box: Box) -> dict[str, Any]:
    prompt: dict[str, Any] = {}
    if points:
        prompt["points"] = [
            {"x": x / WIDTH, "y": y / HEIGHT, "label": label} for x, y, label in points
        ]
    if box is not None:
        prompt["boundingBox"] = {
            "xMin": box[0] / WIDTH,
            "yMin": box[1] / HEIGHT,
            "xMax": box[2] / WIDTH,
            "yMax": box[3] / HEIGHT,
        }
    return prompt


@pytest.mark.model
@pytest.mark.parametrize("multimask", [False, True], ids=["one mask", "multimask"])
def test_a_batch_of_prompts_answers_as_segment_anything_does_per_prompt(
    tiny_sam: Sam, multimask: bool
) -> None:
    image, _ = scene(WIDTH, HEIGHT)
    engine = SamEngine(tiny_sam, "tiny")
    answers = engine.segment_batch(image, [as_prompt(p, b) for p, b in MIXED], multimask)
    assert len(answers) == len(MIXED)
    for (points, box), candidates in zip(MIXED, answers, strict=True):
        expected = segment_anything_directly(tiny_sam, image, points, box, multimask)
        assert len(candidates) == (3 if multimask else 1)
        for candidate, (mask, score, logits) in zip(candidates, expected, strict=True):
            assert candidate.score == pytest.approx(score, abs=SCORE_TOLERANCE)
            assert np.array_equal(candidate.mask, mask)
            assert candidate.logits is not None
            assert np.allclose(candidate.logits, logits, atol=1e-4)


@pytest.mark.model
def test_prompts_of_one_shape_share_one_decoder_call(
    tiny_sam: Sam, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven prompts of five shapes: one embedding, five decoder calls."""
    image, _ = scene(WIDTH, HEIGHT)
    engine = SamEngine(tiny_sam, "tiny")
    calls: list[int] = []
    embeds: list[int] = []
    predictor = engine._predictor
    real_predict = predictor.predict_torch

    def counted_predict(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(predictor, "predict_torch", counted_predict)
    tiny_sam.image_encoder.register_forward_hook(lambda *_: embeds.append(1))
    engine.segment_batch(image, [as_prompt(p, b) for p, b in MIXED], False)
    assert len(embeds) == 1
    assert len(calls) == 5


@pytest.mark.model
def test_mask_input_answers_as_segment_anything_does(tiny_sam: Sam) -> None:
    image, _ = scene(WIDTH, HEIGHT)
    engine = SamEngine(tiny_sam, "tiny")
    [(_, _, earlier_logits)] = segment_anything_directly(
        tiny_sam, image, [(97.0, 20.0, 1)], None, False
    )
    refinement = [(97.0, 20.0, 1), (40.0, 60.0, 0)]
    expected = segment_anything_directly(
        tiny_sam, image, refinement, None, False, earlier_logits[None]
    )
    prompt = as_prompt(refinement, None)
    refined = Prompt(prompt.points, prompt.labels, prompt.box, mask_input=earlier_logits[None])
    [[candidate]] = engine.segment_batch(image, [refined], False)
    [(mask, score, _)] = expected
    assert candidate.score == pytest.approx(score, abs=SCORE_TOLERANCE)
    assert np.array_equal(candidate.mask, mask)
    # What makes the comparison worth anything: the mask input changes SAM's answer.
    [(_, unrefined_score, _)] = segment_anything_directly(tiny_sam, image, refinement, None, False)
    assert abs(unrefined_score - score) > 1e-3


def in_pixels(prompt: dict[str, Any]) -> tuple[PointList, Box]:
    """A normalized prompt of a request at the pixels segq puts it (x * W, y * H)."""
    points = [(p["x"] * WIDTH, p["y"] * HEIGHT, p["label"]) for p in prompt.get("points", [])]
    box = prompt.get("boundingBox")
    return points, (
        None
        if box is None
        else (box["xMin"] * WIDTH, box["yMin"] * HEIGHT, box["xMax"] * WIDTH, box["yMax"] * HEIGHT)
    )


def run_item(
    sessions: sessionmaker[Session], storage: S3Storage, engine: Any, job_id: int
) -> JobItem:
    outcome, item = run_job_item(sessions, storage, engine, job_id)
    assert outcome in (ItemOutcome.COMPLETED, ItemOutcome.FAILED)
    return item


@pytest.mark.model
def test_a_job_with_prompts_stores_each_prompt_s_masks_and_logits(
    tiny_sam: Sam, tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    png = png_bytes(WIDTH, HEIGHT, seed=2)
    file_id = tenant.upload(png).json["id"]
    chosen = [MIXED[1], MIXED[2], MIXED[3]]
    prompts = [normalized(p, b) for p, b in chosen]
    body = {
        "items": [{"fileId": file_id}],
        "prompts": prompts,
        "multimaskOutput": True,
        "outputs": ["mask", "logits"],
    }
    created = tenant.post_job(body)
    assert created.status_code == 200, created.json
    assert created.json["prompts"] == body["prompts"]
    job_id = created.json["jobId"]
    item = run_item(sessions, storage, SamEngine(tiny_sam, "tiny"), job_id)
    assert item.result is not None, item.error_message
    segments = item.result["segments"]
    assert [s["promptIndex"] for s in segments] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    for prompt_index, prompt in enumerate(prompts):
        expected = segment_anything_directly(tiny_sam, image, *in_pixels(prompt), True)
        mine = segments[3 * prompt_index : 3 * prompt_index + 3]
        assert [s["score"] for s in mine] == sorted((s["score"] for s in mine), reverse=True)
        for segment, (mask, score, logits) in zip(mine, expected, strict=True):
            assert segment["score"] == pytest.approx(score, abs=1e-5)
            assert np.array_equal(stored_mask(storage, segment["maskKey"]), mask)
            assert f"/prompt-{prompt_index}/" in segment["maskKey"]
            stored_logits = decode_logits(storage.get(segment["logitsKey"]))
            # float16 keeps about three significant digits.
            assert np.allclose(stored_logits, logits, rtol=1e-3, atol=1e-3)

    shown = tenant.get_job(job_id).json
    [shown_item] = shown["items"]
    assert shown["prompt"]["prompts"] == body["prompts"]
    assert [s["promptIndex"] for s in shown_item["segments"]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    logits_link = shown_item["segments"][0]["logits"]
    assert logits_link["format"] == "application/x-npy"
    assert logits_link["shape"] == list(stored_logits.shape)
    assert logits_link["url"].startswith("http")


def test_a_top_level_prompt_is_prompt_zero(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    job_id = tenant.post_job(
        {
            "items": [{"fileId": file_id}],
            "boundingBox": {"xMin": 0.2, "yMin": 0.2, "xMax": 0.8, "yMax": 0.8},
        }
    ).json["jobId"]
    run_item(sessions, storage, GrabCutEngine(), job_id)
    [segment] = tenant.get_job(job_id).json["items"][0]["segments"]
    assert segment["promptIndex"] == 0
    assert "prompts" not in tenant.get_job(job_id).json["prompt"]


def test_grabcut_runs_once_per_prompt(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    prompts = [normalized(*MIXED[2]), normalized(*MIXED[5])]
    job_id = tenant.post_job({"items": [{"fileId": file_id}], "prompts": prompts}).json["jobId"]
    item = run_item(sessions, storage, GrabCutEngine(), job_id)
    assert item.result is not None, item.error_message
    first, second = item.result["segments"]
    assert (first["promptIndex"], second["promptIndex"]) == (0, 1)
    assert not np.array_equal(
        stored_mask(storage, first["maskKey"]), stored_mask(storage, second["maskKey"])
    )


def test_grabcut_refuses_logits_with_a_message_that_says_why(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    job_id = tenant.post_job(
        {"items": [{"fileId": file_id}], "prompts": [normalized(*MIXED[2])], "outputs": ["logits"]}
    ).json["jobId"]
    item = run_item(sessions, storage, GrabCutEngine(), job_id)
    assert item.result is None
    assert item.error_message is not None and "SAM engine" in item.error_message


@pytest.mark.model
def test_a_mask_input_refines_with_an_earlier_segment_s_logits(
    tiny_sam: Sam,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    png = png_bytes(WIDTH, HEIGHT, seed=2)
    file_id = tenant.upload(png).json["id"]
    engine = SamEngine(tiny_sam, "tiny")
    first = [(97.0, 20.0, 1)]
    earlier_id = tenant.post_job(
        {
            "items": [{"fileId": file_id}],
            "prompts": [normalized(first, None)],
            "outputs": ["logits"],
        }
    ).json["jobId"]
    earlier = run_item(sessions, storage, engine, earlier_id)
    assert earlier.result is not None, earlier.error_message
    stored_logits = decode_logits(storage.get(earlier.result["segments"][0]["logitsKey"]))

    refinement = [(97.0, 20.0, 1), (40.0, 60.0, 0)]
    mask_input = {"jobId": earlier_id, "itemIndex": 0, "segmentIndex": 0}
    created = tenant.post_job(
        {
            "items": [{"fileId": file_id}],
            "prompts": [{**normalized(refinement, None), "maskInput": mask_input}],
        }
    )
    assert created.status_code == 200, created.json
    assert created.json["prompts"][0]["maskInput"] == mask_input
    item = run_item(sessions, storage, engine, created.json["jobId"])
    assert item.result is not None, item.error_message
    [segment] = item.result["segments"]

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    [(mask, score, _)] = segment_anything_directly(
        tiny_sam, image, *in_pixels(normalized(refinement, None)), False, stored_logits[None]
    )
    assert segment["score"] == pytest.approx(score, abs=1e-5)
    assert np.array_equal(stored_mask(storage, segment["maskKey"]), mask)


@pytest.mark.model
def test_grabcut_refuses_a_mask_input(
    tiny_sam: Sam, tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    earlier_id = tenant.post_job(
        {"items": [{"fileId": file_id}], "prompts": [normalized(*MIXED[2])], "outputs": ["logits"]}
    ).json["jobId"]
    assert run_item(sessions, storage, SamEngine(tiny_sam, "tiny"), earlier_id).result is not None
    job_id = tenant.post_job(
        {
            "items": [{"fileId": file_id}],
            "prompts": [
                {
                    **normalized(*MIXED[2]),
                    "maskInput": {"jobId": earlier_id, "itemIndex": 0, "segmentIndex": 0},
                }
            ],
        }
    ).json["jobId"]
    item = run_item(sessions, storage, GrabCutEngine(), job_id)
    assert item.result is None
    assert item.error_message is not None and "maskInput needs a SAM engine" in item.error_message


BOX = {"xMin": 0.1, "yMin": 0.1, "xMax": 0.9, "yMax": 0.9}
POINT = {"x": 0.5, "y": 0.5, "label": 1}

BAD_PROMPTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("65 prompts", {"prompts": [{"boundingBox": BOX}] * 65}, 400, "prompts"),
    ("no prompts", {"prompts": []}, 400, "prompts"),
    ("prompts and points", {"prompts": [{"boundingBox": BOX}], "points": [POINT]}, 400, "not both"),
    (
        "prompts and box",
        {"prompts": [{"boundingBox": BOX}], "boundingBox": BOX},
        400,
        "either prompts or the top-level points/boundingBox",
    ),
    ("empty prompt", {"prompts": [{"boundingBox": BOX}, {}]}, 422, "prompts[1]"),
    (
        "inverted box in a prompt",
        {"prompts": [{"boundingBox": {**BOX, "xMin": 0.95}}]},
        422,
        "prompts[0].boundingBox",
    ),
    (
        "repeated point in a prompt",
        {"prompts": [{"points": [POINT, POINT]}]},
        422,
        "prompts[0].points[1]",
    ),
    (
        "too many points in a prompt",
        {"prompts": [{"points": [{"x": i / 100, "y": 0.5} for i in range(40)]}]},
        400,
        "prompts[0].points",
    ),
    (
        "mask input of an unknown job",
        {
            "prompts": [
                {
                    "points": [POINT],
                    "maskInput": {"jobId": 999999, "itemIndex": 0, "segmentIndex": 0},
                }
            ]
        },
        400,
        "prompts[0].maskInput: job 999999 not found",
    ),
]


@pytest.mark.parametrize(
    ("case", "fields", "status", "mentions"), BAD_PROMPTS, ids=[b[0] for b in BAD_PROMPTS]
)
def test_bad_prompts_are_refused_and_nothing_is_stored_or_queued(
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


def mask_input_body(file_id: int, job_id: int, item: int = 0, segment: int = 0) -> dict[str, Any]:
    return {
        "items": [{"fileId": file_id}],
        "prompts": [
            {
                "points": [POINT],
                "maskInput": {"jobId": job_id, "itemIndex": item, "segmentIndex": segment},
            }
        ],
    }


@pytest.mark.model
def test_a_mask_input_from_another_project_is_answered_as_unknown(
    tiny_sam: Sam,
    tenant: Tenant,
    other_tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    their_file = other_tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    their_job = other_tenant.post_job(
        {"items": [{"fileId": their_file}], "prompts": [{"points": [POINT]}], "outputs": ["logits"]}
    ).json["jobId"]
    assert run_item(sessions, storage, SamEngine(tiny_sam, "tiny"), their_job).result is not None
    unknown_job = their_job + 1000
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    before = count_jobs(sessions)
    queued = queued_messages()

    theirs = tenant.post_job(mask_input_body(file_id, their_job))
    unknown = tenant.post_job(mask_input_body(file_id, unknown_job))
    assert theirs.status_code == unknown.status_code == 400
    assert theirs.json["error"]["message"] == unknown.json["error"]["message"].replace(
        str(unknown_job), str(their_job)
    )
    assert theirs.json["error"]["missing"] == [{"jobId": their_job}]
    assert count_jobs(sessions) == before
    assert queued_messages() == queued


def test_a_mask_input_without_logits_says_which_is_missing(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    file_id = tenant.upload(png_bytes(WIDTH, HEIGHT)).json["id"]
    no_logits = tenant.post_job(
        {"items": [{"fileId": file_id}], "prompts": [{"points": [POINT]}]}
    ).json["jobId"]
    with_logits = tenant.post_job(
        {"items": [{"fileId": file_id}], "prompts": [{"points": [POINT]}], "outputs": ["logits"]}
    ).json["jobId"]
    before = count_jobs(sessions)
    queued = queued_messages()

    answer = tenant.post_job(mask_input_body(file_id, no_logits))
    assert answer.status_code == 422
    assert "was not asked for logits" in answer.json["error"]["message"]
    answer = tenant.post_job(mask_input_body(file_id, with_logits))
    assert answer.status_code == 422
    assert "is Queued, not Completed" in answer.json["error"]["message"]
    answer = tenant.post_job(mask_input_body(file_id, with_logits, item=3))
    assert answer.status_code == 422
    assert f"job {with_logits} has no item 3" in answer.json["error"]["message"]
    assert count_jobs(sessions) == before
    assert queued_messages() == queued
