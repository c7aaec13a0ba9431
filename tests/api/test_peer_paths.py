"""Every peer route takes its path as the peer's clients spell it: with or
without a trailing slash, and with the doubled slash a client makes when it
joins a base URL ending in one (Moondream's ``endpoint=".../v1/"``), each
answered as the plain path is, in the peer's own shape, never redirected."""

from __future__ import annotations

import re
from typing import Any

import requests
from flask import Flask

#: The blueprints that speak a peer's API.
PEER_BLUEPRINTS = ("livepeer", "moondream", "replicate")


def peer_routes(app: Flask) -> list[tuple[str, str]]:
    """(method, path) of every peer route, its variables filled in."""
    routes: list[tuple[str, str]] = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint.partition(".")[0] not in PEER_BLUEPRINTS:
            continue
        path = re.sub(r"<(?:\w+:)?\w+>", "1", rule.rule)
        methods = sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})
        routes.extend((method, path) for method in methods)
    return routes


def answer(live_server: str, method: str, path: str) -> tuple[int, Any]:
    # No key: each peer's own authentication answers, in its own shape.
    response = requests.request(
        method, live_server + path, timeout=30, allow_redirects=False, json={}
    )
    return response.status_code, response.json()


def test_every_peer_route_takes_a_trailing_or_doubled_slash(app: Flask, live_server: str) -> None:
    routes = peer_routes(app)
    assert {path for _, path in routes} >= {"/segment-anything-2", "/v1/segment", "/v1/predictions"}
    for method, path in routes:
        plain = answer(live_server, method, path)
        assert plain[0] == 401, (method, path, plain)
        first, _, rest = path.lstrip("/").partition("/")
        spellings = [path + "/", f"/{first}//{rest}" if rest else f"//{first}"]
        for spelling in spellings:
            assert answer(live_server, method, spelling) == plain, (method, spelling)
