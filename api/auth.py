"""Bearer-key authentication for every project route."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, request

from segq.api.context import db, services
from segq.api.errors import ApiError
from segq.api.parking import RESUMED_ENVIRON_KEY
from segq.projects import hash_api_key


def protect_project_routes(blueprint: Blueprint) -> None:
    """Every route of ``blueprint`` lives under ``/projects/<project>`` and
    answers only to a key of that project."""

    @blueprint.url_value_preprocessor
    def _pop_project(_endpoint: str | None, values: dict[str, Any] | None) -> None:
        g.project_name = (values or {}).pop("project", None)

    @blueprint.before_request
    def _authenticate() -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = key.strip()
        # Remembered for a second per process (api/process_caches.py): a
        # revoked key is refused within that second.
        project = services().projects_by_key.project(db(), key)
        if project is None:
            raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        if project.name != g.project_name:
            raise ApiError(403, "this key does not belong to that project")
        g.project = project
        # Counted per key (by its hash: the key itself never leaves memory),
        # once per request: a parked request's later runs (api/parking.py)
        # are the same request, and a POST that created its job must not
        # be answered 429 when it wakes.
        resumed = request.environ.get(RESUMED_ENVIRON_KEY) is not None
        if not resumed and not services().rate_limiter.allow(hash_api_key(key)):
            raise ApiError(429, "too many requests for this key", headers={"Retry-After": "1"})
