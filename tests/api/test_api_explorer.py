"""/docs as a person sees it: Swagger UI in headless Chromium (offline: its
assets come from the app), listing every operation of /openapi.json under
its resource's tag, and "Try it out" running a documented example as it is."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from sqlalchemy.orm import Session, sessionmaker

from tests.support.browser import BrowserSession
from tests.support.database import count_jobs
from tests.support.images import png_bytes
from tests.support.tenants import Tenant

JOBS_PATH = "/api/v1/projects/{project}/context/vision/segment"


@pytest.mark.slow
def test_docs_list_every_operation_under_its_tag(
    live_server: str, app: Flask, browser: BrowserSession
) -> None:
    spec: dict[str, Any] = app.test_client().get("/openapi.json").get_json()
    expected = sorted(
        (method, path, operation["tags"][0])
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    )
    assert len(expected) >= 30
    page = browser.new_page()
    page.goto(f"{live_server}/docs")
    page.wait_for_selector(".opblock")
    shown = page.eval_on_selector_all(
        ".opblock-tag-section",
        """sections => sections.flatMap(section => {
            const tag = section.querySelector(".opblock-tag").dataset.tag;
            return [...section.querySelectorAll(".opblock")].map(block => [
                [...block.classList].find(c => c.startsWith("opblock-") && c !== "opblock-summary"
                    && !c.startsWith("opblock-deprecated")).slice("opblock-".length),
                block.querySelector("[data-path]").dataset.path,
                tag,
            ]);
        })""",
    )
    assert sorted(tuple(row) for row in shown) == expected
    assert "default" not in {tag for _, _, tag in expected}
    assert page.locator(".info .title").inner_text().startswith("segq")


@pytest.mark.slow
def test_try_it_out_creates_a_job_from_the_documented_example(
    live_server: str,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    browser: BrowserSession,
) -> None:
    # The example names file 1: the first file uploaded (a fresh database).
    uploaded = tenant.upload(png_bytes(), "photo.png").json
    assert uploaded["id"] == 1
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{live_server}/docs")
    page.wait_for_selector(".opblock")

    page.locator("button.authorize").first.click()
    page.locator(".modal-ux input").first.fill(tenant.key)
    page.locator(".modal-ux button.authorize").first.click()
    page.locator(".modal-ux button.btn-done").first.click()

    operation = page.locator(f".opblock-post:has(.opblock-summary [data-path='{JOBS_PATH}'])")
    operation.locator(".opblock-summary").first.click()
    operation.locator("button.try-out__btn").click()
    operation.locator("tr[data-param-name='project'] input").fill(tenant.name)
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table .response .response-col_status").first
    status.wait_for()
    body = operation.locator(".live-responses-table .response .microlight").first.inner_text()
    assert status.inner_text().strip() == "200", body
    assert '"status": "Queued"' in body and f'"fileId": {uploaded["id"]}' in body
    assert count_jobs(sessions)[0] == 1
