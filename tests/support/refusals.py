"""Requests segq must refuse, and the check that a refused job left
nothing stored or queued."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tests.support.database import count_jobs
from tests.support.services import queued_messages
from tests.support.tenants import Tenant

#: Bodies that are not JSON segq reads, each a 400.
MALFORMED_JSON_BODIES = {
    "nan": b'{"items": [{"fileId": 1}], "points": [{"x": NaN, "y": 0.5}]}',
    "infinity": b'{"items": [{"fileId": 1}], "points": [{"x": Infinity, "y": 0.5}]}',
    "overflow": b'{"items": [{"fileId": 1}], "points": [{"x": 1e999, "y": 0.5}]}',
    "truncated": b'{"items": [',
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "not-object": b'"just a string"',
    "not-utf8": b"\xff\xfe not utf-8",
}


def assert_job_refused(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    body: dict[str, Any],
    status: int,
    mentions: str,
) -> None:
    """POSTing ``body`` as a job is refused with ``status``, a message that
    says ``mentions``, and nothing stored or queued."""
    response = tenant.post_job(body)
    assert response.status_code == status, response.json
    assert mentions in response.json["error"]["message"]
    assert count_jobs(sessions) == (0, 0)
    assert queued_messages() == 0
