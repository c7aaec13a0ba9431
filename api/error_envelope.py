"""The Cognite error envelope, for every non-2xx answer segq gives."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from api.errors import ApiError
from segq.images import TooManyPixels, UnreadableImage
from segq.storage import StorageError

log = logging.getLogger(__name__)

DEPENDENCY_RETRY_AFTER_SECONDS = 5


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

    @app.errorhandler(UnreadableImage)
    def _unreadable_image(exc: UnreadableImage) -> Response:
        # A truncated or corrupt file is the client's to fix, not a worker's to discover.
        return error_response(ApiError(415, str(exc)))

    @app.errorhandler(TooManyPixels)
    def _too_many_pixels(exc: TooManyPixels) -> Response:
        return error_response(ApiError(413, str(exc)))

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
