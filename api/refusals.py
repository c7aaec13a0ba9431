"""One table of refusals: every error that reaches a route's error handler
maps here, once, to the status and message the client hears (an ApiError);
each envelope (segq's Cognite envelope, Replicate's problem documents,
Livepeer's runner errors; Moondream's routes answer in segq's) only renders
that refusal in its peer's shape, and declares where its peer's API speaks
another status.

The image statuses, decided:

- An unreadable image (not a JPEG or PNG, or one that does not decode) is
  415 Unsupported Media Type: the request is well formed, the content is
  in a format segq does not take (RFC 9110 15.5.16). Cognite's envelope
  and Moondream's (its client raises on any status of 400 or more without
  reading the body) keep it.
- Too many pixels is 413 Content Too Large, as a body over the byte bound
  is: a bound of this server, the same in every envelope (Livepeer's SDK
  and Replicate's client both see 413 for a body over the limit already).
- Replicate answers input it cannot use with 422 (its problem documents
  for a prediction's invalid input; it has no 415 of its own), so its
  envelope gives 422 where the table says 415: one status for every
  unusable image, in a prediction's input or a file uploaded to /v1/files.
- Livepeer's runner (FastAPI) documents 400 (input), 401, 422 (FastAPI's
  list shape, for a form field), and 500 for this route; its SDK reads
  ``detail.msg`` only under those, and retries 429/503. A status it does
  not document becomes 400 (500 for a server's), so an unreadable image is
  400 there, as the runner's own would be when PIL cannot open it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wrappers import Response

from segq.api.errors import ApiError
from segq.images import TooManyPixels, UnreadableImage
from segq.storage import StorageError

log = logging.getLogger(__name__)

DEPENDENCY_RETRY_AFTER_SECONDS = 5
INTERNAL_ERROR = ApiError(500, "internal error")


@dataclass(frozen=True)
class RefusalRule:
    """How one error type is refused. ``example``: an instance such as a
    route raises, for the test that drives every rule through every
    envelope (tests/api/test_refusals.py)."""

    error: type[Exception]
    refusal: Callable[[Any], ApiError]
    example: Callable[[], Exception]


def _http_refusal(exc: HTTPException) -> ApiError:
    """Werkzeug's own: wrong method, unknown route, body over MAX_CONTENT_LENGTH."""
    code = exc.code or 500
    message = "request body is too large" if code == 413 else exc.description or exc.name
    return ApiError(code, message)


def _dependency_down(exc: Exception) -> ApiError:
    log.warning("dependency unavailable: %s", exc)
    return ApiError(
        503,
        "a dependency of segq is unavailable; retry later",
        headers={"Retry-After": str(DEPENDENCY_RETRY_AFTER_SECONDS)},
    )


#: Each error type once, most specific first (Flask picks a handler by the
#: error's class hierarchy, so the order matters only to readers).
REFUSALS: tuple[RefusalRule, ...] = (
    RefusalRule(ApiError, lambda error: error, lambda: ApiError(409, "example refusal")),
    RefusalRule(
        UnreadableImage,
        lambda exc: ApiError(415, str(exc)),
        lambda: UnreadableImage("not a JPEG or PNG"),
    ),
    RefusalRule(
        TooManyPixels,
        lambda exc: ApiError(413, str(exc)),
        lambda: TooManyPixels("the image has more pixels than allowed"),
    ),
    RefusalRule(HTTPException, _http_refusal, RequestEntityTooLarge),
    RefusalRule(
        OperationalError,
        _dependency_down,
        lambda: OperationalError("SELECT 1", {}, ConnectionRefusedError("database down")),
    ),
    RefusalRule(StorageError, _dependency_down, lambda: StorageError("storage down")),
)


def refusal_of(exc: Exception) -> ApiError:
    """What the client hears for ``exc``; anything the table does not name
    is an internal error (logged with its traceback)."""
    for rule in REFUSALS:
        if isinstance(exc, rule.error):
            return rule.refusal(exc)
    log.error("unhandled error", exc_info=exc)
    return INTERNAL_ERROR


@dataclass(frozen=True)
class Envelope:
    """How a family of routes answers a refusal: ``render`` in its peer's
    shape, with the status its peer's API gives for it (``peer_status``:
    the table's status, unless the peer's API documents another; the module
    docstring says why for each)."""

    name: str
    render: Callable[[ApiError], Response]
    peer_status: Callable[[int], int] = field(default=lambda status: status)

    def answer(self, refused: ApiError) -> Response:
        status = self.peer_status(refused.code)
        if status != refused.code:
            refused = ApiError(
                status,
                refused.message,
                missing=refused.missing,
                duplicated=refused.duplicated,
                headers=refused.headers,
            )
        return self.render(refused)


#: Every envelope, by name, as registered: the refusal test drives each.
ENVELOPES: dict[str, Envelope] = {}


class ErrorHandlers(Protocol):
    """Where error handlers are registered: a Flask app or a blueprint
    (this module imports no Flask: the table is the routes' and scripts')."""

    def register_error_handler(
        self, code_or_exception: type[Exception] | int, f: Callable[[Exception], Response]
    ) -> None: ...


def register_refusals(
    target: ErrorHandlers,
    envelope: Envelope,
    *,
    routing: Mapping[type[Exception], Callable[[Exception], Response | None]] | None = None,
) -> None:
    """Answer every refusal of the table, and any other error (500), on
    ``target`` in ``envelope``'s shape. ``routing``: a handler to try first
    for an error type (None from it: the table's answer)."""
    ENVELOPES[envelope.name] = envelope
    first = routing or {}

    def handler(exc: Exception) -> Response:
        for error_type, special in first.items():
            if isinstance(exc, error_type) and (answered := special(exc)) is not None:
                return answered
        return envelope.answer(refusal_of(exc))

    for rule in REFUSALS:
        target.register_error_handler(rule.error, handler)
    target.register_error_handler(Exception, handler)
