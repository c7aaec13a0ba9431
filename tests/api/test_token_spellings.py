"""One spelling per token: every token segq hands out (a viewer link's
token, an upload URL, a multipart upload's id, a local object link's expiry
and signature, the cursors of listings) is read only as segq wrote it. Any
other spelling (characters appended that its alphabet lacks, padding, a
character changed, dropped or doubled, its case changed, another low bit in
a signature's last character) is refused with a 4xx in the route's
envelope, never a 5xx and never the token's own answer."""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from celery import Celery
from flask import Flask
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from segq.api.app import create_app
from segq.settings import Settings
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.tenants import Tenant, make_tenant

#: base64url's alphabet, in the order of the values its characters stand for.
BASE64URL = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
#: Characters a respelling adds: outside every token's alphabet, padding,
#: inside it, and anything else Unicode has (but lone surrogates, which no
#: URL can carry).
added_characters = st.one_of(
    st.sampled_from(["!", "=", "é", " ", "%", "+", "/", ".", "~", "\x00", "ß"]),
    st.sampled_from(list(BASE64URL)),
    st.characters(blacklist_categories=["Cs"]),
)

#: The app is reused across examples on purpose: the property is about
#: requests, not state.
EACH_TOKEN_150_TIMES = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def respellings(draw: st.DrawFn, token: str) -> str:
    """``token`` written another way."""
    position = draw(st.integers(0, len(token) - 1))
    how = draw(st.sampled_from(["append", "insert", "replace", "drop", "double", "case", "pad"]))
    if how == "append":
        respelt = token + "".join(draw(st.lists(added_characters, min_size=1, max_size=3)))
    elif how == "insert":
        respelt = token[:position] + draw(added_characters) + token[position:]
    elif how == "replace":
        respelt = token[:position] + draw(added_characters) + token[position + 1 :]
    elif how == "drop":
        respelt = token[:position] + token[position + 1 :]
    elif how == "double":
        respelt = token[:position] + token[position] + token[position:]
    elif how == "case":
        respelt = token[:position] + token[position].swapcase() + token[position + 1 :]
    else:
        respelt = token + "=" * draw(st.integers(1, 3))
    assume(respelt != token)
    return respelt


@dataclass
class TokenKind:
    """A token segq handed out, and the request that presents it."""

    name: str
    token: str
    send: Callable[[str], TestResponse]


@pytest.fixture
def local_app(
    settings: Settings, celery_app: Celery, sessions: sessionmaker[Session], tmp_path: Path
) -> Flask:
    # Local disk, so that object links are segq's own to read.
    return create_app(
        replace(settings, storage_url=(tmp_path / "objects").as_uri()), celery=celery_app
    )


@pytest.fixture
def token_kinds(local_app: Flask, sessions: sessionmaker[Session]) -> list[TokenKind]:
    tenant: Tenant = make_tenant(local_app.test_client(), sessions, "acme")
    client, auth = tenant.client, tenant.headers
    file_ids = [tenant.upload(png_bytes(40, 30, seed=seed)).json["id"] for seed in (1, 2)]
    job_ids = [tenant.post_job(scene_prompt_body(file_id)).json["jobId"] for file_id in file_ids]
    view_token = parse_qs(urlsplit(tenant.get_job(job_ids[0]).json["viewUrl"]).query)["token"][0]
    view_path = tenant.url(f"/context/vision/segment/{job_ids[0]}")

    created = client.post(tenant.url("/files"), json={"name": "later.png"}, headers=auth).json
    upload_token = created["uploadUrl"].rsplit("/", 1)[1]
    multipart = client.post(
        tenant.url("/files/initmultipartupload?parts=1"), json={"name": "m.png"}, headers=auth
    ).json

    download = client.post(
        tenant.url("/files/downloadlink"), json={"items": [{"id": file_ids[0]}]}, headers=auth
    ).json["items"][0]["downloadUrl"]
    object_path, object_query = urlsplit(download).path, parse_qs(urlsplit(download).query)
    expires, signature = object_query["expires"][0], object_query["signature"][0]

    files_cursor = client.post(tenant.url("/files/list"), json={"limit": 1}, headers=auth).json[
        "nextCursor"
    ]
    jobs_path = tenant.url("/context/vision/segment")
    jobs_cursor = client.get(f"{jobs_path}?limit=1", headers=auth).json["nextCursor"]
    two_items = tenant.post_job(
        {**scene_prompt_body(file_ids[0]), "items": [{"fileId": f} for f in file_ids]}
    ).json["jobId"]
    items_path = tenant.url(f"/context/vision/segment/{two_items}")
    items_cursor = client.get(f"{items_path}?itemsLimit=1", headers=auth).json["nextItemsCursor"]

    def q(text: str) -> str:
        return quote(text, safe="")

    return [
        TokenKind(
            "viewer page", view_token, lambda t: client.get(f"{view_path}/view?token={q(t)}")
        ),
        TokenKind(
            "viewer data", view_token, lambda t: client.get(f"{view_path}/view/job?token={q(t)}")
        ),
        TokenKind(
            "upload URL",
            upload_token,
            lambda t: client.put(f"/api/v1/files/upload/{q(t)}", data=png_bytes(40, 30, seed=3)),
        ),
        TokenKind(
            "multipart upload id",
            multipart["uploadId"],
            lambda t: client.post(
                tenant.url("/files/completemultipartupload"),
                json={"id": multipart["id"], "uploadId": t},
                headers=auth,
            ),
        ),
        TokenKind(
            "object link signature",
            signature,
            lambda t: client.get(f"{object_path}?expires={expires}&signature={q(t)}"),
        ),
        TokenKind(
            "object link expiry",
            expires,
            lambda t: client.get(f"{object_path}?expires={q(t)}&signature={signature}"),
        ),
        TokenKind(
            "files cursor",
            files_cursor,
            lambda t: client.post(
                tenant.url("/files/list"), json={"limit": 1, "cursor": t}, headers=auth
            ),
        ),
        TokenKind(
            "jobs cursor",
            jobs_cursor,
            lambda t: client.get(f"{jobs_path}?limit=1&cursor={q(t)}", headers=auth),
        ),
        TokenKind(
            "job items cursor",
            items_cursor,
            lambda t: client.get(f"{items_path}?itemsCursor={q(t)}", headers=auth),
        ),
    ]


