"""ApiError: a refusal the client hears, with its HTTP status. Free of Flask,
so the request-handling functions that raise it can be shared by any route
family; api/error_envelope.py turns it into the answer."""

from __future__ import annotations

from typing import Any

#: Where a field sits in a request body: keys and list indexes, as
#: pydantic's ``loc`` gives them.
FieldPath = tuple[str | int, ...]


def field_name(path: FieldPath) -> str:
    """``("items", 0, "fileUrl")`` written as ``items[0].fileUrl``; the
    empty path (the body itself) as ``body``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "body"


class ApiError(Exception):
    """A client-facing error: becomes ``{"error": {...}}`` with this status.

    ``field``: the request field the refusal is about, where it is about
    one; the message then begins with that field's name (see ``about``), so
    a route that built the request from another body can name the field as
    its caller sent it (``renamed``)."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        missing: list[dict[str, Any]] | None = None,
        duplicated: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        field: FieldPath | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.missing = missing or []
        self.duplicated = duplicated or []
        self.headers = headers or {}
        self.field = field

    @classmethod
    def about(cls, field: FieldPath, code: int, rest: str) -> ApiError:
        """The refusal of ``field``: its name, then ``rest`` (": why" or " why")."""
        return cls(code, field_name(field) + rest, field=field)

    def renamed(self, name: str) -> ApiError:
        """The same refusal with its field called ``name``."""
        assert self.field is not None
        rest = self.message.removeprefix(field_name(self.field))
        return ApiError(
            self.code,
            name + rest,
            missing=self.missing,
            duplicated=self.duplicated,
            headers=self.headers,
        )
