"""GET of a job from the items' stored renderings (api/job_answers.py,
segq/job_text.py): the same bytes as the response models write, for every
output kind and job state, on Postgres and on SQLite; ETags that change
exactly when the answer does; pages of items that miss and repeat nothing."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner
from flask import Flask, Response, request
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from segq.api.answers import json_document
from segq.api.app import create_app
from segq.api.job_items import items_of
from segq.api.job_views import view_links
from segq.api.schemas import JobResponse
from segq.api.signed_links import SignedLinks, SigningWindow
from segq.cli.main import main
from segq.client import SegqClient
from segq.clock import now_ms
from segq.contract import StoredResult
from segq.db import make_engine, make_session_factory
from segq.job_document import render_job
from segq.job_text import LINK_HOLE, render_result_text
from segq.models import Job, JobItem, JobStatus, Project
from segq.schema_migrations import upgrade_to_head
from segq.settings import Settings
from segq.worker.claims import claim_item, finish_item
from segq.worker_processes import workers_overview
from tests.support.tenants import Tenant, make_tenant

#: A moment well inside one signing window, so that the route's answer and
#: the models' answer are signed in the same window.
FROZEN_MS = 1_800_000_000_000 + 150_000


@pytest.fixture(autouse=True)
def signing_clock(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The signing windows' clock, which a test may move."""
    now = [FROZEN_MS]
    monkeypatch.setattr("segq.api.signed_links.now_ms", lambda: now[0])
    return now


@pytest.fixture
def sqlite_tenant(tmp_path: Path) -> Iterator[tuple[Tenant, sessionmaker[Session]]]:
    """The embedded default: SQLite, the filesystem broker, local-disk storage."""
    settings = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path / "data")})
    engine = make_engine(settings.database_url)
    upgrade_to_head(engine)
    app = create_app(settings)
    sessions = make_session_factory(engine)
    yield make_tenant(app.test_client(), sessions, "acme"), sessions
    engine.dispose()


def _polygon(count: int, *, hole: bool = False, integers: bool = False) -> dict[str, Any]:
    rng = random.Random(count)
    vertices = [
        [rng.randint(0, 1), rng.randint(0, 1)] if integers else [rng.random(), rng.random()]
        for _ in range(count)
    ]
    return {"vertices": vertices, "isHole": hole}


def _segment(job_id: int, item: int, index: int, **parts: Any) -> dict[str, Any]:
    segment: dict[str, Any] = {
        "score": 0.875 if index else 1,
        "boundingBox": {"xMin": 0, "yMin": 0.125, "xMax": 1, "yMax": 0.5},
        "area": 12 if index else 0.3,
    }
    key = f"projects/1/jobs/{job_id}/items/{item}/{index}"
    for part, value in parts.items():
        if part == "mask":
            segment["maskKey"] = f"{key}.png"
        elif part == "logits":
            segment["logitsKey"] = f"{key}.npy"
            segment["logitsShape"] = [256, 256]
        else:
            segment[part] = value
    return segment


def _results(job_id: int, item: int) -> StoredResult:
    """A result with every output kind and the shapes a segment takes."""
    result: dict[str, Any] = {
        "width": 160,
        "height": 120,
        "segments": [
            _segment(
                job_id,
                item,
                0,
                promptIndex=0,
                polygons=[_polygon(40), _polygon(5, hole=True, integers=True)],
                mask=True,
                rle={"counts": [3, 4, 5], "size": [120, 160]},
                svgPath='M0 0L1 1Z "quoted" \\ é',
                logits=True,
            ),
            _segment(job_id, item, 1, promptIndex=None, polygons=[], mask=True),
            {**_segment(job_id, item, 2, rle={"size": [2, 2], "counts": [4]}), "boundingBox": None},
        ],
        "metrics": {"embedding": "computed" if item % 2 else None, "encodeMs": 3, "decodeMs": 1.5},
    }
    # Its segments are built as loose dicts by _segment.
    return cast(StoredResult, result)


REFERENCES: list[dict[str, Any]] = [
    {"fileId": 7},
    {"fileExternalId": 'caméra/0001 "q" \\'},
    {"fileId": 8, "fileExternalId": "x"},
    {"fileInstanceId": {"space": "sp", "externalId": "ü"}},
    {"fileUrl": "https://example.com/a.png?x=1&y=é"},
]


