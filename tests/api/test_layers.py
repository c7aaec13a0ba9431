"""The layer rules (pyproject.toml's [tool.importlinter] contracts) hold,
checked by import-linter over the whole import graph: transitive imports,
imports inside functions and under TYPE_CHECKING included. `make lint` runs
the same check; this test makes a bare `pytest` enforce it too."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
    ran = subprocess.run(
        [Path(sys.executable).parent / "lint-imports", "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"Contracts: {len(contracts)} kept, 0 broken." in ran.stdout
