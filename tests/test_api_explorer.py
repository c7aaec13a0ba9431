"""/docs as a person sees it: Swagger UI loaded in headless Chromium (offline:
its assets come from the app), listing every operation of /openapi.json."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


class OperationBlocks(HTMLParser):
    """The (method, path) of each operation Swagger UI rendered: a block
    ``opblock opblock-<method>`` holding a ``data-path`` summary."""

    def __init__(self) -> None:
        super().__init__()
        self.method: str | None = None
        self.operations: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        classes = (found.get("class") or "").split()
        if "opblock" in classes:
            self.method = next(
                (
                    c.removeprefix("opblock-")
                    for c in classes
                    if c.removeprefix("opblock-") in HTTP_METHODS
                ),
                None,
            )
        path = found.get("data-path")
        if path is not None and self.method is not None:
            self.operations.append((self.method, path))
            self.method = None


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)
def test_docs_list_every_operation_in_a_browser(
    live_server: str, app: Flask, tmp_path: Path
) -> None:
    spec: dict[str, Any] = app.test_client().get("/openapi.json").get_json()
    expected = sorted(
        (method, path) for path, operations in spec["paths"].items() for method in operations
    )
    assert len(expected) >= 15
    assert CHROMIUM is not None
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            # Virtual time runs the page's scripts (fetching /openapi.json
            # and rendering it) before the DOM is written out.
            "--virtual-time-budget=20000",
            "--dump-dom",
            f"{live_server}/docs",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    blocks = OperationBlocks()
    blocks.feed(dom)
    assert sorted(blocks.operations) == expected
    assert "segq API" in dom
