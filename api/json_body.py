"""Strict JSON request bodies: no NaN or Infinity, bounded nesting, storable
strings only, an object at the top."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from segq.api.errors import ApiError
from segq.api.stored_text import check_json_text

#: A 1,000-item job is about 50 KB; anything near this bound is not a job.
MAX_JSON_BODY_BYTES = 2 * 1024 * 1024


#: Integers longer than this are no id, count or coordinate segq knows of.
#: Python refuses to convert past 4,300 digits anyway, with a ValueError.
MAX_INTEGER_DIGITS = 20


def max_job_body_bytes(max_upload_bytes: int) -> int:
    """A job body may carry one inline image as large as an upload (base64
    is 4 bytes for 3), on top of what any other JSON body may hold."""
    return MAX_JSON_BODY_BYTES + 4 * -(-max_upload_bytes // 3)


def _reject_constant(name: str) -> Any:
    raise ApiError(400, f"{name} is not valid JSON")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ApiError(400, f"a number in the body has more than {MAX_INTEGER_DIGITS} digits")
    return int(text)


def _read_body(limit: int) -> bytes:
    """At most ``limit`` bytes of body, or 413. Counted as read, not as
    declared, so a chunked body without Content-Length is bounded too."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"JSON body is larger than {limit} bytes")
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = request.stream.read(min(65536, limit + 1 - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    if size > limit:
        raise ApiError(413, f"JSON body is larger than {limit} bytes")
    return b"".join(parts)


def read_json_object(max_bytes: int = MAX_JSON_BODY_BYTES) -> dict[str, Any]:
    """The request body as a JSON object of at most ``max_bytes``, or a
    400/413/415 ApiError.

    Python's parser accepts NaN and Infinity, which JSON does not; they are
    refused here so they never reach a coordinate. So is a string no column
    can store (api/stored_text.py), whichever field it is in."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, "Content-Type must be application/json")
    # The app's bound is the largest upload's; a route may allow more.
    request.max_content_length = max(request.max_content_length or 0, max_bytes)
    body = parse_json(_read_body(max_bytes))
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def parse_json(raw: bytes | str, root: str = "") -> Any:
    """Strict JSON from a client, with every string in it storable
    (api/stored_text.py), or a 400; ``root`` names a value that is one
    field of a form, in messages."""
    where = f"{root}: " if root else "body "
    try:
        text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw))
        value = json.loads(text, parse_constant=_reject_constant, parse_int=_bounded_int)
    except UnicodeDecodeError:
        raise ApiError(400, f"{where}is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"{where}is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise ApiError(400, f"{where}nests too deeply") from None
    check_json_text(text, value, root)
    return value
