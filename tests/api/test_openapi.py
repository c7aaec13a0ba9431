"""/openapi.json describes the real answers: they validate against it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
from flask import Flask
from flask.testing import FlaskClient

import segq.api as api
from tests.support.images import cognite_sample_body, png_bytes
from tests.support.tenants import Tenant


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


#: Endpoints that are the documentation itself or a page's files.
NOT_API = ("static", "service.openapi_json", "swagger_ui.")
HTTP_METHODS = ("get", "put", "post", "delete", "patch")


def spec_of(client: FlaskClient) -> dict[str, Any]:
    spec: dict[str, Any] = client.get("/openapi.json").get_json()
    return spec


def operations_of(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


def test_every_route_is_documented_under_its_resource_s_tag(app: Flask) -> None:
    spec = spec_of(app.test_client())
    documented = {(method, path) for method, path, _ in operations_of(spec)}
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith(NOT_API):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert (method.lower(), path) in documented, (method, rule.rule)
    tags = [tag["name"] for tag in spec["tags"]]
    assert {
        "Files",
        "Jobs",
        "Livepeer",
        "Moondream",
        "Replicate",
        "OpenAI-compatible (VLM Run)",
    } <= set(tags)
    for method, path, operation in operations_of(spec):
        assert len(operation["tags"]) == 1 and operation["tags"][0] in tags, (method, path)
    assert ("post", "/segment-anything-2") in documented
    assert ("post", "/v1/segment") in documented
    assert ("post", "/v1/predictions") in documented
    assert ("post", "/v1/openai/chat/completions") in documented
    # The text prompt's fields, and the chat route's body, with their shapes.
    schemas = spec["components"]["schemas"]
    assert {"text", "boxes", "textOptions"} <= set(schemas["SegmentRequest"]["properties"])
    assert {"model", "messages", "response_format"} <= set(
        schemas["ChatCompletionRequest"]["properties"]
    )


def test_every_json_body_has_an_example_its_schema_accepts(client: FlaskClient) -> None:
    spec = spec_of(client)
    bodies = 0
    for method, path, operation in operations_of(spec):
        media = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if media is None:
            continue
        bodies += 1
        assert "example" in media, (method, path)
        schema = {**media["schema"], "components": spec["components"]}
        jsonschema.Draft202012Validator(schema).validate(media["example"])
    assert bodies >= 10


def test_the_peers_errors_are_their_own_shapes_as_documented(
    client: FlaskClient, tenant: Tenant
) -> None:
    spec = spec_of(client)

    def documented_error(path: str, status: int) -> tuple[str, dict[str, Any]]:
        [(media_type, media)] = spec["paths"][path]["post"]["responses"][str(status)][
            "content"
        ].items()
        return media_type, {**media["schema"], "components": spec["components"]}

    for path, answer in (
        ("/segment-anything-2", client.post("/segment-anything-2")),
        ("/v1/segment", client.post("/v1/segment", json={})),
        ("/v1/predictions", client.post("/v1/predictions", json={})),
        ("/v1/openai/chat/completions", client.post("/v1/openai/chat/completions", json={})),
        (
            "/api/v1/projects/{project}/context/vision/segment",
            client.post(tenant.url("/context/vision/segment"), json={}),
        ),
    ):
        assert answer.status_code == 401, path
        media_type, schema = documented_error(path, 401)
        assert answer.mimetype == media_type, path
        jsonschema.Draft202012Validator(schema).validate(answer.json)
    shapes = {
        path: documented_error(path, 401)[1]["$ref"].rsplit("/", 1)[1]
        for path in (
            "/segment-anything-2",
            "/v1/segment",
            "/v1/predictions",
            "/v1/openai/chat/completions",
        )
    }
    assert shapes == {
        "/segment-anything-2": "LivepeerError",
        "/v1/segment": "ErrorResponse",
        "/v1/predictions": "ReplicateProblem",
        "/v1/openai/chat/completions": "OpenAIError",
    }


#: How the API's code reads a request header.
HEADER_READ = re.compile(
    r"""request\.headers\.(?:get|getlist)\(\s*["']([A-Za-z-]+)["']"""
    r"""|request\.headers\[["']([A-Za-z-]+)["']\]"""
    r"""|_HEADER\s*=\s*["']([A-Za-z-]+)["']|environ\.get\(\s*["']HTTP_([A-Z_]+)["']"""
)
#: Read by the HTTP layer for the body's framing, not by a route.
TRANSPORT_HEADERS = {"transfer-encoding", "content-length", "content-type", "host"}


def test_every_request_header_the_api_reads_is_documented(client: FlaskClient) -> None:
    spec = spec_of(client)
    read: set[str] = set()
    for source in Path(api.__file__).parent.rglob("*.py"):
        for match in HEADER_READ.finditer(source.read_text()):
            name = next(group for group in match.groups() if group)
            read.add(name.replace("_", "-").lower())
    assert {"idempotency-key", "prefer", "last-event-id", "authorization"} <= read
    documented = {
        parameter["name"].lower()
        for _, _, operation in operations_of(spec)
        for parameter in operation["parameters"]
        if parameter["in"] == "header"
    }
    for scheme in spec["components"]["securitySchemes"].values():
        documented.add("authorization" if scheme["type"] == "http" else scheme["name"].lower())
    assert read - TRANSPORT_HEADERS <= documented, read - TRANSPORT_HEADERS - documented
    job_post = spec["paths"]["/api/v1/projects/{project}/context/vision/segment"]["post"]
    assert {"Idempotency-Key", "Prefer"} <= {p["name"] for p in job_post["parameters"]}
