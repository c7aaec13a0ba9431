"""Headers every answer of the API carries, set once for the whole app so
that no route can forget them: ``nosniff``, and a Content-Security-Policy
for any answer that has none of its own.

The API's origin is where API keys are typed (/docs) and where the job
viewer runs: an answer that a browser turned into a page with scripts would
run them there. JSON answers and error envelopes are data, never documents,
so their default policy loads nothing, runs nothing and cannot be framed.
Pages that need more say so themselves: the job viewer (api/job_views.py),
Swagger UI (api/openapi.py) and stored objects (segq/served_objects.py).
"""

from __future__ import annotations

from flask import Response

NOSNIFF = "nosniff"
#: For every answer that is not a page of segq's own.
DATA_POLICY = "default-src 'none'; frame-ancestors 'none'; sandbox"


def apply_response_policies(response: Response) -> Response:
    """``after_request`` for the whole app (it runs after blueprints' own)."""
    response.headers.setdefault("X-Content-Type-Options", NOSNIFF)
    response.headers.setdefault("Content-Security-Policy", DATA_POLICY)
    return response
