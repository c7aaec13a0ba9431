"""Text prompts as each client of segq meets them, on a server with
SEGQ_MODEL=sam3 and a tiny random SAM 3 (built once for the module): ``segq
submit --text``, the Python client's ``segment_text``, a webhook's bodies
and the event stream, and the job viewer in headless Chromium (the phrase
listed with its prompt, its exemplars drawn, each instance in its own
colour, scores in the table). The masks are the engine's own for the same
image and phrase."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery import Celery
from click.testing import CliRunner
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from segq.cli.main import main
from segq.client import ExemplarBox, SegqClient, TextPrompt, prompt_segments
from segq.engine_catalogue import SAM3_MASK_THRESHOLD
from segq.settings import Settings
from segq.storage import S3Storage
from segq.worker.engines.base import Candidate, Concept
from segq.worker.engines.sam3 import Sam3Engine, load_sam3
from segq.worker.pipeline import ItemOutcome
from tests.support.browser import BrowserSession
from tests.support.images import encode, scene
from tests.support.in_process_workers import engine_worker, run_job_item
from tests.support.tenants import Tenant
from tests.support.tiny_sam3 import save_tiny_sam3
from tests.worker.test_webhooks import (
    ALL_EVENTS,
    LOOPBACK,
    Receiver,
    all_settled,
    drain,
    rules,
    secret_of,
    without_urls,
)

# The webhook receiver fixture, shared (an explicit re-export: pytest finds it here).
from tests.worker.test_webhooks import receiver as receiver

pytestmark = pytest.mark.model

WIDTH, HEIGHT = 130, 90
#: The tiny SAM 3 answers at most this many instances (its num_queries).
TINY_QUERIES = 12


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Sam3Engine:
    snapshot = save_tiny_sam3(tmp_path_factory.mktemp("sam3") / "sam3")
    return Sam3Engine(load_sam3(snapshot, "cpu"), "sam3")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The API of a SAM 3 deployment (it takes text prompts), whose
    webhooks may reach the receiver on loopback."""
    return replace(settings, model="sam3", webhook_allowed_networks=LOOPBACK)


@pytest.fixture
def sam3_worker(
    celery_app: Celery, sessions: sessionmaker[Session], storage: S3Storage, engine: Sam3Engine
) -> Iterator[None]:
    with engine_worker(celery_app, sessions, storage, engine):
        yield


def image() -> np.ndarray[Any, np.dtype[np.uint8]]:
    return scene(WIDTH, HEIGHT)[0]


def concept(
    text: str,
    *,
    max_segments: int,
    score_threshold: float,
    exemplars: list[ExemplarBox] | None = None,
) -> Concept:
    """What the API makes of a text prompt, in pixels, for the engine itself."""
    boxes = exemplars or []
    return Concept(
        text,
        np.array(
            [
                [b["xMin"] * WIDTH, b["yMin"] * HEIGHT, b["xMax"] * WIDTH, b["yMax"] * HEIGHT]
                for b in boxes
            ],
            dtype=np.float64,
        ).reshape(-1, 4),
        np.array([b["label"] for b in boxes], dtype=np.int64),
        score_threshold=score_threshold,
        mask_threshold=SAM3_MASK_THRESHOLD,
        max_segments=max_segments,
    )


def assert_instances(
    segments: list[dict[str, Any]], expected: list[Candidate], masks: list[Any]
) -> None:
    """The segments are the engine's instances, best first: scores, masks."""
    assert len(segments) == len(expected) == len(masks)
    scores = [segment["score"] for segment in segments]
    assert scores == sorted(scores, reverse=True)
    for segment, candidate, mask in zip(segments, expected, masks, strict=True):
        assert segment["score"] == pytest.approx(candidate.score, abs=1e-6)
        assert np.array_equal(mask, candidate.mask)
        assert set(segment["boundingBox"]) == {"xMin", "yMin", "xMax", "yMax"}


# -- segq submit --text --------------------------------------------------


