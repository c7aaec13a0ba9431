"""The segq command line, run in-process on an embedded data directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from api import create_app
from segq.cli.main import main
from segq.settings import Settings
from tests.harness import Tenant


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("SEGQ_DATABASE_URL", "SEGQ_BROKER_URL", "SEGQ_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SEGQ_DATA_DIR", str(tmp_path / "fresh" / "data"))
    return tmp_path / "fresh" / "data"


def test_create_project_prints_a_working_key(data_dir: Path) -> None:
    runner = CliRunner()
    migrated = runner.invoke(main, ["migrate"])
    assert migrated.exit_code == 0, migrated.output
    created = runner.invoke(main, ["create-project", "acme"])
    assert created.exit_code == 0, created.output
    key = created.output.strip()
    assert key.startswith("segq_") and len(key) > 40

    app = create_app(Settings.from_env())
    tenant = Tenant(app.test_client(), "acme", key)
    assert tenant.client.get(tenant.url("/files"), headers=tenant.headers).status_code == 200

    again = runner.invoke(main, ["create-project", "acme"])
    assert again.exit_code != 0 and "exists already" in again.output
    bad = runner.invoke(main, ["create-project", "Not A Name"])
    assert bad.exit_code != 0 and "project names" in bad.output


def test_submit_checks_its_arguments_before_calling(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG")
    runner = CliRunner()
    common = [
        "submit",
        str(image),
        "--project",
        "p",
        "--api-key",
        "k",
        "--url",
        "http://127.0.0.1:9",
    ]
    point = runner.invoke(main, [*common, "--point", "0.5"])
    assert point.exit_code == 2 and "--point takes 2 or 3 numbers" in point.output
    box = runner.invoke(main, [*common, "--box", "a,b,c,d"])
    assert box.exit_code == 2 and "comma-separated numbers" in box.output
    unreachable = runner.invoke(main, [*common, "--point", "0.5,0.5"])
    assert unreachable.exit_code == 5 and "cannot reach segq" in unreachable.output


def test_keys_are_stored_only_as_hashes(data_dir: Path) -> None:
    import hashlib
    import sqlite3

    runner = CliRunner()
    key = runner.invoke(main, ["create-project", "acme"]).output.strip()
    with sqlite3.connect(data_dir / "segq.db") as connection:
        rows = connection.execute("SELECT * FROM api_keys").fetchall()
    assert len(rows) == 1
    stored = " ".join(str(value) for value in rows[0])
    assert key not in stored
    assert hashlib.sha256(key.encode()).hexdigest() in stored
    # The stored prefix is too short to be of use: 4 characters past "segq_".
    assert all(len(str(value)) < 12 or not key.startswith(str(value)) for value in rows[0])