def _project_id(sessions: sessionmaker[Session], tenant: Tenant) -> int:
    with sessions() as session:
        return int(session.scalars(select(Project.id).where(Project.name == tenant.name)).one())


def _make_job(
    sessions: sessionmaker[Session],
    project_id: int,
    items: int,
    *,
    prompt: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    numbered: bool = False,
) -> tuple[int, list[int]]:
    """``numbered``: item i names file i + 1, so that each reference is its own."""
    with sessions.begin() as session:
        now = now_ms()
        job = Job(
            project_id=project_id,
            status="Queued",
            created_time=now,
            status_time=now,
            prompt=prompt or {"points": [{"x": 0.5, "y": 1, "label": 1}], "boundingBox": None},
            options=options or {"multimaskOutput": False},
            webhook=None,
        )
        session.add(job)
        session.flush()
        rows = [
            JobItem(
                job_id=job.id,
                position=position,
                file_ref=(
                    {"fileId": position + 1} if numbered else REFERENCES[position % len(REFERENCES)]
                ),
                status="Queued",
                attempt=0,
            )
            for position in range(items)
        ]
        session.add_all(rows)
        session.flush()
        return job.id, [row.id for row in rows]


def _finish(
    sessions: sessionmaker[Session], job_id: int, item_id: int, position: int, *, fail: str = ""
) -> None:
    claim = claim_item(sessions, item_id, lease_seconds=60, engine_name="grabcut", max_attempts=3)
    assert claim is not None
    result = None if fail else _results(job_id, position)
    assert finish_item(sessions, claim, result=result, error_message=fail or None)


def _model_answer(app: Flask, project: str, job_id: int) -> bytes:
    """The answer as it was written before: the whole job rendered as a
    dict and validated against JobResponse, links signed in the same window."""
    services = app.extensions["segq"]
    links: SignedLinks = services.signed_links
    with app.test_request_context(), services.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        window = links.window()
        document = render_job(job, items_of(session, job), partial(links.link, window=window))
        document["viewUrl"] = view_links().page_url(
            project, job.project_id, job.id, links.expires_time(window)
        )
        if not JobStatus(job.status).finished:
            waiting_for = workers_overview(session, now_ms()).waiting_for(job.engine)
            if waiting_for is not None:
                document["waitingFor"] = waiting_for
        return bytes(json_document(JobResponse, document).get_data())


def _get(tenant: Tenant, job_id: int, query: str = "", **headers: str) -> Any:
    return tenant.client.get(
        tenant.url(f"/context/vision/segment/{job_id}") + query,
        headers={**tenant.headers, **headers},
    )


