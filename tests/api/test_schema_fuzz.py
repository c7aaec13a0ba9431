"""Property-based requests generated from /openapi.json (schemathesis) against
the real app on Postgres, Redis and moto: no 5xx, and every answer conforms
to the schema; and the same requests with text no column can store drawn
into one of their strings. Bounded examples per operation, so CI time stays
fixed."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlencode

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import checks as schemathesis_checks
from sqlalchemy.orm import Session, sessionmaker

from segq.api.errors import ApiError
from segq.api.json_body import parse_json
from segq.api.peers.replicate import MODEL_NAME, MODEL_OWNER
from tests.support.database import count_files, count_jobs
from tests.support.images import png_bytes
from tests.support.tenants import Tenant

EXAMPLES_PER_OPERATION = 100
UNSTORABLE_EXAMPLES_PER_OPERATION = 12
#: NUL, and lone surrogates (high, low) that JSON can only send escaped.
#: Query parameters decoded to a number and never stored or compared as
#: text: a NUL in one reaches no column (whether their decoding is strict is
#: tests/api/test_request_parsing.py's concern).
#: X-Request-Id is never stored either: one that is not short and printable
#: is replaced by a fresh id (api/__init__.py), so it is no refusal.
#: Prefer is read as directives (an unknown one is ignored, RFC 7240), never
#: stored.
DECODED_NOT_STORED = frozenset({"cursor", "X-Request-Id", "Prefer"})
UNSTORABLE_CHARACTERS = ("\x00", "\ud800", "\udfff")
#: The peers' routes are their clients' adapters, each driven by its real SDK
#: elsewhere (tests/system/test_peer_clients.py, tests/system/test_replicate_client.py):
#: fewer examples here keep the test's time fixed.
PEER_TAGS = frozenset({"Livepeer", "Moondream", "Replicate"})
PEER_EXAMPLES_PER_OPERATION = 20


@pytest.mark.slow
def test_generated_requests_never_break_the_server(app: Flask, tenant: Tenant) -> None:
    # Something to find: a file and a job with ids 1, which generated ids often hit.
    file_id = tenant.upload(png_bytes()).json["id"]
    tenant.post_job({"items": [{"fileId": file_id}], "points": [{"x": 0.5, "y": 0.5}]})
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    checks = [
        getattr(schemathesis_checks, name)
        for name in (
            "not_a_server_error",
            "status_code_conformance",
            "content_type_conformance",
            "response_schema_conformance",
        )
    ]
    # An invalid operation is an Err without .ok(): the test fails on it, as it should.
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:
        peer = bool(PEER_TAGS & set(operation.tags or ()))

        @settings(
            max_examples=PEER_EXAMPLES_PER_OPERATION if peer else EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            # The project in the path is the tenant's (others get a correct 403).
            if case.path_parameters and "project" in case.path_parameters:
                case.path_parameters["project"] = tenant.name
            response = case.call(headers=tenant.headers)
            case.validate_response(response, checks=checks)

        check()


#: Where a string of a JSON body is: its field as refusals name it, and how
#: to put another string there (a key is named by the object holding it).
StringSlot = tuple[str, Callable[[str], None]]


def _string_slots(value: Any, where: str = "") -> list[StringSlot]:
    slots: list[StringSlot] = []
    if isinstance(value, dict):
        for key in list(value):

            def rename(text: str, node: dict[str, Any] = value, old: str = key) -> None:
                node[text] = node.pop(old)

            slots.append((where or "body", rename))
            child = value[key]
            path = f"{where}.{key}" if where else key
            if isinstance(child, str):

                def put(text: str, node: dict[str, Any] = value, name: str = key) -> None:
                    node[name] = text

                slots.append((path, put))
            else:
                slots.extend(_string_slots(child, path))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            path = f"{where}[{index}]"
            if isinstance(child, str):

                def put_item(text: str, node: list[Any] = value, at: int = index) -> None:
                    node[at] = text

                slots.append((path, put_item))
            else:
                slots.extend(_string_slots(child, path))
    return slots


def _parsed_whole(body: Any) -> bool:
    """Whether segq's parser reads ``body`` (generated integers may be too
    long, generated text may hold unstorable characters already)."""
    try:
        parse_json(json.dumps(body))
    except ApiError:
        return False
    return True


@pytest.mark.slow
def test_unstorable_text_in_any_json_string_is_a_400_naming_it(
    app: Flask, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    """Every documented JSON body, with NUL or a lone surrogate drawn into
    one of its strings or keys: 400 naming that field, and nothing stored."""
    file_id = tenant.upload(png_bytes()).json["id"]
    tenant.post_job({"items": [{"fileId": file_id}], "points": [{"x": 0.5, "y": 0.5}]})
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    with_json = [
        operation
        for operation in operations
        if any(body.media_type == "application/json" for body in operation.body)
    ]
    assert len(with_json) >= 10
    for operation in with_json:

        @settings(
            max_examples=UNSTORABLE_EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(media_type="application/json"), data=st.data())
        def check(case: Any, data: st.DataObject) -> None:
            if case.path_parameters and "project" in case.path_parameters:
                case.path_parameters["project"] = tenant.name
            if case.path_parameters and "owner" in case.path_parameters:
                # Replicate's model routes: the model served, so the body is read.
                case.path_parameters.update(owner=MODEL_OWNER, name=MODEL_NAME)
            if case.media_type != "application/json":
                return  # the multipart form of an upload
            body = copy.deepcopy(case.body)
            # One refused field at a time.
            assume(_parsed_whole(body))
            slots = _string_slots(body)
            if not slots:
                return
            where, put = data.draw(st.sampled_from(slots), label="field")
            bad = data.draw(st.sampled_from(UNSTORABLE_CHARACTERS), label="character")
            text = data.draw(st.text(max_size=8), label="around")
            at = data.draw(st.integers(0, len(text)), label="at")
            put(text[:at] + bad + text[at:])
            stored = (count_files(sessions), count_jobs(sessions))
            # Sent as is: schemathesis would validate the body against its
            # schema first, and a lone surrogate has no UTF-8 to match with.
            response = tenant.client.open(
                case.formatted_path,
                method=case.method,
                query_string=case.query,
                data=json.dumps(body),
                headers={
                    # The body goes as plain JSON: a drawn Content-Encoding
                    # would be refused before the text is read.
                    **{
                        name: value
                        for name, value in (case.headers or {}).items()
                        if name.lower() != "content-encoding"
                    },
                    **tenant.headers,
                    "Content-Type": "application/json",
                },
            )
            assert response.status_code == 400, (where, response.json)
            message = _refusal_message(cast(dict[str, Any], response.json))
            assert message.startswith(f"{where}:"), (where, message)
            assert (count_files(sessions), count_jobs(sessions)) == stored

        check()


@pytest.mark.slow
def test_unstorable_text_in_a_query_or_header_is_refused_and_stores_nothing(
    app: Flask, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    """Every documented query parameter and header that is text, with NUL
    drawn into it: a 4xx, and nothing stored; with a lone surrogate (in its
    UTF-8-like spelling, the only one a URL has): no 5xx."""
    file_id = tenant.upload(png_bytes()).json["id"]
    tenant.post_job({"items": [{"fileId": file_id}], "points": [{"x": 0.5, "y": 0.5}]})
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    with_text = [
        operation
        for operation in operations
        if any(
            parameter.location in ("query", "header") for parameter in operation.iter_parameters()
        )
    ]
    assert len(with_text) >= 5
    for operation in with_text:

        @settings(
            max_examples=UNSTORABLE_EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(), data=st.data())
        def check(case: Any, data: st.DataObject) -> None:
            if case.path_parameters and "project" in case.path_parameters:
                case.path_parameters["project"] = tenant.name
            query = dict(case.query or {})
            headers = {
                name: value
                for name, value in (case.headers or {}).items()
                if name.lower() not in ("authorization", "content-type", "content-length")
            }
            named = [("query", name) for name in query] + [("header", name) for name in headers]
            if not named:
                return
            where, name = data.draw(st.sampled_from(named), label="parameter")
            # A header is Latin-1 on the wire: a surrogate cannot be sent in one.
            bad = data.draw(
                st.sampled_from(UNSTORABLE_CHARACTERS if where == "query" else ("\x00",)),
                label="character",
            )
            target = query if where == "query" else headers
            target[name] = f"{target[name]}{bad}"
            stored = (count_files(sessions), count_jobs(sessions))
            is_json = case.media_type == "application/json"
            response = tenant.client.open(
                case.formatted_path,
                method=case.method,
                query_string=urlencode(query, doseq=True, errors="surrogatepass"),
                headers={
                    **headers,
                    **tenant.headers,
                    **({"Content-Type": "application/json"} if is_json else {}),
                },
                data=json.dumps(case.body) if is_json else None,
            )
            assert response.status_code < 500, (where, name, response.json)
            if bad == "\x00" and name not in DECODED_NOT_STORED:
                assert 400 <= response.status_code < 500, (where, name, response.json)
                assert (count_files(sessions), count_jobs(sessions)) == stored
            # else: not UTF-8, so read as U+FFFD (which can be stored).

        check()


def _refusal_message(body: dict[str, Any]) -> str:
    """The message of a refusal in segq's envelope (Moondream's routes use
    it too), a Replicate problem document or Livepeer's ``detail.msg``."""
    if "error" in body:
        return str(body["error"]["message"])
    detail = body["detail"]
    return str(detail["msg"] if isinstance(detail, dict) else detail)
