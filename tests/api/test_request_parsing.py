"""Text a client controls, read the way docs/api.md promises: numbers from
text are ASCII digits within bounds or a 400, never a 500, on Postgres and
SQLite alike; references are reported once; the same request spelt another
way is the same request; links never come from the request's headers."""

from __future__ import annotations

import base64
import io
import json
import string
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.routing import Rule

from segq.api.app import create_app
from segq.api.files import MAX_FORM_PARTS
from segq.db import make_engine, make_session_factory
from segq.projects import create_project
from segq.schema_migrations import upgrade_to_head
from segq.settings import Settings
from tests.support.images import png_bytes
from tests.support.tenants import Tenant, make_tenant

INT64_MAX = 2**63 - 1
QUERY_NAMES = (
    "limit",
    "cursor",
    "status",
    "createdAfter",
    "createdBefore",
    "externalId",
    "expires",
    "signature",
    "itemsLimit",
    "itemsCursor",
)

#: Text that looks like a number to someone: Unicode digits and numerals,
#: signs, separators, exponents, and numbers past every column's range.
number_like = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.text(alphabet=st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=24),
    st.sampled_from(
        ["²", "٣", "¹²", "1_000", " 1", "1 ", "+1", "-1", "0x10", "1e3", "1.0", "0", "9" * 30]
    ),
    st.text(alphabet=string.digits, min_size=18, max_size=40),
    st.text(max_size=30),
)
cursor_like = st.one_of(
    number_like,
    number_like.map(lambda text: base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")),
)


#: The property tests' budget: the app is reused across examples on purpose
#: (the property is about requests, not state), hence the health checks.
EVERY_ROUTE_300_TIMES = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _rules(app: Flask) -> list[Rule]:
    return sorted(
        (rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"),
        key=lambda rule: rule.rule,
    )


def _check_no_server_error(client: FlaskClient, tenant: Tenant, data: st.DataObject) -> None:
    """One request on a drawn route, with drawn text in every path id and
    query parameter: any answer but a 5xx, and errors in the envelope."""
    rule = data.draw(st.sampled_from(_rules(client.application)))
    path = rule.rule.replace("<project>", tenant.name)
    for argument in sorted(rule.arguments - {"project"}):
        drawn = data.draw(number_like, label=argument)
        path = path.replace(f"<id:{argument}>", quote(drawn, safe="") or "%20")
        path = path.replace(f"<path:{argument}>", quote(drawn, safe="/") or "x")
        path = path.replace(f"<{argument}>", quote(drawn, safe="") or "%20")
    names = data.draw(st.lists(st.sampled_from(QUERY_NAMES), unique=True, max_size=4))
    query = {name: data.draw(cursor_like, label=name) for name in names}
    method = data.draw(st.sampled_from(sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})))
    response = client.open(path, method=method, query_string=query, headers=tenant.headers, json={})
    assert response.status_code < 500, (method, path, query, response.json)
    if response.status_code >= 400:
        if rule.endpoint.startswith("replicate."):  # Replicate's routes: RFC 7807 problems
            assert response.json["status"] == response.status_code
        elif rule.endpoint.startswith("livepeer."):  # Livepeer's routes: FastAPI's detail
            assert response.json["detail"]
        elif rule.endpoint.startswith("openai_chat."):  # OpenAI's error object
            assert response.json["error"]["message"] and response.json["error"]["type"]
        else:
            assert response.json["error"]["code"] == response.status_code
        assert response.headers["X-Request-Id"]


@EVERY_ROUTE_300_TIMES
@given(data=st.data())
def test_no_path_id_or_query_parameter_makes_a_5xx_on_postgres(
    client: FlaskClient, tenant: Tenant, data: st.DataObject
) -> None:
    _check_no_server_error(client, tenant, data)


@pytest.fixture
def sqlite_client(tmp_path: Path) -> Iterator[tuple[FlaskClient, Tenant]]:
    """The embedded default: SQLite, the filesystem broker, local-disk storage."""
    settings_ = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path / "data")})
    engine = make_engine(settings_.database_url)
    upgrade_to_head(engine)
    app = create_app(settings_)
    client = app.test_client()
    yield client, make_tenant(client, make_session_factory(engine), "acme")
    engine.dispose()


@EVERY_ROUTE_300_TIMES
@given(data=st.data())
def test_no_path_id_or_query_parameter_makes_a_5xx_on_sqlite(
    sqlite_client: tuple[FlaskClient, Tenant], data: st.DataObject
) -> None:
    client, tenant = sqlite_client
    _check_no_server_error(client, tenant, data)


@pytest.mark.parametrize("text", ["²", "٣", "1_000", "+3", " 3", "3.0", str(2**63), "9" * 5000])
def test_numbers_are_ascii_digits_within_range(tenant: Tenant, text: str) -> None:
    quoted = quote(text, safe="")
    cursor = base64.urlsafe_b64encode(text.encode()).decode()
    for path, query in (
        (f"/files/{quoted}", {}),
        (f"/context/vision/segment/{quoted}", {}),
        ("/files", {"limit": text}),
        ("/context/vision/segment", {"limit": text}),
        ("/context/vision/segment", {"cursor": cursor}),
        ("/context/vision/segment", {"createdAfter": text}),
    ):
        response = tenant.client.get(tenant.url(path), query_string=query, headers=tenant.headers)
        assert response.status_code == 400, (path, query, response.json)
        assert response.json["error"]["code"] == 400


