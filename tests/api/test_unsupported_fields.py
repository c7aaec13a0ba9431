"""Every JSON body segq parses, given a field its model does not have,
answers a 400 that says in plain words that segq does not support it, never
pydantic's wording: one translation where validation errors are rendered
(api/schemas.py's validation_refusal), whatever the route and however deep
the field."""

from __future__ import annotations

from typing import Any

from flask import Flask

from segq.api.openapi import openapi_document
from tests.support.images import png_bytes
from tests.support.tenants import Tenant

UNSUPPORTED = "notAField"


def _json_body_operations(app: Flask) -> list[tuple[str, str]]:
    """(method, path) of the documented operations under a project that take JSON."""
    document: dict[str, Any] = openapi_document(app)
    found = []
    for path, operations in document["paths"].items():
        if not path.startswith("/api/v1/projects/"):
            continue
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                found.append((method, path))
    return found


def test_a_field_segq_does_not_read_is_refused_in_plain_words(app: Flask, tenant: Tenant) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    operations = _json_body_operations(app)
    assert len(operations) >= 10
    for method, path in operations:
        url = path.replace("{project}", tenant.name)
        url = url.replace("{file_id}", str(file_id)).replace("{job_id}", "1")
        # What multipart uploads need in the query, which is read first.
        url += "?parts=1"
        for body, field in (
            ({UNSUPPORTED: 1}, UNSUPPORTED),
            # Deeper, and beside a required field that is missing.
            ({"items": [{UNSUPPORTED: 1}]}, f"items[0].{UNSUPPORTED}"),
        ):
            answer = tenant.client.open(url, method=method, json=body, headers=tenant.headers)
            message = answer.json["error"]["message"]
            if field != UNSUPPORTED and message.startswith("items: "):
                continue  # this body has no items list
            assert answer.status_code == 400, (method, url, answer.json)
            assert (
                message == f"{field}: segq does not support {UNSUPPORTED!r} here; leave it out"
            ), (
                method,
                url,
            )
