"""ApiError: a refusal the client hears, with its HTTP status. Free of Flask,
so the request-handling functions that raise it can be shared by any route
family; api/error_envelope.py turns it into the answer."""

from __future__ import annotations

from typing import Any


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
