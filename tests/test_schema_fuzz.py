"""Property-based requests generated from /openapi.json (schemathesis) against
the real app on Postgres, Redis and moto: no 5xx, and every answer conforms
to the schema. Bounded examples per operation, so CI time stays fixed."""

from __future__ import annotations

from typing import Any, cast

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from schemathesis import checks as schemathesis_checks

from tests.harness import Tenant
from tests.images import png_bytes

EXAMPLES_PER_OPERATION = 100
#: The peers' routes are their clients' adapters, each driven by its real SDK
#: elsewhere (tests/test_peer_clients.py, tests/test_replicate_client.py):
#: fewer examples here keep the test's time fixed.
PEER_TAGS = frozenset({"Livepeer", "Moondream", "Replicate"})
PEER_EXAMPLES_PER_OPERATION = 20


@pytest.mark.slow
def test_generated_requests_never_break_the_server(app: Flask, tenant: Tenant) -> None:
    # Something to find: a file and a job with ids 1, which generated ids often hit.
    file_id = tenant.upload(png_bytes()).json["id"]
    tenant.post_job({"items": [{"fileId": file_id}], "points": [{"x": 0.5, "y": 0.5}]})
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    checks = [
        getattr(schemathesis_checks, name)
        for name in (
            "not_a_server_error",
            "status_code_conformance",
            "content_type_conformance",
            "response_schema_conformance",
        )
    ]
    # An invalid operation is an Err without .ok(): the test fails on it, as it should.
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:
        peer = bool(PEER_TAGS & set(operation.tags or ()))

        @settings(
            max_examples=PEER_EXAMPLES_PER_OPERATION if peer else EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            # The project in the path is the tenant's (others get a correct 403).
            if case.path_parameters and "project" in case.path_parameters:
                case.path_parameters["project"] = tenant.name
            response = case.call(headers=tenant.headers)
            case.validate_response(response, checks=checks)

        check()