def test_signed_url_expiry_is_read_as_ascii_digits(client: FlaskClient) -> None:
    for expires in ("²", "٣" * 11, "9" * 40):
        response = client.get("/objects/a.png", query_string={"expires": expires})
        assert response.status_code in (403, 404)
        assert response.json["error"]["code"] == response.status_code


@pytest.mark.parametrize("digits", [21, 4301, 100_000])
def test_a_json_integer_with_too_many_digits_is_400(tenant: Tenant, digits: int) -> None:
    body = '{"items": [{"fileId": ' + "7" * digits + '}], "points": [{"x": 0.5, "y": 0.5}]}'
    response = tenant.client.post(
        tenant.url("/context/vision/segment"),
        data=body,
        headers=tenant.headers,
        content_type="application/json",
    )
    assert response.status_code == 400, response.json
    assert "digits" in response.json["error"]["message"]


def test_unknown_and_repeated_files_are_each_listed_once(tenant: Tenant) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    items = [{"fileId": 999}, {"fileId": 999}, {"fileExternalId": "nope"}]
    items += [{"fileExternalId": "nope"}, {"fileId": 999}]
    response = tenant.post_job({"items": items, "points": [{"x": 0.5, "y": 0.5}]})
    assert response.status_code == 400
    assert response.json["error"]["missing"] == [{"id": 999}, {"externalId": "nope"}]

    items = [{"fileId": file_id}] * 4
    response = tenant.post_job({"items": items, "points": [{"x": 0.5, "y": 0.5}]})
    assert response.status_code == 400
    assert response.json["error"]["duplicated"] == [{"id": file_id}]


def test_the_same_request_spelt_another_way_is_the_same_request(tenant: Tenant) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    first = {
        "items": [{"fileId": file_id}],
        "points": [{"x": 1, "y": 0}],
        "webhook": {"url": "https://example.com/hook", "events": ["completed"]},
    }
    spelt_out = {
        "items": [{"fileId": file_id, "fileUrl": None}],
        "points": [{"x": 1.0, "y": 0.0, "label": 1}],
        "boundingBox": None,
        "multimaskOutput": False,
        "outputs": ["mask", "polygons"],
        "webhook": {"url": "https://example.com/hook", "events": ["job.completed"]},
    }
    headers = {"Idempotency-Key": "k-1"}
    created = tenant.post_job(first, headers=headers)
    again = tenant.post_job(spelt_out, headers=headers)
    assert created.status_code == again.status_code == 200, again.json
    assert again.json["jobId"] == created.json["jobId"]

    different = {**first, "points": [{"x": 1, "y": 0, "label": 0}]}
    assert tenant.post_job(different, headers=headers).status_code == 409


def test_a_form_with_too_many_parts_says_so(tenant: Tenant) -> None:
    fields: dict[str, Any] = {f"extra{i}": "x" for i in range(MAX_FORM_PARTS + 1)}
    fields["file"] = (io.BytesIO(png_bytes()), "a.png")
    response = tenant.client.post(
        tenant.url("/files"),
        data=fields,
        headers=tenant.headers,
        content_type="multipart/form-data",
    )
    assert response.status_code == 413
    assert "parts" in response.json["error"]["message"]


def _local_storage_app(tmp_path: Path, database_url: str, **changes: Any) -> Flask:
    base = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path / "local")})
    return create_app(replace(base, database_url=database_url, **changes))


def test_links_come_from_the_public_url_never_from_the_host_header(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> None:
    app = _local_storage_app(tmp_path, database_url, public_url="https://segq.example/base")
    client = app.test_client()
    tenant = make_tenant(client, sessions, "links")
    storage = app.extensions["segq"].storage
    storage.put("projects/1/masks/a.png", png_bytes(), "image/png")

    from segq.api.public_links import public_link

    with app.test_request_context("/", headers={"Host": "evil.example"}):
        link = public_link(
            app.extensions["segq"].settings.public_url,
            storage.presigned_get_url("projects/1/masks/a.png", 60),
        )
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc) == ("https", "segq.example")
    assert parts.path.startswith("/base/objects/")
    # The link serves the object from the API's root.
    served = client.get(parts.path.removeprefix("/base") + "?" + parts.query)
    assert served.status_code == 200 and served.data == png_bytes()
    assert tenant.name == "links"


def test_metrics_can_require_a_token(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> None:
    client = _local_storage_app(tmp_path, database_url, metrics_token="s3cret").test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer é"}).status_code == 401
    allowed = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert allowed.status_code == 200 and b"segq_jobs" in allowed.data
    # Without the setting, metrics stay open (a scraper on a private network).
    open_client = _local_storage_app(tmp_path, database_url).test_client()
    assert open_client.get("/metrics").status_code == 200


def test_projects_are_created_on_sqlite_too(tmp_path: Path) -> None:
    # The SQLite fixture above stands on this: projects and keys work there.
    settings_ = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path / "d")})
    engine = make_engine(settings_.database_url)
    upgrade_to_head(engine)
    with make_session_factory(engine)() as session:
        project, key = create_project(session, "p")
        session.commit()
    assert project.name == "p" and key
    engine.dispose()


def test_json_bodies_still_parse_plain_numbers(tenant: Tenant) -> None:
    body = json.dumps({"items": [{"fileId": 123456789012}], "points": [{"x": 0.5, "y": 0.5}]})
    response = tenant.client.post(
        tenant.url("/context/vision/segment"),
        data=body,
        headers=tenant.headers,
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json["error"]["missing"] == [{"id": 123456789012}]
