"""The segq command line, run in-process on an embedded data directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from segq.api.app import create_app
from segq.cli.job_commands import JOB_STATUSES
from segq.cli.main import main
from segq.coordinates import NORMALIZED_HINT
from segq.models import JobStatus
from segq.settings import Settings
from tests.support.tenants import Tenant


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


def _commands(group: click.Group, prefix: str = "segq") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix} {name}")


def test_every_option_read_from_the_environment_says_so_in_help_and_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_from_environment = [
        (where, option)
        for where, command in _commands(main)
        for option in command.params
        if isinstance(option, click.Option) and option.envvar
    ]
    assert len(read_from_environment) >= 3 * 6  # --url, --project, --api-key of each client command
    for where, option in read_from_environment:
        assert option.show_envvar, f"{where} {option.opts[0]} reads {option.envvar} unsaid"
    helped = CliRunner().invoke(main, ["jobs", "ls", "--help"])
    for variable in ("SEGQ_URL", "SEGQ_PROJECT", "SEGQ_API_KEY"):
        assert f"env var: {variable}" in helped.output
    for variable in ("SEGQ_PROJECT", "SEGQ_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    missing = CliRunner().invoke(main, ["jobs", "ls"])
    assert missing.exit_code == 2
    assert "Missing option '--project' (env var: 'SEGQ_PROJECT')" in missing.output


def test_the_command_lines_statuses_are_the_models() -> None:
    assert tuple(status.value for status in JobStatus) == JOB_STATUSES


def test_coordinates_in_pixels_are_refused_with_the_reason(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG")
    common = ["submit", str(image), "--project", "p", "--api-key", "k"]
    for option in (["--point", "320,240"], ["--point", "0.5,-0.1,0"], ["--box", "10,10,200,0.9"]):
        refused = CliRunner().invoke(main, [*common, *option])
        assert refused.exit_code == 2, option
        assert NORMALIZED_HINT in " ".join(refused.output.split()), refused.output
