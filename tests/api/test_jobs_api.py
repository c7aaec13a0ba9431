"""Job creation and reading over HTTP: the contract's shapes, its errors, tenancy."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from segq.api.json_body import max_job_body_bytes
from segq.coordinates import NORMALIZED_HINT
from segq.settings import Settings
from tests.support.database import count_jobs
from tests.support.images import cognite_sample_body, png_bytes
from tests.support.refusals import MALFORMED_JSON_BODIES
from tests.support.services import queued_messages
from tests.support.tenants import Tenant

#: Job bodies that are not JSON objects segq can read, each answered 400
#: (also through the real HTTP server: tests/system/test_http_server.py).


@pytest.fixture
def file_id(tenant: Tenant) -> int:
    response = tenant.upload(png_bytes(), externalId="cam-3/0001")
    assert response.status_code == 201
    return int(response.json["id"])


def test_cognite_sample_body_is_accepted_as_is(tenant: Tenant, file_id: int) -> None:
    body = cognite_sample_body(file_id)
    response = tenant.post_job(body)
    assert response.status_code == 200, response.json
    job = response.json
    assert job["status"] == "Queued"
    assert job["items"] == [{"fileId": file_id, "fileExternalId": "cam-3/0001"}]
    assert job["points"] == body["points"]
    assert job["boundingBox"] == body["boundingBox"]
    assert job["startTime"] is None and job["errorMessage"] is None
    assert isinstance(job["createdTime"], int) and job["createdTime"] > 1_700_000_000_000
    assert response.headers["Location"].endswith(f"/context/vision/segment/{job['jobId']}")
    # Published after the commit: one wake-up message per item.
    assert queued_messages() == 1

    fetched = tenant.get_job(job["jobId"])
    assert fetched.status_code == 200
    assert fetched.json["status"] == "Queued"
    assert fetched.json["prompt"] == {"points": body["points"], "boundingBox": body["boundingBox"]}
    assert fetched.json["progress"] == {"total": 1, "completed": 0, "failed": 0}
    assert fetched.headers["Retry-After"] == "1"


def test_items_by_external_id_and_several_items(tenant: Tenant, file_id: int) -> None:
    second = tenant.upload(png_bytes(seed=1)).json["id"]
    response = tenant.post_job(
        {
            "items": [{"fileExternalId": "cam-3/0001"}, {"fileId": second}],
            "boundingBox": {"xMin": 0.1, "yMin": 0.1, "xMax": 0.9, "yMax": 0.9},
        }
    )
    assert response.status_code == 200, response.json
    assert [item["fileId"] for item in response.json["items"]] == [file_id, second]
    assert queued_messages() == 2


BAD_BODIES: list[tuple[str, Any, int, str]] = [
    ("points as string", {"points": "0.5,0.5"}, 400, "points"),
    ("x as string", {"points": [{"x": "0.5", "y": 0.5, "label": 1}]}, 400, "points[0].x"),
    ("x above 1", {"points": [{"x": 1.5, "y": 0.5, "label": 1}]}, 400, "points[0].x"),
    ("y below 0", {"points": [{"x": 0.5, "y": -0.1, "label": 1}]}, 400, "points[0].y"),
    ("label 2", {"points": [{"x": 0.5, "y": 0.5, "label": 2}]}, 400, "points[0].label"),
    ("label true", {"points": [{"x": 0.5, "y": 0.5, "label": True}]}, 400, "points[0].label"),
    ("unknown field", {"points": [{"x": 0.5, "y": 0.5}], "colour": "red"}, 400, "colour"),
    ("unknown point field", {"points": [{"x": 0.5, "y": 0.5, "z": 1}]}, 400, "points[0].z"),
    ("no prompt", {}, 422, "point"),
    (
        "inverted box",
        {"boundingBox": {"xMin": 0.6, "yMin": 0.1, "xMax": 0.4, "yMax": 0.9}},
        422,
        "xMin",
    ),
    (
        "empty box",
        {"boundingBox": {"xMin": 0.5, "yMin": 0.1, "xMax": 0.5, "yMax": 0.9}},
        422,
        "xMin",
    ),
    ("box missing side", {"boundingBox": {"xMin": 0.1, "yMin": 0.1, "xMax": 0.5}}, 400, "yMax"),
    (
        "duplicate points",
        {"points": [{"x": 0.5, "y": 0.5}, {"x": 0.5, "y": 0.5}]},
        422,
        "points[1]",
    ),
    ("too many points", {"points": [{"x": i / 100, "y": 0.5} for i in range(40)]}, 400, "points"),
    (
        "multimask as string",
        {"points": [{"x": 0.5, "y": 0.5}], "multimaskOutput": "yes"},
        400,
        "multimaskOutput",
    ),
    ("unknown output", {"points": [{"x": 0.5, "y": 0.5}], "outputs": ["jpeg"]}, 400, "outputs[0]"),
]


@pytest.mark.parametrize(
    ("case", "fields", "status", "mentions"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
def test_bad_bodies_get_the_envelope_and_store_nothing(
    tenant: Tenant,
    file_id: int,
    sessions: sessionmaker[Session],
    case: str,
    fields: dict[str, Any],
    status: int,
    mentions: str,
) -> None:
    response = tenant.post_job({"items": [{"fileId": file_id}], **fields})
    assert response.status_code == status, response.json
    error = response.json["error"]
    assert error["code"] == status
    assert mentions in error["message"]
    assert response.headers["X-Request-Id"]
    assert count_jobs(sessions) == (0, 0)
    assert queued_messages() == 0


@pytest.mark.parametrize("raw", MALFORMED_JSON_BODIES.values(), ids=MALFORMED_JSON_BODIES.keys())
def test_malformed_json_is_400(tenant: Tenant, raw: bytes, sessions: sessionmaker[Session]) -> None:
    response = tenant.client.post(
        tenant.url("/context/vision/segment"),
        data=raw,
        headers=tenant.headers,
        content_type="application/json",
    )
    assert response.status_code == 400, response.json
    assert response.json["error"]["code"] == 400
    assert count_jobs(sessions) == (0, 0)


def test_wrong_content_type_is_415(tenant: Tenant, file_id: int) -> None:
    response = tenant.client.post(
        tenant.url("/context/vision/segment"),
        data=json.dumps(cognite_sample_body(file_id)),
        headers=tenant.headers,
        content_type="text/plain",
    )
    assert response.status_code == 415


def test_unknown_and_repeated_files_are_listed(
    tenant: Tenant, file_id: int, sessions: sessionmaker[Session]
) -> None:
    response = tenant.post_job(
        {
            "items": [{"fileId": file_id}, {"fileId": 999999}, {"fileExternalId": "nope"}],
            "points": [{"x": 0.5, "y": 0.5}],
        }
    )
    assert response.status_code == 400
    assert response.json["error"]["missing"] == [{"id": 999999}, {"externalId": "nope"}]
    repeated = tenant.post_job(
        {
            "items": [{"fileId": file_id}, {"fileExternalId": "cam-3/0001"}],
            "points": [{"x": 0.5, "y": 0.5}],
        }
    )
    assert repeated.status_code == 400
    assert repeated.json["error"]["duplicated"] == [{"externalId": "cam-3/0001"}]
    assert "missing" not in repeated.json["error"]
    assert count_jobs(sessions) == (0, 0)


def test_item_must_name_exactly_one_file(tenant: Tenant, file_id: int) -> None:
    both = tenant.post_job(
        {
            "items": [{"fileId": file_id, "fileExternalId": "cam-3/0001"}],
            "points": [{"x": 0.5, "y": 0.5}],
        }
    )
    assert both.status_code == 400
    neither = tenant.post_job({"items": [{}], "points": [{"x": 0.5, "y": 0.5}]})
    assert neither.status_code == 400
    none = tenant.post_job({"items": [], "points": [{"x": 0.5, "y": 0.5}]})
    assert none.status_code == 400


def test_too_many_items_is_422(tenant: Tenant, file_id: int) -> None:
    response = tenant.post_job(
        {"items": [{"fileId": file_id}] * 51, "points": [{"x": 0.5, "y": 0.5}]}
    )
    assert response.status_code == 422


def test_keys_and_tenancy(tenant: Tenant, other_tenant: Tenant, file_id: int) -> None:
    job_id = tenant.post_job(cognite_sample_body(file_id)).json["jobId"]
    client = tenant.client
    no_key = client.get(tenant.url(f"/context/vision/segment/{job_id}"))
    assert no_key.status_code == 401 and no_key.json["error"]["code"] == 401
    bad_key = client.get(
        tenant.url(f"/context/vision/segment/{job_id}"),
        headers={"Authorization": "Bearer segq_nope"},
    )
    assert bad_key.status_code == 401
    basic = client.get(
        tenant.url(f"/context/vision/segment/{job_id}"), headers={"Authorization": "Basic abc"}
    )
    assert basic.status_code == 401
    # Another project's key on this project's path: 403.
    wrong_path = client.get(
        tenant.url(f"/context/vision/segment/{job_id}"), headers=other_tenant.headers
    )
    assert wrong_path.status_code == 403
    # On its own path, this project's ids do not exist: 404, never 403.
    assert other_tenant.get_job(job_id).status_code == 404
    foreign_file = client.get(other_tenant.url(f"/files/{file_id}"), headers=other_tenant.headers)
    assert foreign_file.status_code == 404
    referencing = other_tenant.post_job(cognite_sample_body(file_id))
    assert referencing.status_code == 400
    assert referencing.json["error"]["missing"] == [{"id": file_id}]
    deleting = client.delete(other_tenant.url(f"/files/{file_id}"), headers=other_tenant.headers)
    assert deleting.status_code == 404
    listed = client.get(
        other_tenant.url("/files?externalId=cam-3/0001"), headers=other_tenant.headers
    )
    assert listed.status_code == 200 and listed.json["items"] == []
    canceling = client.post(
        other_tenant.url(f"/context/vision/segment/{job_id}/cancel"), headers=other_tenant.headers
    )
    assert canceling.status_code == 404
    assert tenant.get_job(job_id).json["status"] == "Queued"
    assert (
        tenant.client.get(tenant.url(f"/files/{file_id}"), headers=tenant.headers).status_code
        == 200
    )


def test_unknown_job_and_route_get_the_envelope(tenant: Tenant) -> None:
    missing = tenant.get_job(12345)
    assert missing.status_code == 404 and missing.json["error"]["code"] == 404
    route = tenant.client.get("/api/v1/nothing-here")
    assert route.status_code == 404 and route.json["error"]["code"] == 404
    method = tenant.client.put(tenant.url("/files"), headers=tenant.headers)
    assert method.status_code == 405 and method.json["error"]["code"] == 405


def test_idempotency_key_returns_the_first_job(
    tenant: Tenant, file_id: int, sessions: sessionmaker[Session]
) -> None:
    body = cognite_sample_body(file_id)
    first = tenant.post_job(body, headers={"Idempotency-Key": "batch-7"})
    again = tenant.post_job(body, headers={"Idempotency-Key": "batch-7"})
    assert first.status_code == again.status_code == 200
    assert again.json["jobId"] == first.json["jobId"]
    different = tenant.post_job(
        {**body, "multimaskOutput": True}, headers={"Idempotency-Key": "batch-7"}
    )
    assert different.status_code == 409
    assert count_jobs(sessions) == (1, 1)
    too_long = tenant.post_job(body, headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400


def test_cdf_version_header_is_ignored(tenant: Tenant, file_id: int) -> None:
    response = tenant.post_job(
        cognite_sample_body(file_id), headers={"cdf-version": "20230101-beta"}
    )
    assert response.status_code == 200


def test_oversized_json_is_413_also_when_chunked(
    tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> None:
    # A job body may hold one inline image as large as an upload, in base64.
    limit = max_job_body_bytes(settings.max_upload_bytes)
    body = json.dumps(
        {"items": [{"fileId": 1}], "points": [{"x": 0.5, "y": 0.5}], "pad": "x" * limit}
    )
    sized = tenant.client.post(
        tenant.url("/context/vision/segment"),
        data=body,
        headers=tenant.headers,
        content_type="application/json",
    )
    assert sized.status_code == 413 and sized.json["error"]["code"] == 413

    # No Content-Length: the body ends where the stream ends, as a WSGI
    # server presents a chunked request.
    chunked = tenant.client.post(
        tenant.url("/context/vision/segment"),
        input_stream=io.BytesIO(body.encode()),
        headers={**tenant.headers, "Transfer-Encoding": "chunked"},
        content_type="application/json",
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert chunked.status_code == 413, chunked.json
    assert count_jobs(sessions) == (0, 0)


def test_idempotency_holds_under_concurrent_identical_requests(
    app: Any, tenant: Tenant, file_id: int, sessions: sessionmaker[Session], other_tenant: Tenant
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = cognite_sample_body(file_id)

    def post(_: int) -> tuple[int, int]:
        response = app.test_client().post(
            tenant.url("/context/vision/segment"),
            json=body,
            headers={**tenant.headers, "Idempotency-Key": "same-20"},
        )
        return response.status_code, response.json["jobId"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(post, range(20)))
    assert {status for status, _ in answers} == {200}
    assert len({job_id for _, job_id in answers}) == 1
    assert count_jobs(sessions) == (1, 1)
    assert queued_messages() == 1  # only the winner published
    # Keys are per project: the same key elsewhere is another job.
    other_file = other_tenant.upload(png_bytes()).json["id"]
    elsewhere = other_tenant.post_job(
        cognite_sample_body(other_file), headers={"Idempotency-Key": "same-20"}
    )
    assert elsewhere.status_code == 200 and elsewhere.json["jobId"] != answers[0][1]


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        ({"points": [{"x": 320, "y": 0.5}]}, "points[0].x"),
        ({"points": [{"x": 0.5, "y": 0.5}, {"x": 0.5, "y": -3}]}, "points[1].y"),
        ({"boundingBox": {"xMin": 0.1, "yMin": 0.1, "xMax": 200, "yMax": 0.9}}, "boundingBox.xMax"),
        ({"prompts": [{"points": [{"x": 0.5, "y": 240}]}]}, "prompts[0].points[0].y"),
        (
            {"prompts": [{"boundingBox": {"xMin": 10, "yMin": 0, "xMax": 1, "yMax": 1}}]},
            "prompts[0].boundingBox.xMin",
        ),
    ],
)
def test_a_coordinate_out_of_0_to_1_is_refused_saying_coordinates_are_normalized(
    tenant: Tenant, file_id: int, prompt: dict[str, Any], field: str
) -> None:
    response = tenant.post_job({"items": [{"fileId": file_id}], **prompt})
    assert response.status_code == 400
    message = response.json["error"]["message"]
    assert message.startswith(f"{field}: ") and message.endswith(NORMALIZED_HINT)
