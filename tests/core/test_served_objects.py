"""Nothing stored is served as a page: every kind of object segq stores
(uploads of each accepted type, through every upload path, hostile ones
included; masks; logits; the parts of an upload never completed), fetched
through every kind of link segq hands out (Cognite's downloadlink, the
job's mask and logits URLs, the viewer's image and mask URLs, Replicate's
prediction output), on local disk (served by segq's own /objects/ route)
and on S3 (pre-signed URLs answered by moto), comes with the type it was
stored as, ``nosniff``, a policy that runs nothing, and as an attachment
unless it is an image a browser shows. Every other answer of the API
carries ``nosniff`` and a policy too. And in Chromium: a hostile upload
opened through its link runs no script."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import requests
from celery import Celery
from flask import Flask
from requests.structures import CaseInsensitiveDict
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.settings import Settings
from segq.storage import LocalStorage, ObjectStorage, S3Storage
from segq.worker.engines.sam import SamEngine
from tests.support.browser import BrowserSession
from tests.support.harness import Tenant, make_tenant, run_job_item, serving
from tests.support.images import HOSTILE_PAGE, hostile_uploads
from tests.support.tiny_sam import load_tiny_sam

#: Types a browser may show as an image; everything else must download.
SHOWN_AS_IMAGES = {"image/png", "image/jpeg"}
#: A variable of a werkzeug rule: ``<converter(args):name>`` or ``<name>``.
RULE_VARIABLE = re.compile(r"<(?:(?P<converter>\w+)(?:\([^)]*\))?:)?(?P<name>\w+)>")
BOX = {"xMin": 0.2, "yMin": 0.2, "xMax": 0.8, "yMax": 0.8}


@dataclass
class Deployment:
    kind: str
    app: Flask
    storage: ObjectStorage
    tenant: Tenant


@pytest.fixture(params=["local-disk", "s3"])
def deployment(
    request: pytest.FixtureRequest,
    settings: Settings,
    storage: S3Storage,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> Deployment:
    if request.param == "s3":
        app = create_app(settings, storage=storage, celery=celery_app)
    else:
        # The embedded default: objects on disk, served by the API itself.
        local = replace(settings, storage_url=(tmp_path / "objects").as_uri())
        app = create_app(local, celery=celery_app)
    served_storage = app.extensions["segq"].storage
    assert isinstance(served_storage, LocalStorage if request.param == "local-disk" else S3Storage)
    tenant = make_tenant(app.test_client(), sessions, "acme")
    return Deployment(request.param, app, served_storage, tenant)


def fetch(deployment: Deployment, url: str) -> tuple[int, CaseInsensitiveDict[str], bytes]:
    """What a client gets from a link: local-disk links are the API's own
    (relative, as no public URL is set here), S3's are moto's."""
    if urlparse(url).scheme:
        answer = requests.get(url, timeout=10)
        return answer.status_code, CaseInsensitiveDict(answer.headers), answer.content
    served = deployment.tenant.client.get(url)
    return served.status_code, CaseInsensitiveDict(served.headers), served.data


def policy_directives(header: str) -> dict[str, str]:
    directives = {}
    for part in header.split(";"):
        name, _, value = part.strip().partition(" ")
        if name:
            directives[name.lower()] = value
    return directives


def assert_runs_nothing(headers: Mapping[str, str]) -> None:
    """``nosniff``, and a policy under which a document loads no script:
    none allowed by name or by default, and sandboxed."""
    assert headers.get("X-Content-Type-Options") == "nosniff", headers
    policy = policy_directives(headers["Content-Security-Policy"])
    assert "sandbox" in policy and policy["sandbox"] == "", policy
    assert policy.get("default-src") == "'none'", policy
    assert "script-src" not in policy and "script-src-elem" not in policy, policy
    assert "unsafe-eval" not in headers["Content-Security-Policy"]


def assert_served_as(
    deployment: Deployment, url: str, media_type: str, data: bytes | None = None
) -> None:
    status, headers, body = fetch(deployment, url)
    assert status == 200, (url, status, body[:200])
    if data is not None:
        assert body == data
    assert headers["Content-Type"] == media_type, (url, headers)
    disposition = headers.get("Content-Disposition", "")
    if media_type in SHOWN_AS_IMAGES:
        assert disposition == "inline", (url, headers)
    else:
        assert disposition.startswith("attachment"), (url, headers)
    if deployment.kind == "local-disk":
        # On the API's own origin: never sniffed, never a page that runs.
        assert_runs_nothing(headers)


def download_link(tenant: Tenant, file_id: int) -> str:
    answer = tenant.client.post(
        tenant.url("/files/downloadlink"), json={"items": [{"id": file_id}]}, headers=tenant.headers
    )
    assert answer.status_code == 200, answer.json
    url: str = answer.json["items"][0]["downloadUrl"]
    return url


def upload_in_parts(tenant: Tenant, data: bytes, name: str, *, complete: bool = True) -> int:
    created = tenant.client.post(
        tenant.url("/files/initmultipartupload?parts=2"),
        json={"name": name},
        headers=tenant.headers,
    )
    assert created.status_code == 201, created.json
    middle = len(data) // 2
    for url, part in zip(created.json["uploadUrls"], (data[:middle], data[middle:]), strict=True):
        assert tenant.client.put(url, data=part).status_code == 200
        if not complete:
            break
    if complete:
        done = tenant.client.post(
            tenant.url("/files/completemultipartupload"),
            json={"id": created.json["id"], "uploadId": created.json["uploadId"]},
            headers=tenant.headers,
        )
        assert done.status_code == 200, done.json
    file_id: int = created.json["id"]
    return file_id


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.mark.model
def test_every_stored_object_through_every_link_is_served_as_it_was_stored(
    deployment: Deployment,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant = deployment.tenant
    hostile = hostile_uploads()
    stored: dict[int, tuple[bytes, str]] = {}

    # Each upload path, each with a hostile file of each accepted type.
    (png, png_type), (jpeg, jpeg_type) = hostile["png-polyglot"], hostile["jpeg-polyglot"]
    uploaded = tenant.upload(png, "page.html")
    assert uploaded.status_code == 201, uploaded.json
    stored[uploaded.json["id"]] = (png, png_type)

    created = tenant.client.post(
        tenant.url("/files"), json={"name": "page.html"}, headers=tenant.headers
    )
    assert created.status_code == 201
    upload_url = created.json["uploadUrl"]
    assert tenant.client.put(upload_url, data=jpeg).status_code == 200
    stored[created.json["id"]] = (jpeg, jpeg_type)
    # An upload URL takes bytes; it never gives them back.
    reread = tenant.client.get(upload_url)
    assert reread.status_code == 405 and reread.mimetype == "application/json"
    assert_runs_nothing(CaseInsensitiveDict(reread.headers))

    after_iend, _ = hostile["png-script-after-iend"]
    stored[upload_in_parts(tenant, after_iend, "parts.png")] = (after_iend, png_type)
    upload_in_parts(tenant, after_iend, "abandoned.png", complete=False)  # a part stays

    after_eoi, _ = hostile["jpeg-script-after-eoi"]
    replicate_file = tenant.client.post(
        "/v1/files",
        data={"content": (io.BytesIO(after_eoi), "photo.jpg", "image/jpeg")},
        headers=tenant.headers,
        content_type="multipart/form-data",
    )
    assert replicate_file.status_code == 201, replicate_file.json
    stored[int(replicate_file.json["id"])] = (after_eoi, jpeg_type)

    for file_id, (data, media_type) in stored.items():
        assert_served_as(deployment, download_link(tenant, file_id), media_type, data)

    # A job on an inline hostile image (stored as a file of the project),
    # run by SAM (a tiny one) so that it stores masks and logits.
    engine = SamEngine(load_tiny_sam(tmp_path, monkeypatch), "tiny")
    job = tenant.post_job(
        {
            "items": [{"imageData": data_url(after_iend, "image/png")}],
            "boundingBox": BOX,
            "outputs": ["mask", "logits"],
        }
    )
    assert job.status_code == 200, job.json
    job_id = job.json["jobId"]
    _, item = run_job_item(sessions, deployment.storage, engine, job_id)
    assert item.result is not None, item.error_message
    shown = tenant.get_job(job_id).json
    [segment] = shown["items"][0]["segments"]
    assert_served_as(deployment, segment["mask"]["url"], "image/png")
    assert_served_as(deployment, segment["logits"]["url"], "application/x-npy")

    # The viewer's links: the item's image and its segment's objects.
    token = shown["viewUrl"].split("token=", 1)[1]
    view = tenant.client.get(
        tenant.url(f"/context/vision/segment/{job_id}/view/job?token={token}")
    ).json
    [viewed] = view["items"]
    assert_served_as(deployment, viewed["imageUrl"], "image/png", after_iend)
    [viewed_segment] = viewed["segments"]
    assert_served_as(deployment, viewed_segment["mask"]["url"], "image/png")
    assert_served_as(deployment, viewed_segment["logits"]["url"], "application/x-npy")

    # Replicate's prediction output.
    prediction = tenant.client.post(
        "/v1/predictions",
        json={
            "version": "v",
            "input": {"image": data_url(jpeg, "image/jpeg"), "box": [5, 5, 40, 30]},
        },
        headers=tenant.headers,
    )
    assert prediction.status_code == 201, prediction.json
    run_job_item(sessions, deployment.storage, engine, int(prediction.json["id"]))
    answered = tenant.client.get(f"/v1/predictions/{prediction.json['id']}", headers=tenant.headers)
    assert answered.json["status"] == "succeeded", answered.json
    for mask_url in answered.json["output"]["masks"]:
        assert_served_as(deployment, mask_url, "image/png")

    # And whatever else is stored (the abandoned upload's part, the
    # inline images' files): each object in storage, through a link, is
    # served as one of the types segq stores, never as anything a browser
    # would run.
    keys = [found.key for found in deployment.storage.list_objects("projects/")]
    assert any(".part" in key for key in keys)
    expected_types = {"image/png", "image/jpeg", "application/x-npy", "application/octet-stream"}
    for key in keys:
        url = deployment.storage.presigned_get_url(key, 60)
        _, headers, _ = fetch(deployment, url)
        assert headers["Content-Type"] in expected_types, (key, headers)
        assert_served_as(deployment, url, headers["Content-Type"])
        if ".part" in key:
            assert headers["Content-Type"] == "application/octet-stream"


def test_every_answer_of_the_api_carries_nosniff_and_a_policy(app: Flask, tenant: Tenant) -> None:
    """Every route of the URL map, asked with and without a key (mostly
    refusals: what matters is that no answer, of any route, lacks them)."""

    def placeholder(match: re.Match[str]) -> str:
        converter, name = match.group("converter"), match.group("name")
        if converter == "path":
            return "projects/1/files/x"
        if converter == "id":
            return "1"
        return tenant.name if name == "project" else "x"

    answered = 0
    for rule in app.url_map.iter_rules():
        path = RULE_VARIABLE.sub(placeholder, rule.rule)
        assert "<" not in path, path
        for method in sorted((rule.methods or set()) - {"OPTIONS"}):
            for headers in ({}, tenant.headers):
                response = tenant.client.open(path, method=method, headers=headers)
                assert response.headers.get("X-Content-Type-Options") == "nosniff", (method, path)
                assert response.headers.get("Content-Security-Policy"), (method, path)
                answered += 1
    assert answered > 60
    for unknown in ("/nothing", "/v1/nothing", "/api/v1/projects/acme/nothing"):
        response = tenant.client.get(unknown)
        assert_runs_nothing(CaseInsensitiveDict(response.headers))


@pytest.fixture
def local_deployment(
    settings: Settings, celery_app: Celery, sessions: sessionmaker[Session], tmp_path: Path
) -> Iterator[tuple[str, Tenant]]:
    local = replace(settings, storage_url=(tmp_path / "objects").as_uri())
    app = create_app(local, celery=celery_app)
    with serving(app) as url:
        yield url, make_tenant(app.test_client(), sessions, "acme")


def watched_page(browser: BrowserSession) -> tuple[Any, list[str]]:
    """A new page, and what it logs: console messages, errors and dialogs
    (stricter than the ``browser`` fixture's rule: nothing at all)."""
    page = browser.new_page()
    # The browser asks the object's origin for a favicon (moto has none: a
    # 404 on the console that says nothing about the object).
    page.route("**/favicon.ico", lambda route: route.fulfill(status=204))
    seen: list[str] = []
    page.on("console", lambda message: seen.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: seen.append(f"pageerror: {error}"))
    page.on("dialog", lambda dialog: seen.append(f"dialog: {dialog.message}"))
    return page, seen


@pytest.mark.slow
@pytest.mark.parametrize("storage_kind", ["local-disk", "s3"])
def test_a_hostile_upload_opened_through_its_link_runs_no_script(
    storage_kind: str, request: pytest.FixtureRequest, browser: BrowserSession
) -> None:
    if storage_kind == "local-disk":
        root, tenant = request.getfixturevalue("local_deployment")
    else:
        app = request.getfixturevalue("app")
        root, tenant = request.getfixturevalue("live_server"), request.getfixturevalue("tenant")
        assert isinstance(app.extensions["segq"].storage, S3Storage)
    links: dict[str, tuple[str, str]] = {}
    for name, (data, media_type) in hostile_uploads().items():
        uploaded = tenant.upload(data, f"{name}.html")
        assert uploaded.status_code == 201, uploaded.json
        url = download_link(tenant, uploaded.json["id"])
        links[name] = (url if urlparse(url).scheme else root + url, media_type)
    assert HOSTILE_PAGE in requests.get(links["png-polyglot"][0], timeout=10).content

    for name, (url, media_type) in links.items():
        page, console = watched_page(browser)
        answer = page.goto(url)
        assert answer is not None and answer.status == 200
        page.wait_for_load_state("load")
        # No script ran, nothing was logged.
        assert console == [], (name, console)
        assert page.evaluate("window.storedScriptRan === undefined"), name
        assert "STORED SCRIPT RAN" not in page.title(), name
        # Shown as the image it is: the browser's image document.
        assert page.evaluate("document.contentType") == media_type, name
        assert page.evaluate("document.images.length === 1"), name
        assert page.evaluate("document.images[0].naturalWidth") == 48, name
        page.close()
