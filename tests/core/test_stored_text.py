"""Text no column can store (NUL, a lone surrogate) is refused where it comes
in, with a 400 in the route's own envelope naming the field, and nothing is
stored: Postgres would refuse it with a driver error (a 500) otherwise.
tests/api/test_schema_fuzz.py draws such text into every documented route; these
are the cases a probe found, through each route family."""

from __future__ import annotations

import base64
import json
from io import BytesIO
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.support.database import count_files, count_jobs
from tests.support.images import png_bytes
from tests.support.services import queued_messages
from tests.support.tenants import Tenant

NUL = "\x00"
LONE_SURROGATE = "\ud800"
UNSTORABLE = pytest.mark.parametrize("bad", [NUL, LONE_SURROGATE], ids=["nul", "lone-surrogate"])


def _data_url(parameters: str = "") -> str:
    return f"data:image/png{parameters};base64," + base64.b64encode(png_bytes()).decode()


def _message(response: Any) -> str:
    body = response.json
    return str(body["detail"] if "detail" in body else body["error"]["message"])


def _assert_refused(response: Any, field: str) -> None:
    assert response.status_code == 400, response.json
    message = _message(response)
    assert message.startswith(f"{field}:"), message
    assert "NUL" in message or "surrogate" in message


def _post_raw_json(tenant: Tenant, path: str, text: str, headers: dict[str, str]) -> Any:
    """``text`` as sent: the client's json.dumps escapes what we need escaped."""
    return tenant.client.post(
        path, data=text.encode(), headers={**headers, "Content-Type": "application/json"}
    )


@UNSTORABLE
def test_replicate_version_is_refused_in_a_problem_document(
    tenant: Tenant, sessions: sessionmaker[Session], bad: str
) -> None:
    body = {"version": f"abc{bad}", "input": {"image": _data_url(), "box": [1, 1, 50, 50]}}
    response = tenant.client.post("/v1/predictions", json=body, headers=tenant.headers)
    _assert_refused(response, "version")
    assert response.mimetype == "application/problem+json"
    assert count_jobs(sessions) == (0, 0) and count_files(sessions) == 0


@UNSTORABLE
def test_data_url_parameters_are_refused_on_every_route_that_takes_one(
    tenant: Tenant, sessions: sessionmaker[Session], bad: str
) -> None:
    image = _data_url(f";name=a{bad}b")
    segq = tenant.post_job({"items": [{"imageData": image}], "points": [{"x": 0.5, "y": 0.5}]})
    _assert_refused(segq, "items[0].imageData")
    replicate = tenant.client.post(
        "/v1/predictions",
        json={"version": "v", "input": {"image": image, "box": [1, 1, 50, 50]}},
        headers=tenant.headers,
    )
    _assert_refused(replicate, "input.image")
    moondream = tenant.client.post(
        "/v1/segment",
        json={"image_url": image, "object": "thing"},
        headers={"X-Moondream-Auth": tenant.key},
    )
    _assert_refused(moondream, "image_url")
    assert count_jobs(sessions) == (0, 0) and count_files(sessions) == 0
    assert queued_messages() == 0


@UNSTORABLE
@pytest.mark.parametrize(
    ("field", "creation"),
    [
        ("name", lambda bad: {"name": f"a{bad}.png"}),
        ("metadata.site", lambda bad: {"name": "a.png", "metadata": {"site": f"n{bad}"}}),
        ("metadata", lambda bad: {"name": "a.png", "metadata": {f"s{bad}": "north"}}),
        ("source", lambda bad: {"name": "a.png", "source": bad}),
        (
            "instanceId.space",
            lambda bad: {"name": "a.png", "instanceId": {"space": bad, "externalId": "x"}},
        ),
    ],
)
def test_cognite_file_fields_are_refused_on_create(
    tenant: Tenant, sessions: sessionmaker[Session], bad: str, field: str, creation: Any
) -> None:
    response = tenant.client.post(tenant.url("/files"), json=creation(bad), headers=tenant.headers)
    _assert_refused(response, field)
    assert count_files(sessions) == 0


@UNSTORABLE
def test_cognite_file_updates_are_refused_and_change_nothing(
    tenant: Tenant, sessions: sessionmaker[Session], bad: str
) -> None:
    created = tenant.client.post(
        tenant.url("/files"),
        json={"name": "a.png", "metadata": {"site": "north"}},
        headers=tenant.headers,
    )
    file_id = created.json["id"]
    for field, update in (
        ("items[0].update.metadata.add.site", {"metadata": {"add": {"site": f"s{bad}"}}}),
        ("items[0].update.metadata.remove[0]", {"metadata": {"remove": [bad]}}),
        ("items[0].update.name.set", {"name": {"set": bad}}),
        ("items[0].update.directory.set", {"directory": {"set": f"/a{bad}"}}),
    ):
        response = tenant.client.post(
            tenant.url("/files/update"),
            json={"items": [{"id": file_id, "update": update}]},
            headers=tenant.headers,
        )
        _assert_refused(response, field)
    shown = tenant.client.get(tenant.url(f"/files/{file_id}"), headers=tenant.headers).json
    assert shown["name"] == "a.png" and shown["metadata"] == {"site": "north"}
    assert shown["lastUpdatedTime"] == created.json["lastUpdatedTime"]


@UNSTORABLE
def test_replicate_file_metadata_form_field_is_refused(
    tenant: Tenant, sessions: sessionmaker[Session], bad: str
) -> None:
    response = tenant.client.post(
        "/v1/files",
        data={
            "content": (BytesIO(png_bytes()), "a.png"),
            "metadata": json.dumps({"site": f"n{bad}"}),
        },
        headers=tenant.headers,
        content_type="multipart/form-data",
    )
    _assert_refused(response, "metadata.site")
    assert count_files(sessions) == 0


def test_a_key_is_named_by_where_it_is_and_a_valid_pair_is_kept(tenant: Tenant) -> None:
    """A key is named by the object holding it (the key itself cannot be
    shown as is); a surrogate pair escaped in JSON is one character, kept."""
    refused = _post_raw_json(
        tenant,
        tenant.url("/files"),
        '{"name": "a.png", "metadata": {"\\u0000": "x"}}',
        tenant.headers,
    )
    assert refused.status_code == 400
    assert _message(refused) == "metadata: a key contains a NUL character (U+0000)"
    kept = _post_raw_json(
        tenant, tenant.url("/files"), '{"name": "\\ud83d\\ude00.png"}', tenant.headers
    )
    assert kept.status_code == 201, kept.json
    assert kept.json["name"] == "\U0001f600.png"


def test_stored_query_header_and_form_text_is_refused(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    body = {"items": [{"imageData": _data_url()}], "points": [{"x": 0.5, "y": 0.5}]}
    keyed = tenant.post_job(body, headers={"Idempotency-Key": "a\x00b"})
    assert keyed.status_code == 400 and "Idempotency-Key" in _message(keyed)
    assert count_jobs(sessions) == (0, 0)
    listed = tenant.client.get(tenant.url("/files?externalId=a%00b"), headers=tenant.headers)
    assert listed.status_code == 400 and "externalId" in _message(listed)
    # A surrogate's UTF-8 spelling is not UTF-8: decoded as U+FFFD, found nowhere.
    encoded = tenant.client.get(tenant.url("/files?externalId=a%ED%A0%80"), headers=tenant.headers)
    assert encoded.status_code == 200 and encoded.json == {"items": []}
    uploaded = tenant.upload(png_bytes(), externalId="a\x00b")
    assert uploaded.status_code == 400 and "externalId" in _message(uploaded)
    assert count_files(sessions) == 0
