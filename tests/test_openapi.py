"""/openapi.json describes the real answers: they validate against it."""

from __future__ import annotations

from typing import Any

import jsonschema
from flask.testing import FlaskClient

from tests.harness import Tenant
from tests.images import cognite_sample_body, png_bytes


def validator(spec: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    return jsonschema.Draft202012Validator(schema)


def test_spec_lists_the_routes_and_schemas(client: FlaskClient) -> None:
    spec: dict[str, Any] = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert "/api/v1/projects/{project}/context/vision/segment" in spec["paths"]
    request_schema = spec["components"]["schemas"]["SegmentRequest"]
    assert request_schema["additionalProperties"] is False
    assert {"items", "points", "boundingBox", "multimaskOutput"} <= set(
        request_schema["properties"]
    )
    assert client.get("/docs").status_code == 200


def test_answers_match_their_schemas(client: FlaskClient, tenant: Tenant) -> None:
    spec: dict[str, Any] = client.get("/openapi.json").get_json()
    uploaded = tenant.upload(png_bytes(), externalId="a")
    validator(spec, "FileResponse").validate(uploaded.json)
    created = tenant.post_job(cognite_sample_body(uploaded.json["id"]))
    validator(spec, "JobCreatedResponse").validate(created.json)
    validator(spec, "JobResponse").validate(tenant.get_job(created.json["jobId"]).json)
    validator(spec, "ErrorResponse").validate(tenant.get_job(999).json)
    # The request schema accepts Cognite's sample and refuses what the API refuses.
    request = validator(spec, "SegmentRequest")
    request.validate(cognite_sample_body(1))
    assert not request.is_valid({"items": [{"fileId": 1}], "points": [{"x": 2, "y": 0}]})


def test_metrics_show_the_backlog(client: FlaskClient, tenant: Tenant) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    for _ in range(2):
        tenant.post_job(cognite_sample_body(file_id))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    lines = dict(
        line.rsplit(" ", 1) for line in response.text.splitlines() if not line.startswith("#")
    )
    assert lines['segq_items{status="Queued"}'] == "2"
    assert lines['segq_jobs{status="Queued"}'] == "2"
    assert lines['segq_jobs{status="Running"}'] == "0"
    assert float(lines["segq_oldest_queued_job_age_seconds"]) >= 0