def _jobs_of_every_state(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> Iterator[tuple[str, int]]:
    project_id = _project_id(sessions, tenant)
    everything = {
        "mode": "everything",
        "everything": {"pointsPerSide": 4, "predIouThresh": 1, "minArea": 0},
        "multimaskOutput": True,
        "outputs": ["polygons", "mask", "rle", "svgPath", "logits"],
    }
    prompts = {
        "points": None,
        "boundingBox": None,
        "prompts": [
            {"points": [{"x": 0, "y": 1, "label": 0}], "boundingBox": None},
            {
                "boundingBox": {"xMin": 0, "yMin": 0, "xMax": 1, "yMax": 0.5},
                "maskInput": {
                    "jobId": 1,
                    "itemIndex": 0,
                    "segmentIndex": 2,
                    "logitsKey": "projects/1/x.npy",
                },
            },
        ],
    }
    queued, _ = _make_job(sessions, project_id, 3, options=everything)
    yield "queued", queued

    running, ids = _make_job(sessions, project_id, 5, prompt=prompts)
    _finish(sessions, running, ids[0], 0)
    _finish(sessions, running, ids[1], 1, fail="the image could not be read: é")
    assert claim_item(sessions, ids[2], lease_seconds=60, engine_name="grabcut", max_attempts=3)
    yield "running", running

    completed, ids = _make_job(sessions, project_id, 5, options=everything)
    for position, item_id in enumerate(ids):
        _finish(sessions, completed, item_id, position)
    yield "completed", completed

    partial_job, ids = _make_job(sessions, project_id, 6)
    for position, item_id in enumerate(ids):
        fail = "" if position % 3 else ("first reason" if position else 'second "reason"')
        _finish(sessions, partial_job, item_id, position, fail=fail)
    yield "partially completed", partial_job

    failed, ids = _make_job(sessions, project_id, 3)
    for position, item_id in enumerate(ids):
        _finish(sessions, failed, item_id, position, fail=f"reason {position % 2}")
    yield "failed", failed

    canceled, ids = _make_job(sessions, project_id, 4, prompt=prompts)
    _finish(sessions, canceled, ids[0], 0)
    running_claim = claim_item(
        sessions, ids[1], lease_seconds=60, engine_name="grabcut", max_attempts=3
    )
    assert running_claim is not None
    answer = tenant.client.post(
        tenant.url(f"/context/vision/segment/{canceled}/cancel"), headers=tenant.headers
    )
    assert answer.status_code == 200, answer.json
    # A running item finishes after the cancel.
    assert finish_item(sessions, running_claim, result=_results(canceled, 1))
    yield "canceled", canceled

    # Completed before results were stored rendered: rendered on reading.
    legacy, ids = _make_job(sessions, project_id, 2)
    for position, item_id in enumerate(ids):
        _finish(sessions, legacy, item_id, position)
    with sessions.begin() as session:
        session.execute(
            update(JobItem).where(JobItem.job_id == legacy).values(rendered_result=None)
        )
    yield "completed, rendered on reading", legacy


def _check_every_state(tenant: Tenant, sessions: sessionmaker[Session]) -> None:
    app = tenant.client.application
    seen = set()
    for state, job_id in _jobs_of_every_state(tenant, sessions):
        answer = _get(tenant, job_id)
        assert answer.status_code == 200, (state, answer.json)
        expected = _model_answer(app, tenant.name, job_id)
        assert answer.get_data() == expected, state
        assert answer.content_type == "application/json"
        # Spliced again, as after a change, from the finished items' texts
        # the first GET kept: the same bytes.
        app.extensions["segq"].job_answers._kept.clear()
        assert _get(tenant, job_id).get_data() == expected, state
        # And the model reads it back as it is.
        document = JobResponse.model_validate_json(answer.get_data())
        assert json.loads(expected) == document.model_dump(
            mode="json", by_alias=True, exclude_unset=True
        )
        seen.add(answer.json["status"])
    assert seen == {"Queued", "Running", "Completed", "Failed", "Canceled"}


def test_answers_are_the_models_bytes_for_every_state_and_output_on_postgres(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    _check_every_state(tenant, sessions)


def test_answers_are_the_models_bytes_for_every_state_and_output_on_sqlite(
    sqlite_tenant: tuple[Tenant, sessionmaker[Session]],
) -> None:
    _check_every_state(*sqlite_tenant)


def test_the_worker_stores_the_rendering_with_link_holes_not_urls(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    job_id, [item_id] = _make_job(sessions, _project_id(sessions, tenant), 1)
    _finish(sessions, job_id, item_id, 0)
    with sessions() as session:
        item = session.get(JobItem, item_id)
        assert item is not None and item.result is not None
        stored = item.rendered_result
    assert stored == render_result_text(item.result)
    assert "http" not in stored and "expiresTime" not in stored
    assert stored.count(LINK_HOLE) == 2 * 3  # two masks and one logits


def _tag(answer: Any) -> str:
    tag = answer.headers["ETag"]
    assert tag.startswith('W/"')
    return str(tag)


def test_the_etag_changes_exactly_when_the_answer_does(
    tenant: Tenant, sessions: sessionmaker[Session], signing_clock: list[int]
) -> None:
    job_id, ids = _make_job(sessions, _project_id(sessions, tenant), 3)
    seen: dict[str, bytes] = {}

    def answer_changed() -> bool:
        answer = _get(tenant, job_id)
        assert answer.status_code == 200
        tag, body = _tag(answer), answer.get_data()
        if tag in seen:
            # The same tag is the same body.
            assert seen[tag] == body
            return False
        assert body not in seen.values()
        seen[tag] = body
        return True

    assert answer_changed()
    assert not answer_changed()
    # A claim, a retry and a lease renewed: nothing a client sees.
    claim = claim_item(sessions, ids[0], lease_seconds=60, engine_name="grabcut", max_attempts=3)
    assert claim is not None
    assert answer_changed()  # the job started: Running, startTime, engine
    assert claim_item(sessions, ids[1], lease_seconds=60, engine_name="grabcut", max_attempts=3)
    with sessions.begin() as session:
        session.execute(
            update(JobItem).where(JobItem.id == ids[1]).values(lease_expires_time=now_ms() + 9)
        )
    assert not answer_changed()
    assert finish_item(sessions, claim, result=_results(job_id, 0))
    assert answer_changed()  # an item completed
    # The next signing window re-signs the links: a new answer, a new tag.
    signing_clock[0] += 300_000
    assert answer_changed()
    assert not answer_changed()
    cancel = tenant.client.post(
        tenant.url(f"/context/vision/segment/{job_id}/cancel"), headers=tenant.headers
    )
    assert cancel.status_code == 200 and "ETag" not in cancel.headers
    assert answer_changed()  # canceled
    assert not answer_changed()


def test_if_none_match_answers_304_with_no_body(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    job_id, ids = _make_job(sessions, _project_id(sessions, tenant), 2)
    first = _get(tenant, job_id)
    tag = _tag(first)
    assert first.headers["Last-Modified"] and first.headers["Retry-After"] == "1"
    for sent in (tag, tag.removeprefix("W/"), f'"other", {tag}', "*"):
        again = _get(tenant, job_id, **{"If-None-Match": sent})
        assert again.status_code == 304, sent
        assert again.get_data() == b""
        assert again.headers["ETag"] == tag and again.headers["Retry-After"] == "1"
    assert _get(tenant, job_id, **{"If-None-Match": '"other"'}).status_code == 200
    _finish(sessions, job_id, ids[0], 0)
    changed = _get(tenant, job_id, **{"If-None-Match": tag})
    assert changed.status_code == 200 and _tag(changed) != tag
    assert changed.json["progress"]["completed"] == 1


def test_the_items_cursor_pages_a_1000_item_job_while_items_complete(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    job_id, ids = _make_job(sessions, _project_id(sessions, tenant), 1000, numbered=True)
    rng = random.Random(26)
    unfinished = list(enumerate(ids))
    rng.shuffle(unfinished)
    # Finish some, and fail one in ten, before the first page and between pages.
    with sessions.begin() as session:
        for position, item_id in unfinished[:600]:
            failed = position % 10 == 0
            session.execute(
                update(JobItem)
                .where(JobItem.id == item_id)
                .values(
                    status="Failed" if failed else "Completed",
                    error_message="bad" if failed else None,
                    result=None if failed else {"width": 1, "height": 1, "segments": []},
                    rendered_result=None if failed else '"segments":[]',
                    finished_time=now_ms(),
                )
            )
    later = unfinished[600:]
    shown: list[dict[str, Any]] = []
    failed_shown: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = "?itemsLimit=97" + (f"&itemsCursor={cursor}" if cursor else "")
        page = _get(tenant, job_id, query)
        assert page.status_code == 200, page.json
        pages += 1
        body = page.json
        assert body["progress"]["total"] == 1000
        shown += body["items"]
        failed_shown += [ref for group in body.get("failedItems", []) for ref in group["items"]]
        for position, item_id in later[:40]:
            _finish(sessions, job_id, item_id, position)
        later = later[40:]
        cursor = body["nextItemsCursor"]
        if cursor is None:
            break
    assert pages == 11
    assert len(shown) + len(failed_shown) == 1000
    # Each item once, in position order (failed ones apart).
    assert [ref["fileId"] for ref in shown] == sorted(ref["fileId"] for ref in shown)
    every = sorted(ref["fileId"] for ref in shown + failed_shown)
    assert every == list(range(1, 1001))
    assert {ref["fileId"] for ref in failed_shown} == {
        position + 1 for position, _ in unfinished[:600] if position % 10 == 0
    }
    # The whole job, unpaged, is the old answer still; a page carries no cursor then.
    whole = _get(tenant, job_id)
    assert "nextItemsCursor" not in whole.json
    assert (
        len(whole.json["items"]) + sum(len(g["items"]) for g in whole.json["failedItems"]) == 1000
    )


def test_a_page_of_items_is_what_the_whole_answer_holds(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    job_id, ids = _make_job(sessions, _project_id(sessions, tenant), 7)
    for position, item_id in enumerate(ids):
        _finish(sessions, job_id, item_id, position, fail="no" if position == 3 else "")
    whole = _get(tenant, job_id).json
    first = _get(tenant, job_id, "?itemsLimit=4").json
    second = _get(tenant, job_id, f"?itemsCursor={first['nextItemsCursor']}").json
    assert second["nextItemsCursor"] is None
    assert first["items"] + second["items"] == whole["items"]
    assert first["failedItems"] == whole["failedItems"] and "failedItems" not in second
    for page in (first, second):
        assert {
            k: v for k, v in page.items() if k not in ("items", "failedItems", "nextItemsCursor")
        } == {k: v for k, v in whole.items() if k not in ("items", "failedItems")}
    # A page's tag is its own.
    assert len({_tag(_get(tenant, job_id, q)) for q in ("", "?itemsLimit=4", "?itemsLimit=5")}) == 3


@pytest.mark.parametrize(
    "query",
    ["?itemsLimit=0", "?itemsLimit=1001", "?itemsLimit=x", "?itemsCursor=!!", "?itemsCursor=MA"],
)
def test_a_bad_items_page_is_400(
    tenant: Tenant, sessions: sessionmaker[Session], query: str
) -> None:
    job_id, _ = _make_job(sessions, _project_id(sessions, tenant), 1)
    answer = _get(tenant, job_id, query)
    assert answer.status_code == 400, answer.json
    assert answer.json["error"]["code"] == 400


def test_links_are_signed_once_a_window_and_expire_no_sooner_than_stated(
    tenant: Tenant, sessions: sessionmaker[Session], signing_clock: list[int]
) -> None:
    job_id, [item_id] = _make_job(sessions, _project_id(sessions, tenant), 1)
    _finish(sessions, job_id, item_id, 0)
    signed: list[str] = []
    storage = tenant.client.application.extensions["segq"].storage
    real = storage.presigned_get_url

    def counting(key: str, expires_in: int) -> str:
        signed.append(key)
        return str(real(key, expires_in))

    storage.presigned_get_url = counting
    mask = _get(tenant, job_id).json["items"][0]["segments"][0]["mask"]
    assert len(signed) == 3
    assert _get(tenant, job_id).json["items"][0]["segments"][0]["mask"] == mask
    assert len(signed) == 3
    window = SigningWindow.now(300)
    assert mask["expiresTime"] == window.start_time + 3600_000
    signing_clock[0] += 300_000
    again = _get(tenant, job_id).json["items"][0]["segments"][0]["mask"]
    assert len(signed) == 6 and again["expiresTime"] == mask["expiresTime"] + 300_000


def test_the_client_asks_again_with_the_etag_and_pages_items(
    live_server: str, tenant: Tenant, sessions: sessionmaker[Session], app: Flask
) -> None:
    answered: list[tuple[str, int]] = []

    @app.after_request
    def _record(response: Response) -> Response:
        if request.method == "GET":
            answered.append((request.query_string.decode(), response.status_code))
        return response

    job_id, ids = _make_job(sessions, _project_id(sessions, tenant), 5, numbered=True)
    with SegqClient(live_server, tenant.name, tenant.key) as client:
        first = client.get_job(job_id)
        assert client.get_job(job_id) == first
        assert [status for _, status in answered] == [200, 304]
        _finish(sessions, job_id, ids[0], 0)
        changed = client.get_job(job_id)
        assert answered[-1][1] == 200 and changed["progress"]["completed"] == 1
        pages = list(client.job_items(job_id, page_size=2))
        assert [len(page["items"]) for page in pages] == [2, 2, 1]
        assert [item["fileId"] for page in pages for item in page["items"]] == [1, 2, 3, 4, 5]
        assert list(client.job_items(job_id, page_size=2)) == pages
        assert [status for _, status in answered[-3:]] == [304, 304, 304]


def test_jobs_watch_polls_a_page_of_one_item_with_the_etag(
    live_server: str, tenant: Tenant, sessions: sessionmaker[Session], app: Flask
) -> None:
    job_id, ids = _make_job(sessions, _project_id(sessions, tenant), 2, numbered=True)
    answered: list[tuple[str, int]] = []

    @app.after_request
    def _record(response: Response) -> Response:
        if request.method == "GET":
            answered.append((request.query_string.decode(), response.status_code))
            if len(answered) == 3:
                for position, item_id in enumerate(ids):
                    _finish(sessions, job_id, item_id, position)
        return response

    runner = CliRunner(
        env={"SEGQ_URL": live_server, "SEGQ_PROJECT": tenant.name, "SEGQ_API_KEY": tenant.key}
    )
    result = runner.invoke(
        main, ["jobs", "watch", str(job_id), "--json", "--no-progress"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["items"]) == 2
    polls, last = answered[:-1], answered[-1]
    assert all(query == "itemsLimit=1" for query, _ in polls)
    assert [status for _, status in polls[:3]] == [200, 304, 304]
    assert polls[3][1] == 200 and last == ("", 200)