@pytest.fixture
def segq(
    live_server: str, tenant: Tenant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    return CliRunner(
        env={"SEGQ_URL": live_server, "SEGQ_PROJECT": tenant.name, "SEGQ_API_KEY": tenant.key}
    )


def test_submit_text_finds_every_instance_of_each_phrase(
    segq: CliRunner, sam3_worker: None, tmp_path: Path, engine: Sam3Engine
) -> None:
    (tmp_path / "a.png").write_bytes(encode(image()))
    done = segq.invoke(
        main,
        [
            "submit", "a.png", "--point", "0.5,0.5", "--text", "cat", "--text", "dog",
            "--max-segments", "3", "--score-threshold", "0", "--json",
        ],
        catch_exceptions=False,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    [outcome] = json.loads(done.stdout)["images"]
    assert outcome["status"] == "Completed"
    result = json.loads(Path(outcome["result"]).read_text())
    # The clicks are prompt 0, then each --text in order.
    assert result["request"]["prompts"] == [
        {"points": [{"x": 0.5, "y": 0.5, "label": 1}]},
        {"text": "cat"},
        {"text": "dog"},
    ]
    assert result["request"]["textOptions"] == {"scoreThreshold": 0.0, "maxSegments": 3}
    segments = result["segments"]
    assert [s["promptIndex"] for s in segments] == [0, 1, 1, 1, 2, 2, 2]
    masks = [np.asarray(Image.open(path)) == 255 for path in outcome["masks"]]
    assert len(masks) == len(segments)
    cats, dogs = engine.segment_concepts(
        image(),
        [concept(t, max_segments=3, score_threshold=0.0) for t in ("cat", "dog")],
    )
    assert_instances(segments[1:4], cats, masks[1:4])
    assert_instances(segments[4:], dogs, masks[4:])


def test_submit_text_with_exemplars_sends_them_with_the_phrase(
    segq: CliRunner, sam3_worker: None, tmp_path: Path, engine: Sam3Engine
) -> None:
    (tmp_path / "a.png").write_bytes(encode(image()))
    done = segq.invoke(
        main,
        [
            "submit", "a.png", "--text", "red car", "--exemplar", "0.1,0.1,0.5,0.6",
            "--exemplar", "0.6,0.2,0.9,0.9,0", "--score-threshold", "0", "--json",
        ],
        catch_exceptions=False,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    [outcome] = json.loads(done.stdout)["images"]
    result = json.loads(Path(outcome["result"]).read_text())
    exemplars: list[ExemplarBox] = [
        {"xMin": 0.1, "yMin": 0.1, "xMax": 0.5, "yMax": 0.6, "label": 1},
        {"xMin": 0.6, "yMin": 0.2, "xMax": 0.9, "yMax": 0.9, "label": 0},
    ]
    assert result["request"]["prompts"] == [{"text": "red car", "boxes": exemplars}]
    [expected] = engine.segment_concepts(
        image(),
        [concept("red car", max_segments=256, score_threshold=0.0, exemplars=exemplars)],
    )
    masks = [np.asarray(Image.open(path)) == 255 for path in outcome["masks"]]
    assert_instances(result["segments"], expected, masks)


def test_submit_refuses_text_arguments_it_can_tell_are_wrong(
    segq: CliRunner, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(encode(image()))
    cases = {
        ("--text", "   "): "cannot be blank",
        ("--text", "cat", "--text", "dog", "--exemplar", "0.1,0.1,0.5,0.5"): "exactly one --text",
        ("--exemplar", "0.1,0.1,0.5,0.5"): "exactly one --text",
        ("--text", "cat", "--exemplar", "10,10,50,50"): "normalized",
        ("--text", "cat", "--exemplar", "0.1,0.1,0.5,0.5,2"): "a label is 1",
        ("--text", "cat", "--max-segments", "10000"): "--max-segments",
        ("--text", "cat", "--score-threshold", "1.5"): "--score-threshold",
    }
    for arguments, message in cases.items():
        refused = segq.invoke(main, ["submit", "a.png", *arguments])
        assert refused.exit_code == 2, (arguments, refused.output)
        assert message in " ".join(refused.output.split()), (arguments, refused.output)
    # Nothing reached the server.
    assert not (tmp_path / "segq-out").exists()


# -- the Python client ---------------------------------------------------


def test_the_client_segments_text_and_reads_each_prompts_instances(
    live_server: str, tenant: Tenant, sam3_worker: None, engine: Sam3Engine
) -> None:
    exemplars: list[ExemplarBox] = [
        {"xMin": 0.2, "yMin": 0.15, "xMax": 0.8, "yMax": 0.85, "label": 1}
    ]
    dog: TextPrompt = {"text": "dog", "boxes": exemplars}
    with SegqClient(live_server, tenant.name, tenant.key) as client:
        file_id = client.upload(encode(image()), name="a.png")["id"]
        job = client.segment_text(
            [file_id],
            "cat",
            dog,
            text_options={"scoreThreshold": 0.0, "maxSegments": 2},
            outputs=["mask", "rle"],
            wait=60,
        )
        if job["status"] != "Completed":
            job = client.wait(job["jobId"], timeout=60)
        assert job["status"] == "Completed", job
        assert job["prompt"]["prompts"] == [{"text": "cat"}, dog]
        # SAM 3's mask threshold filled in, the rest as asked.
        assert job["textOptions"] == {
            "scoreThreshold": 0.0,
            "maskThreshold": SAM3_MASK_THRESHOLD,
            "maxSegments": 2,
        }
        [item] = job["items"]
        cats, dogs = engine.segment_concepts(
            image(),
            [
                concept("cat", max_segments=2, score_threshold=0.0),
                concept("dog", max_segments=2, score_threshold=0.0, exemplars=exemplars),
            ],
        )
        for index, expected in enumerate((cats, dogs)):
            found = prompt_segments(item, index)
            assert all("rle" in segment for segment in found)
            assert_instances(found, expected, [client.mask_array(s) for s in found])
        assert prompt_segments(item, 2) == []

        with pytest.raises(ValueError, match="at least one phrase"):
            client.segment_text([file_id])


# -- webhooks and the event stream -----------------------------------------


def test_a_text_jobs_webhooks_and_events_carry_its_instances(
    live_server: str,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    receiver: Receiver,
    engine: Sam3Engine,
) -> None:
    file_id = tenant.upload(encode(image()), "a.png").json["id"]
    created = tenant.post_job(
        {
            "items": [{"fileId": file_id}],
            "text": "cat",
            "textOptions": {"scoreThreshold": 0.0, "maxSegments": 3},
            "webhook": {"url": f"{receiver.url}/hook", "events": ALL_EVENTS},
        }
    )
    assert created.status_code == 200, created.json
    job_id = created.json["jobId"]
    outcome, _ = run_job_item(sessions, storage, engine, job_id)
    assert outcome == ItemOutcome.COMPLETED
    drain(sessions, rules(), all_settled(sessions))

    verifier = Webhook(secret_of(tenant))
    verified = [verifier.verify(r.body, r.headers) for r in receiver.received]
    payloads = {payload["type"]: payload for payload in verified}
    assert sorted(payloads) == ["item.completed", "job.completed", "job.started"]
    job = tenant.get_job(job_id).json
    [expected] = engine.segment_concepts(
        image(), [concept("cat", max_segments=3, score_threshold=0.0)]
    )
    [item] = job["items"]
    assert len(item["segments"]) == len(expected) == 3
    shown = [
        {key: segment[key] for key in ("promptIndex", "score", "boundingBox", "area")}
        for segment in item["segments"]
    ]
    assert [s["promptIndex"] for s in shown] == [0, 0, 0]
    assert [s["score"] for s in shown] == pytest.approx([c.score for c in expected], abs=1e-6)
    # The finished job's body is its GET without links, the phrase and options included.
    finished = payloads["job.completed"]["data"]
    assert finished == without_urls(job)
    assert finished["prompt"]["text"] == "cat" and finished["textOptions"]["maxSegments"] == 3
    [hooked_item] = payloads["item.completed"]["data"]["items"]
    assert [
        {key: segment[key] for key in ("promptIndex", "score", "boundingBox", "area")}
        for segment in hooked_item["segments"]
    ] == shown

    # The event stream tells the same, as the client reads it.
    with SegqClient(live_server, tenant.name, tenant.key) as client:
        events = list(client.events(job_id))
    assert [event.type for event in events] == ["job.started", "item.completed", "job.completed"]
    # An item event's job state is the job's when the stream renders it
    # (here, finished); its item and progress are the webhook's.
    for key in ("items", "progress", "prompt", "textOptions"):
        assert events[1].data[key] == payloads["item.completed"]["data"][key], key
    assert events[2].data == finished


# -- the viewer ------------------------------------------------------------


@pytest.mark.slow
def test_the_viewer_shows_each_phrase_with_its_prompt_and_colours_instances_apart(
    live_server: str,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    engine: Sam3Engine,
    browser: BrowserSession,
) -> None:
    file_id = tenant.upload(encode(image()), "street.png").json["id"]
    exemplars = [
        {"xMin": 0.1, "yMin": 0.1, "xMax": 0.4, "yMax": 0.5, "label": 1},
        {"xMin": 0.5, "yMin": 0.5, "xMax": 0.9, "yMax": 0.9, "label": 0},
    ]
    created = tenant.post_job(
        {
            "items": [{"fileId": file_id}],
            "prompts": [
                {"points": [{"x": 0.5, "y": 0.5, "label": 1}]},
                {"text": "person", "boxes": exemplars},
            ],
            # Every query of the tiny model: more instances than the palette's ten colours.
            "textOptions": {"scoreThreshold": 0.0, "maxSegments": TINY_QUERIES},
        }
    )
    assert created.status_code == 200, created.json
    outcome, _ = run_job_item(sessions, storage, engine, created.json["jobId"])
    assert outcome == ItemOutcome.COMPLETED
    job = tenant.get_job(created.json["jobId"]).json
    segments = job["items"][0]["segments"]
    assert [s["promptIndex"] for s in segments] == [0] + [1] * TINY_QUERIES

    page = browser.new_page(viewport={"width": 1000, "height": 900}, device_scale_factor=1)
    page.goto(live_server + job["viewUrl"])
    page.wait_for_selector("body[data-status='Completed'][data-images-loaded='true']")
    card = page.locator("section.item[data-position='0']")

    # The phrase, listed with its prompt and what it found.
    [listed] = card.locator("ul.prompt-list li").all()
    assert listed.get_attribute("data-prompt") == "1"
    assert listed.locator("q.phrase").inner_text() == "person"
    assert f"{TINY_QUERIES} found" in listed.inner_text()
    assert "1 example(s), 1 counter-example(s)" in listed.inner_text()
    # Its exemplars drawn where they are, apart from the click prompt.
    stage = card.locator("svg.stage")
    positive = stage.locator("rect.prompt-exemplar.positive[data-prompt='1']")
    negative = stage.locator("rect.prompt-exemplar.negative[data-prompt='1']")
    assert (positive.count(), negative.count()) == (1, 1)
    assert float(positive.get_attribute("x") or "nan") == pytest.approx(0.1 * WIDTH)
    assert float(negative.get_attribute("width") or "nan") == pytest.approx(0.4 * WIDTH)
    assert stage.locator("circle.prompt-point.foreground[data-prompt='0']").count() == 1

    # Each row: the prompt (by its phrase for a text prompt) and the score.
    rows = card.locator("table.segments tr[data-segment]")
    assert rows.count() == len(segments)
    for index, segment in enumerate(segments):
        cells = rows.nth(index).locator("td")
        assert cells.nth(1).inner_text() == ("0" if index == 0 else "1 “person”")
        assert cells.nth(2).inner_text() == f"{segment['score']:.3f}"
    # Every segment in a colour of its own, past the palette too; each
    # mask tinted in its row's colour.
    colours = [
        stage.locator(f"g.segment[data-segment='{index}']").get_attribute("data-colour")
        for index in range(len(segments))
    ]
    assert len(set(colours)) == len(segments)
    for index, colour in enumerate(colours):
        assert colour is not None and len(colour) == 7 and colour.startswith("#")
        group = stage.locator(f"g.segment[data-segment='{index}']")
        assert group.locator("rect.tint").get_attribute("fill") == colour
        assert rows.nth(index).locator(".swatch").get_attribute("data-colour") == colour

    # A job's top-level text is its prompt 0, listed and named alike.
    created = tenant.post_job(
        {"items": [{"fileId": file_id}], "text": "cat", "textOptions": {"maxSegments": 2}}
    )
    assert created.status_code == 200, created.json
    run_job_item(sessions, storage, engine, created.json["jobId"])
    top_level = tenant.get_job(created.json["jobId"]).json
    found = len(top_level["items"][0]["segments"])
    page.goto(live_server + top_level["viewUrl"])
    page.wait_for_selector("body[data-status='Completed'][data-images-loaded='true']")
    [listed] = page.locator("ul.prompt-list li").all()
    assert listed.get_attribute("data-prompt") == "0"
    # (A <q>'s quotation marks are the browser's, not its text.)
    assert listed.inner_text() == f"prompt 0 cat {found} found"
    named = page.locator("table.segments tr[data-segment] td:nth-child(2)").all_inner_texts()
    assert named == ["0 “cat”"] * found
