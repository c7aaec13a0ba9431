"""GET /context/vision/segment: newest first, filtered, with cursor pages
that hold while jobs are created."""

from __future__ import annotations

from typing import Any

from tests.support.images import png_bytes, scene_prompt_body
from tests.support.tenants import Tenant


def listing(tenant: Tenant, query: str = "") -> Any:
    response = tenant.client.get(
        tenant.url(f"/context/vision/segment{query}"), headers=tenant.headers
    )
    assert response.status_code == 200, response.json
    return response.json


def test_pages_stay_correct_while_jobs_are_created(tenant: Tenant, other_tenant: Tenant) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    created = [tenant.post_job(scene_prompt_body(file_id)).json["jobId"] for _ in range(5)]
    first = listing(tenant, "?limit=2")
    assert [job["jobId"] for job in first["items"]] == created[::-1][:2]
    assert first["items"][0]["progress"] == {"total": 1, "completed": 0, "failed": 0}
    # New jobs arrive between pages: later pages neither repeat nor skip.
    newer = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    second = listing(tenant, f"?limit=2&cursor={first['nextCursor']}")
    third = listing(tenant, f"?limit=2&cursor={second['nextCursor']}")
    seen = [job["jobId"] for page in (first, second, third) for job in page["items"]]
    assert seen == created[::-1]
    assert third["nextCursor"] is None
    assert listing(tenant)["items"][0]["jobId"] == newer
    # Another project sees none of them.
    assert listing(other_tenant)["items"] == []


def test_filters_by_status_and_creation_time(tenant: Tenant) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    jobs = [tenant.post_job(scene_prompt_body(file_id)).json for _ in range(3)]
    tenant.client.post(
        tenant.url(f"/context/vision/segment/{jobs[1]['jobId']}/cancel"), headers=tenant.headers
    )
    assert [j["jobId"] for j in listing(tenant, "?status=Canceled")["items"]] == [jobs[1]["jobId"]]
    assert len(listing(tenant, "?status=Queued")["items"]) == 2
    since = jobs[2]["createdTime"]
    recent = listing(tenant, f"?createdAfter={since}")["items"]
    assert jobs[2]["jobId"] in [j["jobId"] for j in recent]
    assert all(j["createdTime"] >= since for j in recent)
    assert all(
        j["createdTime"] < since for j in listing(tenant, f"?createdBefore={since}")["items"]
    )


def test_bad_list_arguments_are_400(tenant: Tenant) -> None:
    for query in (
        "?status=Done",
        "?limit=0",
        "?limit=1001",
        "?limit=x",
        "?cursor=%%%",
        "?cursor=LTE",
        "?createdAfter=-5",
    ):
        response = tenant.client.get(
            tenant.url(f"/context/vision/segment{query}"), headers=tenant.headers
        )
        assert response.status_code == 400, query
        assert response.json["error"]["code"] == 400
