"""One table of refusals (api/refusals.py), rendered by every envelope: each
refusal of the table, raised inside a real route of each route family,
gives the table's status in every envelope, except where the peer's own API
documents another (the envelope's ``peer_status``), and its message in the
peer's shape. A refusal added to the table, or an envelope registered, is
driven here without a test to write (an envelope with no route to drive
fails the test)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from segq.api.errors import ApiError
from segq.api.peers.peer_blueprint import PeerBlueprint
from segq.api.process_caches import ProjectsByKey
from segq.api.refusals import ENVELOPES, REFUSALS, RefusalRule, refusal_of
from segq.images import TooManyPixels, UnreadableImage
from tests.support.tenants import Tenant

KEY = "a-key-the-lookup-refuses-first"


@dataclass(frozen=True)
class RouteFamily:
    """A real route of one family, called with ``key``, and how its
    envelope's body carries the message."""

    envelope: str
    call: Callable[[FlaskClient, str], TestResponse]
    message: Callable[[Any], str]


def _native(client: FlaskClient, key: str) -> TestResponse:
    return client.get("/api/v1/projects/acme/files/1", headers={"Authorization": f"Bearer {key}"})


def _moondream(client: FlaskClient, key: str) -> TestResponse:
    return client.post("/v1/segment", json={}, headers={"X-Moondream-Auth": key})


def _replicate(client: FlaskClient, key: str) -> TestResponse:
    return client.get("/v1/predictions", headers={"Authorization": f"Bearer {key}"})


def _livepeer(client: FlaskClient, key: str) -> TestResponse:
    return client.post(
        "/segment-anything-2",
        data={"image": (io.BytesIO(b""), "x.png")},
        headers={"Authorization": f"Bearer {key}"},
        content_type="multipart/form-data",
    )


def _openai(client: FlaskClient, key: str) -> TestResponse:
    return client.post(
        "/v1/openai/chat/completions", json={}, headers={"Authorization": f"Bearer {key}"}
    )


FAMILIES: dict[str, RouteFamily] = {
    "segq": RouteFamily("segq", _native, lambda body: body["error"]["message"]),
    # Moondream's routes answer in segq's envelope (its client reads no body).
    "moondream": RouteFamily("segq", _moondream, lambda body: body["error"]["message"]),
    "replicate": RouteFamily("replicate", _replicate, lambda body: body["detail"]),
    "livepeer": RouteFamily("livepeer", _livepeer, lambda body: body["detail"]["msg"]),
    "openai_chat": RouteFamily("openai", _openai, lambda body: body["error"]["message"]),
}


def test_every_envelope_and_peer_has_a_route_driven_here(app: Flask) -> None:
    assert set(ENVELOPES) == {family.envelope for family in FAMILIES.values()}
    peers = {bp.name for bp in app.blueprints.values() if isinstance(bp, PeerBlueprint)}
    assert peers <= set(FAMILIES), peers - set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rule", REFUSALS, ids=lambda rule: rule.error.__name__)
def test_a_refusal_has_the_tables_status_in_every_envelope(
    app: Flask,
    client: FlaskClient,
    monkeypatch: pytest.MonkeyPatch,
    rule: RefusalRule,
    family: str,
) -> None:
    route = FAMILIES[family]
    example = rule.example()

    def refuse(*_args: Any) -> Any:
        raise example

    # Every family looks the key up first: the refusal is raised inside the real route.
    monkeypatch.setattr(ProjectsByKey, "project", refuse)
    refused = refusal_of(rule.example())
    envelope = ENVELOPES[route.envelope]
    expected = envelope.peer_status(refused.code)

    response = route.call(client, KEY)

    assert response.status_code == expected, (family, response.get_json())
    assert route.message(response.get_json()) == refused.message
    for header, value in refused.headers.items():
        assert response.headers[header] == value
    if expected != refused.code:
        # Only a status outside the peer's documented ones is translated,
        # and never into a success or across the client/server line.
        assert expected // 100 == refused.code // 100 == 4


def test_the_same_status_everywhere_the_peers_allow(
    app: Flask,
) -> None:  # app: envelopes registered
    """Across the table, the envelopes differ only in statuses a peer's API
    does not document: 415 (Replicate: 422, Livepeer: 400), and Livepeer's
    undocumented ones."""
    statuses = {refusal_of(rule.example()).code for rule in REFUSALS} | {409, 415}
    for status in statuses:
        answered = {name: envelope.peer_status(status) for name, envelope in ENVELOPES.items()}
        assert answered["segq"] == status
        if status != 415:
            assert answered["replicate"] == status
        if status in (400, 401, 413, 429, 503, 504):
            assert answered["livepeer"] == status


def test_an_unexpected_error_is_500_in_every_envelope(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ProjectsByKey, "project", fail)
    for family, route in FAMILIES.items():
        response = route.call(client, KEY)
        assert response.status_code == 500, family
        assert route.message(response.get_json()) == "internal error"


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


#: The decided statuses of an image that is not an image (api/refusals.py
#: says why), each through the route of its family that takes an image.
UNREADABLE_IMAGE_STATUSES = {
    "segq upload": 415,
    "moondream": 415,
    "replicate prediction": 422,
    "replicate file": 422,
    "livepeer": 400,
}


def test_an_unreadable_image_is_refused_as_decided(tenant: Tenant) -> None:
    client, key = tenant.client, tenant.key
    bearer = {"Authorization": f"Bearer {key}"}
    not_an_image = b"not an image at all"
    answers = {
        "segq upload": tenant.upload(not_an_image),
        "moondream": client.post(
            "/v1/segment",
            json={"image_url": _data_uri(not_an_image), "object": "", "spatial_refs": [[0.5, 0.5]]},
            headers={"X-Moondream-Auth": key},
        ),
        "replicate prediction": client.post(
            "/v1/predictions",
            json={"version": "v", "input": {"image": _data_uri(not_an_image), "box": [1, 1, 5, 5]}},
            headers=bearer,
        ),
        "replicate file": client.post(
            "/v1/files",
            data={"content": (io.BytesIO(not_an_image), "notes.txt")},
            headers=bearer,
            content_type="multipart/form-data",
        ),
        "livepeer": client.post(
            "/segment-anything-2",
            data={"image": (io.BytesIO(not_an_image), "x.png"), "box": json.dumps([1, 1, 5, 5])},
            headers=bearer,
            content_type="multipart/form-data",
        ),
    }
    statuses = {route: answer.status_code for route, answer in answers.items()}
    assert statuses == UNREADABLE_IMAGE_STATUSES, {r: a.get_json() for r, a in answers.items()}
    # The table's status, where the peer's API allows it.
    table = refusal_of(UnreadableImage("x")).code
    assert statuses["segq upload"] == statuses["moondream"] == table
    for route in ("replicate prediction", "replicate file"):
        assert statuses[route] == ENVELOPES["replicate"].peer_status(table)
    assert statuses["livepeer"] == ENVELOPES["livepeer"].peer_status(table)


def test_too_many_pixels_is_413_in_every_envelope(app: Flask) -> None:
    table = refusal_of(TooManyPixels("x")).code
    assert table == 413
    assert {envelope.peer_status(table) for envelope in ENVELOPES.values()} == {413}


def test_a_refusal_keeps_what_the_route_said() -> None:
    refused = ApiError(422, "input.box: no", headers={"X": "1"})
    assert refusal_of(refused) is refused
