"""The job viewer: its signed link in the job, the guards on it, and the page
as a person sees it in headless Chromium (the masks' pixels on screen
against the masks themselves, and a toggle that hides a segment)."""

from __future__ import annotations

import io
import time
from typing import Any
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import requests
from celery import Celery
from flask import Flask
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from segq.api.view_links import ViewLinks
from segq.storage import S3Storage
from tests.support.browser import BrowserSession
from tests.support.images import encode, scene, scene_prompt_body
from tests.support.in_process_workers import grabcut_worker
from tests.support.tenants import Tenant


def wait_finished(tenant: Tenant, job_id: int, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = tenant.get_job(job_id).json
        if job["status"] in ("Completed", "Failed", "Canceled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def token_of(view_url: str) -> str:
    return parse_qs(urlparse(view_url).query)["token"][0]


def test_the_job_carries_a_signed_view_link_that_opens_only_its_job(
    app: Flask, tenant: Tenant, other_tenant: Tenant
) -> None:
    file_id = tenant.upload(encode(scene(120, 90)[0]), "a.png", externalId="cam/1").json["id"]
    first = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    second = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    view_url = tenant.get_job(first).json["viewUrl"]
    assert view_url.startswith(tenant.url(f"/context/vision/segment/{first}/view?token="))

    page = tenant.client.get(view_url)
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Referrer-Policy"] == "no-referrer"
    html = page.get_data(as_text=True)
    assert "/static/viewer/job_view.js" in html and "http" not in html.replace("http-equiv", "")

    token = token_of(view_url)
    data = tenant.client.get(tenant.url(f"/context/vision/segment/{first}/view/job?token={token}"))
    assert data.status_code == 200
    view = data.json
    assert view["jobId"] == first and view["status"] == "Queued" and view["refreshAfter"] == 1
    [item] = view["items"]
    assert item["fileExternalId"] == "cam/1" and (item["width"], item["height"]) == (120, 90)
    assert item["fileName"] == "a.png"  # what the page titles the item by
    assert requests.get(item["imageUrl"], timeout=10).content == encode(scene(120, 90)[0])

    # The assets are served by segq itself.
    for asset in ("job_view.js", "job_view.css"):
        assert tenant.client.get(f"/static/viewer/{asset}").status_code == 200

    def status(path: str) -> int:
        answer = tenant.client.get(path)
        assert answer.json is not None and "error" in answer.json
        return int(answer.status_code)

    view_path = tenant.url(f"/context/vision/segment/{first}/view")
    assert status(view_path) == 401
    assert status(f"{view_path}/job") == 401
    assert status(f"{view_path}?token={token[:-2]}xx") == 403
    # A token opens its own job only, under its own project only.
    assert status(tenant.url(f"/context/vision/segment/{second}/view?token={token}")) == 403
    assert status(other_tenant.url(f"/context/vision/segment/{first}/view?token={token}")) == 404
    settings = app.extensions["segq"].settings
    expired = ViewLinks(settings.secret_key, None, -5).token(tenant_project_id(tenant), first)
    assert status(f"{view_path}?token={expired}") == 403
    # Signed with another key: not ours.
    forged = ViewLinks("another-secret", None, 3600).token(tenant_project_id(tenant), first)
    assert status(f"{view_path}?token={forged}") == 403


def tenant_project_id(tenant: Tenant) -> int:
    from segq.models import Project

    services = tenant.client.application.extensions["segq"]
    with services.sessions() as session:
        project = session.query(Project).filter_by(name=tenant.name).one()
        return int(project.id)


@pytest.fixture
def finished_job(
    tenant: Tenant, celery_app: Celery, sessions: sessionmaker[Session], storage: S3Storage
) -> tuple[dict[str, Any], npt.NDArray[np.uint8]]:
    """A job of two items run by a real worker: the first completed with a
    known mask, the second failed (its file deleted before a worker ran it)."""
    pixels = scene(200, 150)[0]
    kept = tenant.upload(encode(pixels), "scene.png", externalId="scene").json["id"]
    doomed = tenant.upload(encode(scene(80, 60, seed=3)[0]), "gone.png").json["id"]
    body = {**scene_prompt_body(kept), "items": [{"fileId": kept}, {"fileId": doomed}]}
    created = tenant.post_job(body).json
    deleted = tenant.client.delete(tenant.url(f"/files/{doomed}"), headers=tenant.headers)
    assert deleted.status_code == 204
    with grabcut_worker(celery_app, sessions, storage):
        job = wait_finished(tenant, created["jobId"])
    assert job["status"] == "Completed" and job["progress"]["failed"] == 1
    return job, pixels


def screenshot(page: Any, locator: Any) -> npt.NDArray[np.int16]:
    """The element's pixels at its drawn size (a clip of the page: an
    element's own screenshot rounds a fractional box outward)."""
    box = locator.bounding_box()
    width, height = (int(locator.get_attribute(name)) for name in ("width", "height"))
    clip = {"x": round(box["x"]), "y": round(box["y"]), "width": width, "height": height}
    shot = Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB")
    return np.asarray(shot).astype(np.int16)


@pytest.mark.slow
def test_the_page_draws_each_mask_over_its_image_and_toggles_hide_them(
    live_server: str,
    finished_job: tuple[dict[str, Any], npt.NDArray[np.uint8]],
    browser: BrowserSession,
) -> None:
    job, pixels = finished_job
    [segment] = job["items"][0]["segments"]
    mask_png = requests.get(segment["mask"]["url"], timeout=10).content
    mask = np.asarray(Image.open(io.BytesIO(mask_png))) == 255
    assert 0.05 < mask.mean() < 0.6
    # Away from the outline drawn on the mask's edge.
    kernel = np.ones((7, 7), np.uint8)
    inside = cv2.erode(mask.astype(np.uint8), kernel) > 0
    outside = cv2.dilate(mask.astype(np.uint8), kernel) == 0
    original = pixels.astype(np.int16)

    page = browser.new_page(viewport={"width": 1000, "height": 900}, device_scale_factor=1)
    page.goto(live_server + job["viewUrl"])
    page.wait_for_selector("body[data-status='Completed'][data-images-loaded='true']")

    # Each item is titled by its file's name, then its externalId.
    kept = page.locator("section.item[data-position='0'] h2")
    assert kept.locator(".file-name").inner_text() == "#0 scene.png"
    assert kept.locator(".external-id").inner_text() == "scene"
    # The failed item shows its error; the finished one its segment's figures.
    failed = page.locator("section.item[data-position='1']")
    assert "the file was deleted before the item ran" in failed.inner_text()
    row = page.locator("section.item[data-position='0'] table.segments tr[data-segment='0']")
    assert f"{segment['score']:.3f}" in row.inner_text()
    assert f"{segment['area'] * 100:.2f} %" in row.inner_text()
    assert row.locator("td").nth(1).inner_text() == "0"  # promptIndex
    # The prompt: one foreground point and a box.
    stage = page.locator("svg.stage[data-position='0']")
    assert stage.locator("circle.prompt-point.foreground").count() == 1
    assert stage.locator("rect.prompt-box").count() == 1

    page.locator("input[name='prompts-0']").uncheck()
    shown = screenshot(page, stage)
    assert shown.shape == (*mask.shape, 3)
    colour = stage.locator("g.segment[data-segment='0']").get_attribute("data-colour")
    assert colour is not None
    tint = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    expected = original * 0.5 + tint * 0.5
    # Inside the mask: the image half-covered by the segment's colour;
    # outside: the image itself.
    assert np.abs(shown[inside] - expected[inside]).mean() < 4
    assert np.abs(shown[outside] - original[outside]).mean() < 3
    assert np.abs(shown[inside] - original[inside]).mean() > 30
    # The row's swatch, as drawn on screen, is the colour the mask is tinted in.
    swatch = screenshot(page, row.locator(".swatch"))
    assert np.abs(swatch[3:9, 3:9] - tint).max() <= 2

    page.locator("input[name='segment-0-0']").uncheck()
    hidden = screenshot(page, stage)
    assert np.abs(hidden - original).mean() < 3


@pytest.mark.slow
def test_a_running_jobs_page_follows_its_progress_without_reload(
    live_server: str,
    tenant: Tenant,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    browser: BrowserSession,
) -> None:
    file_id = tenant.upload(encode(scene(120, 90)[0]), "a.png").json["id"]
    job_id = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    view_url = tenant.get_job(job_id).json["viewUrl"]
    page = browser.new_page()
    page.goto(live_server + view_url)
    page.wait_for_selector("body[data-status='Queued']")
    assert page.locator("#progress-text").inner_text() == "0 of 1 done"
    assert "Waiting for a worker" in page.locator("section.item").inner_text()
    # The first page stays loaded: it polls until the job finishes.
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    with grabcut_worker(celery_app, sessions, storage):
        page.wait_for_selector("body[data-status='Completed']", timeout=60_000)
    assert navigations == []
    assert page.locator("#progress-text").inner_text() == "1 of 1 done"
    assert page.locator("section.item svg g.segment").count() == 1


def test_the_page_shows_the_version_the_job_segmented_after_an_overwrite(
    tenant: Tenant,
) -> None:
    from tests.api.test_file_versions import create_from_metadata, put_bytes

    created = create_from_metadata(tenant, "cam")
    first_bytes = encode(scene(120, 90)[0])
    put_bytes(tenant, created["uploadUrl"], first_bytes)
    job = tenant.post_job(scene_prompt_body(created["id"])).json["jobId"]
    replaced = create_from_metadata(tenant, "cam", overwrite=True)
    put_bytes(tenant, replaced["uploadUrl"], encode(scene(200, 100, seed=1)[0]))

    token = token_of(tenant.get_job(job).json["viewUrl"])
    view = tenant.client.get(tenant.url(f"/context/vision/segment/{job}/view/job?token={token}"))
    [item] = view.json["items"]
    assert requests.get(item["imageUrl"], timeout=10).content == first_bytes
    assert (item["width"], item["height"]) == (None, None)  # the file's now are another image's


def test_the_viewers_json_is_spliced_from_stored_renderings_as_the_model_writes_it(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    """Every output kind, a failed item and a queued one; then an item
    completed before renderings were stored: the body is the model's own
    JSON of itself, byte for byte, and its segments are the job GET's."""
    import json

    from sqlalchemy import select, update

    from segq.api.schemas import JobView
    from segq.job_text import json_text
    from segq.models import JobItem
    from segq.worker.engines.grabcut import GrabCutEngine
    from segq.worker.pipeline import process_item
    from tests.support.in_process_workers import TEST_LIMITS

    kept = tenant.upload(encode(scene(120, 90)[0]), "a.png").json["id"]
    doomed = tenant.upload(encode(scene(80, 60, seed=3)[0]), "gone.png").json["id"]
    waiting = tenant.upload(encode(scene(80, 60, seed=4)[0]), "later.png").json["id"]
    body = {
        **scene_prompt_body(kept),
        "items": [{"fileId": kept}, {"fileId": doomed}, {"fileId": waiting}],
        "outputs": ["polygons", "mask", "rle", "svgPath"],
    }
    created = tenant.post_job(body)
    assert created.status_code == 200, created.json
    job_id = created.json["jobId"]
    assert (
        tenant.client.delete(tenant.url(f"/files/{doomed}"), headers=tenant.headers).status_code
        == 204
    )
    with sessions() as session:
        item_ids = list(
            session.scalars(
                select(JobItem.id).where(JobItem.job_id == job_id).order_by(JobItem.position)
            )
        )
    for item_id in item_ids[:2]:  # the third stays queued
        process_item(
            sessions, storage, GrabCutEngine(), item_id, lease_seconds=60, max_attempts=3,
            limits=TEST_LIMITS,
        )  # fmt: skip
    token = token_of(tenant.get_job(job_id).json["viewUrl"])

    def view() -> bytes:
        answer = tenant.client.get(
            tenant.url(f"/context/vision/segment/{job_id}/view/job?token={token}")
        )
        assert answer.status_code == 200 and answer.mimetype == "application/json"
        return bytes(answer.data)

    spliced = view()
    shown = JobView.model_validate(json.loads(spliced))
    assert (
        spliced
        == (
            json_text(shown.model_dump(mode="json", by_alias=True, exclude_unset=True)) + "\n"
        ).encode()
    )
    items = json.loads(spliced)["items"]
    assert [item["status"] for item in items] == ["Completed", "Failed", "Queued"]
    assert items[0]["segments"] == tenant.get_job(job_id).json["items"][0]["segments"]
    segment = items[0]["segments"][0]
    assert {"polygons", "mask", "rle", "svgPath"} <= set(segment) and "metrics" not in items[0]
    assert (items[0]["width"], items[0]["height"]) == (120, 90)
    assert "segments" not in items[1] and "segments" not in items[2]

    # Rendered here for an item completed before renderings were stored.
    with sessions.begin() as session:
        session.execute(
            update(JobItem).where(JobItem.id == item_ids[0]).values(rendered_result=None)
        )
    assert view() == spliced
