"""Strict JSON request bodies: no NaN or Infinity, bounded nesting, an object at the top."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from api.errors import ApiError


def _reject_constant(name: str) -> Any:
    raise ApiError(400, f"{name} is not valid JSON")


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 400/415 ApiError.

    Python's parser accepts NaN and Infinity, which JSON does not; they are
    refused here so they never reach a coordinate."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, "Content-Type must be application/json")
    raw = request.get_data(cache=True)
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise ApiError(400, "body nests too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body
