"""The Cognite error envelope, for every non-2xx answer segq gives."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from segq.storage import StorageError

log = logging.getLogger(__name__)

DEPENDENCY_RETRY_AFTER_SECONDS = 5


class ApiError(Exception):
    """A client-facing error: becomes ``{"error": {...}}`` with this status."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        missing: list[dict[str, Any]] | None = None,
        duplicated: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.missing = missing or []
        self.duplicated = duplicated or []
        self.headers = headers or {}


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


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, error_response)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        # Werkzeug's own: unknown route, wrong method, body over MAX_CONTENT_LENGTH.
        code = exc.code or 500
        message = exc.description or exc.name
        if code == 413:
            message = "request body is too large"
        return error_response(ApiError(code, message))

    @app.errorhandler(OperationalError)
    @app.errorhandler(StorageError)
    def _dependency_down(exc: Exception) -> Response:
        log.warning("dependency unavailable: %s", exc)
        return error_response(
            ApiError(
                503,
                "a dependency of segq is unavailable; retry later",
                headers={"Retry-After": str(DEPENDENCY_RETRY_AFTER_SECONDS)},
            )
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(ApiError(500, "internal error"))
