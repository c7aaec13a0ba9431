"""The work behind the routes imports no Flask: another route family (or a
script) can call it without a request."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[2] / "api"
FLASK_FREE = [
    "job_service",
    "item_sources",
    "stored_files",
    "images",
    "errors",
    "refusals",
    "service_container",
]
REQUEST_BOUND = {
    "flask",
    "segq.api.context",
    "segq.api.files",
    "segq.api.jobs",
    "segq.api.webhooks",
    "segq.api.health_routes",
}


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
    return found


@pytest.mark.parametrize("module", FLASK_FREE)
def test_module_imports_nothing_bound_to_a_request(module: str) -> None:
    imports = imported_modules(API / f"{module}.py")
    assert not {name for name in imports if name.split(".")[0] == "flask"} | (
        imports & REQUEST_BOUND
    )
