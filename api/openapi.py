"""/openapi.json, generated from the pydantic schemas in api.schemas."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.schemas import (
    ErrorResponse,
    FileList,
    FileResponse,
    JobCreatedResponse,
    JobList,
    JobResponse,
    SegmentRequest,
    WebhookDeliveryList,
    WebhookDeliveryResponse,
    WebhookSecret,
)

PROJECT_PREFIX = "/api/v1/projects/{project}"
REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _json(ErrorResponse, "error") for code in codes}


_PROJECT = {"name": "project", "in": "path", "required": True, "schema": {"type": "string"}}


def _id(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    }


@cache
def openapi_document() -> dict[str, Any]:
    _, definitions = models_json_schema(
        [
            (model, "validation" if model is SegmentRequest else "serialization")
            for model in (
                SegmentRequest,
                ErrorResponse,
                FileResponse,
                FileList,
                JobCreatedResponse,
                JobResponse,
                JobList,
                WebhookSecret,
                WebhookDeliveryList,
                WebhookDeliveryResponse,
            )
        ],
        ref_template=REF,
    )
    auth_errors = (401, 403)
    paths: dict[str, Any] = {
        f"{PROJECT_PREFIX}/files": {
            "post": {
                "summary": "Upload an image (JPEG or PNG)",
                "parameters": [_PROJECT],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file"],
                                "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "externalId": {"type": "string", "maxLength": 255},
                                    "name": {"type": "string", "maxLength": 255},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json(FileResponse, "stored"),
                    **_errors(400, *auth_errors, 409, 413, 415, 503),
                },
            },
            "get": {
                "summary": "List files, newest first",
                "parameters": [
                    _PROJECT,
                    {"name": "externalId", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                "responses": {"200": _json(FileList, "files"), **_errors(400, *auth_errors)},
            },
        },
        f"{PROJECT_PREFIX}/files/{{fileId}}": {
            "get": {
                "summary": "Read a file's metadata",
                "parameters": [_PROJECT, _id("fileId")],
                "responses": {"200": _json(FileResponse, "the file"), **_errors(*auth_errors, 404)},
            },
            "delete": {
                "summary": "Delete a file",
                "parameters": [_PROJECT, _id("fileId")],
                "responses": {"204": {"description": "deleted"}, **_errors(*auth_errors, 404)},
            },
        },
        f"{PROJECT_PREFIX}/context/vision/segment": {
            "post": {
                "summary": "Create a segmentation job",
                "parameters": [
                    _PROJECT,
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string", "maxLength": 255},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(SegmentRequest)}},
                },
                "responses": {
                    "200": _json(JobCreatedResponse, "the job, queued"),
                    **_errors(400, *auth_errors, 409, 413, 415, 422, 429, 503),
                },
            },
            "get": {
                "summary": "List jobs, newest first",
                "parameters": [
                    _PROJECT,
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": ["Queued", "Running", "Completed", "Failed", "Canceled"],
                        },
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "createdAfter",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 10**15 - 1},
                    },
                    {
                        "name": "createdBefore",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 10**15 - 1},
                    },
                ],
                "responses": {
                    "200": _json(JobList, "a page of jobs"),
                    **_errors(400, *auth_errors),
                },
            },
        },
        f"{PROJECT_PREFIX}/context/vision/segment/{{jobId}}": {
            "get": {
                "summary": "Read a job's status and results",
                "parameters": [_PROJECT, _id("jobId")],
                "responses": {
                    "200": _json(JobResponse, "the job; Retry-After while unfinished"),
                    **_errors(*auth_errors, 404),
                },
            }
        },
        f"{PROJECT_PREFIX}/context/vision/segment/{{jobId}}/cancel": {
            "post": {
                "summary": "Cancel a job: queued items never run, no further item starts",
                "parameters": [_PROJECT, _id("jobId")],
                "responses": {
                    "200": _json(JobResponse, "the job, canceled"),
                    **_errors(*auth_errors, 404, 409),
                },
            }
        },
        f"{PROJECT_PREFIX}/context/vision/segment/{{jobId}}/webhook-deliveries": {
            "get": {
                "summary": "The job's webhook deliveries, oldest first, with their attempts",
                "parameters": [
                    _PROJECT,
                    _id("jobId"),
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _json(WebhookDeliveryList, "a page of deliveries"),
                    **_errors(400, *auth_errors, 404),
                },
            }
        },
        (
            f"{PROJECT_PREFIX}/context/vision/segment/{{jobId}}"
            "/webhook-deliveries/{deliveryId}/redeliver"
        ): {
            "post": {
                "summary": "Send a delivery again now, with the same webhook-id",
                "parameters": [_PROJECT, _id("jobId"), _id("deliveryId")],
                "responses": {
                    "202": _json(WebhookDeliveryResponse, "the delivery, pending"),
                    **_errors(*auth_errors, 404, 409),
                },
            }
        },
        f"{PROJECT_PREFIX}/webhooks/secret": {
            "get": {
                "summary": "The project's webhook signing secret (made on first read)",
                "parameters": [_PROJECT],
                "responses": {
                    "200": _json(WebhookSecret, "the secret"),
                    **_errors(*auth_errors),
                },
            },
            "post": {
                "summary": "Rotate the secret; the previous one also signs for a day",
                "parameters": [_PROJECT],
                "responses": {
                    "200": _json(WebhookSecret, "the new secret"),
                    **_errors(*auth_errors),
                },
            },
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics: the unfinished backlog",
                "responses": {"200": {"description": "text/plain exposition format"}},
            }
        },
        "/healthz": {
            "get": {"summary": "The process is up", "responses": {"200": {"description": "up"}}}
        },
        "/readyz": {
            "get": {
                "summary": "Database, broker and storage answer",
                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}},
            }
        },
    }
    for path, operations in paths.items():
        if path.startswith(PROJECT_PREFIX):
            for operation in operations.values():
                operation["security"] = [{"apiKey": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "segq", "version": "1", "description": "Asynchronous image segmentation"},
        "paths": paths,
        "components": {
            "schemas": definitions["$defs"],
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>segq API</title>
<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
code,pre{background:#f4f4f4;padding:.1rem .3rem}h2{margin-top:2rem}.m{font-weight:bold}</style>
</head><body><h1>segq API</h1>
<p>The machine-readable description is <a href="/openapi.json">/openapi.json</a>.
Every project route needs <code>Authorization: Bearer &lt;api-key&gt;</code>.</p>
<div id="paths">Loading…</div>
<script>
fetch('/openapi.json').then(r => r.json()).then(spec => {
  const root = document.getElementById('paths'); root.textContent = '';
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const h = document.createElement('h2');
      h.innerHTML = '<span class="m">' + method.toUpperCase() + '</span> <code></code>';
      h.querySelector('code').textContent = path;
      const p = document.createElement('p'); p.textContent = op.summary || '';
      const codes = document.createElement('p');
      codes.textContent = 'Answers: ' + Object.keys(op.responses).join(', ');
      root.append(h, p, codes);
      const body = op.requestBody && op.requestBody.content['application/json'];
      if (body) {
        const name = body.schema.$ref.split('/').pop();
        const pre = document.createElement('pre');
        pre.textContent = JSON.stringify(spec.components.schemas[name], null, 2);
        root.append(pre);
      }
    }
  }
});
</script></body></html>
"""
