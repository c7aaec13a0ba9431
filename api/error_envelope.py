"""The Cognite error envelope, for every non-2xx answer segq gives, and who
answers a request that matches no route."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from segq.api.errors import ApiError
from segq.api.refusals import Envelope, register_refusals


def error_response(error: ApiError) -> Response:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.missing:
        body["missing"] = error.missing
    if error.duplicated:
        body["duplicated"] = error.duplicated
    response = jsonify({"error": body})
    response.status_code = error.code
    response.headers.update(error.headers)
    return response


#: Cognite's envelope: ``{"error": {"code", "message", "missing"?, "duplicated"?}}``,
#: with the table's statuses unchanged (Moondream's routes answer in it too).
COGNITE_ENVELOPE = Envelope("segq", error_response)


def register_error_handlers(app: Flask, *, unknown_routes: Mapping[str, str]) -> None:
    """``unknown_routes``: path prefix -> the blueprint whose error handlers
    answer the requests under it that match no route (Replicate's client
    reads its own problem documents under /v1/)."""

    def routing(exc: Exception) -> Response | None:
        if request.url_rule is None and isinstance(exc, NotFound | MethodNotAllowed):
            return _routing_error(exc, unknown_routes)
        return None

    register_refusals(app, COGNITE_ENVELOPE, routing={HTTPException: routing})


def _routing_error(exc: NotFound | MethodNotAllowed, unknown_routes: Mapping[str, str]) -> Response:
    """A request no route took, answered in the shape of the routes it was
    meant for: a wrong method by the blueprint whose route the path names,
    an unknown path by the blueprint that claims its prefix, else by segq.
    Routing fails before any blueprint is chosen, so Flask itself would
    give every such request the app's envelope."""
    method, path = request.method, request.path
    refusal: NotFound | MethodNotAllowed
    if isinstance(exc, MethodNotAllowed):
        allowed = sorted(exc.valid_methods or ())
        refusal = MethodNotAllowed(
            valid_methods=allowed,
            description=f"{method} is not allowed on {path}; it takes {', '.join(allowed)}",
        )
        owner = _blueprint_of_path(allowed)
    else:
        refusal = NotFound(description=f"no route {method} {path}")
        owner = next(
            (
                name
                for prefix, name in unknown_routes.items()
                if path == prefix or path.startswith(prefix.rstrip("/") + "/")
            ),
            None,
        )
    handler = _blueprint_handler(owner, refusal) if owner is not None else None
    response = (
        current_app.make_response(handler(refusal))
        if handler is not None
        else error_response(ApiError(refusal.code or 404, refusal.description or ""))
    )
    if isinstance(refusal, MethodNotAllowed) and response.status_code == 405:
        # RFC 9110: a 405 lists the methods the resource takes.
        response.headers["Allow"] = ", ".join(refusal.valid_methods or ())
    return response


def _blueprint_of_path(methods: list[str]) -> str | None:
    """The blueprint of the route that the request's path names with another method."""
    adapter = current_app.create_url_adapter(request)
    if adapter is None or not methods:
        return None
    try:
        rule, _ = adapter.match(method=methods[0], return_rule=True)
    except HTTPException:
        return None
    blueprint, _, _ = rule.endpoint.rpartition(".")
    return blueprint or None


def _blueprint_handler(blueprint: str, exc: HTTPException) -> Any:
    """The handler ``blueprint`` registered for ``exc`` (by status or class), if any."""
    handlers = current_app.error_handler_spec.get(blueprint, {})
    for code in (exc.code, None):
        for exception_class in type(exc).__mro__:
            handler = handlers.get(code, {}).get(exception_class)
            if handler is not None:
                return handler
    return None
