"""The one parser for integers that arrive as text in a request: path ids,
query parameters, cursors and signed-URL expiry times.

``str.isdigit()`` and ``int()`` accept far more than ASCII digits (``²``
passes the first and fails the second; ``٣`` and ``1_000`` are numbers to
``int()``), and ``int()`` takes numbers no database column can hold. Here a
number is 1 to 19 ASCII digits within the bounds its field allows, or a 400.
"""

from __future__ import annotations

from typing import Any, ClassVar

from werkzeug.exceptions import BadRequest
from werkzeug.routing import BaseConverter

from segq.api.errors import ApiError

#: The largest value of a signed 64-bit column (every id and time in segq).
MAX_INT64 = 2**63 - 1
_MAX_DIGITS = len(str(MAX_INT64))


def ascii_integer(text: str, *, minimum: int = 0, maximum: int = MAX_INT64) -> int | None:
    """``text`` as an integer in [minimum, maximum] if it is only ASCII
    digits, else None. The length is checked before converting, so a
    million-digit string costs nothing."""
    if not 0 < len(text) <= _MAX_DIGITS or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if minimum <= value <= maximum else None


def request_integer(name: str, text: str, *, minimum: int = 0, maximum: int = MAX_INT64) -> int:
    """``text`` as an integer in [minimum, maximum], or a 400 naming ``name``."""
    value = ascii_integer(text, minimum=minimum, maximum=maximum)
    if value is None:
        raise ApiError(400, f"{name} must be an integer in [{minimum}, {maximum}]")
    return value


class IdConverter(BaseConverter):
    """Ids in paths: positive and within a 64-bit column, written in ASCII
    digits. Anything else in an id's place is a 400 (as a query parameter
    would be), not a 500 from ``int()`` nor a number the database cannot hold."""

    regex = r"[^/]+"
    #: How /openapi.json describes an id in a path.
    openapi_schema: ClassVar[dict[str, Any]] = {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_INT64,
    }
    # Ids are tried after every fixed segment of the same place (``/files/list``
    # before ``/files/<id>``), as they would be with werkzeug's own int converter.
    weight = 50

    def to_python(self, value: str) -> int:
        parsed = ascii_integer(value, minimum=1)
        if parsed is None:
            raise BadRequest(f"an id in the path must be an integer in [1, {MAX_INT64}]")
        return parsed

    def to_url(self, value: object) -> str:
        return str(int(value))  # type: ignore[call-overload]