def assert_refused_in_envelope(kind: TokenKind, spelling: str, answer: TestResponse) -> None:
    assert 400 <= answer.status_code < 500, (kind.name, spelling, answer.status_code, answer.data)
    body: Any = answer.get_json(silent=True)
    assert isinstance(body, dict) and body.get("error", {}).get("code") == answer.status_code, (
        kind.name,
        spelling,
        answer.data,
    )


def test_each_token_is_accepted_as_written(token_kinds: list[TokenKind]) -> None:
    """The control: each token, as segq wrote it, is accepted. (The upload
    URL and upload id are presented last: using them changes the file.)"""
    for kind in token_kinds:
        if kind.name in ("upload URL", "multipart upload id"):
            continue
        answer = kind.send(kind.token)
        assert answer.status_code == 200, (kind.name, answer.data)
    upload = next(kind for kind in token_kinds if kind.name == "upload URL")
    assert upload.send(upload.token).status_code == 200


@given(data=st.data())
@EACH_TOKEN_150_TIMES
def test_any_other_spelling_of_a_token_is_refused_in_the_envelope(
    token_kinds: list[TokenKind], data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(token_kinds), label="kind")
    spelling = data.draw(respellings(kind.token), label="spelling")
    assert_refused_in_envelope(kind, spelling, kind.send(spelling))


def test_the_reported_spellings_and_a_signatures_unused_bits_are_refused(
    token_kinds: list[TokenKind],
) -> None:
    """The spellings reported (``!!``, ``=``, ``é`` appended), and each
    other value of the unused low bits of a base64 signature's last
    character, which decodes to the same bytes."""
    for kind in token_kinds:
        spellings = [kind.token + suffix for suffix in ("!!", "=", "é", "==", ".")]
        last = kind.token[-1]
        if last in BASE64URL:
            index = BASE64URL.index(last)
            spellings += [
                kind.token[:-1] + BASE64URL[index ^ low_bits]
                for low_bits in (1, 2, 3)
                if index ^ low_bits < len(BASE64URL)
            ]
        for spelling in spellings:
            assert_refused_in_envelope(kind, spelling, kind.send(spelling))


def test_a_replicate_cursor_is_read_in_the_spelling_next_gave(
    local_app: Flask, sessions: sessionmaker[Session]
) -> None:
    """Replicate's ``next`` links carry the last id as ``cursor``; another
    spelling of that number is a 400 problem document, as Replicate answers."""
    tenant = make_tenant(local_app.test_client(), sessions, "acme")
    assert tenant.client.get("/v1/predictions?cursor=5", headers=tenant.headers).status_code == 200
    for spelling in ("05", "5%20", "%2B5", "5=", "%D9%A5"):
        answer = tenant.client.get(f"/v1/predictions?cursor={spelling}", headers=tenant.headers)
        assert answer.status_code == 400, spelling
        assert answer.mimetype == "application/problem+json"
        assert answer.json["status"] == 400 and "cursor" in answer.json["detail"]
