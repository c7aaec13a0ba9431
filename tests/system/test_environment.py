"""What an install gives: each clone's `make install` runs that clone's code,
and a built wheel (not an editable install) carries everything `segq migrate`
needs."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Where the Makefile keeps the locked dependencies, one folder per lock.
DEPS_ROOT = Path(os.environ.get("DEPS_ROOT", Path.home() / ".cache/segq/deps"))
#: The folders whose modules a wheel must carry, by where they land in it.
INSTALLED_FOLDERS = {
    "segq": "segq",
    "api": "segq/api",
    "worker": "segq/worker",
    "migrations": "segq/migrations",
}


def run(command: list[str], cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def locked_deps_built() -> bool:
    # The Makefile's key: the lock and the --no-deps list, hashed together.
    locked = (REPO / "requirements.lock").read_bytes() + (
        REPO / "requirements-nodeps.txt"
    ).read_bytes()
    lock_hash = hashlib.sha256(locked).hexdigest()[:16]
    python = "py{}{}".format(*sys.version_info[:2])
    return (DEPS_ROOT / f"{python}-{lock_hash}" / ".complete").exists()


def clone_file(clone: Path, code: str) -> str:
    """Where `import` resolves in the clone's own venv, run from outside the clone
    (so the current folder cannot stand in for the install)."""
    return run([str(clone / ".venv/bin/python"), "-c", code], cwd=clone.parent).strip()


@pytest.mark.slow
@pytest.mark.skipif(
    not locked_deps_built(),
    reason="the locked dependencies are not built in DEPS_ROOT (make install builds them)",
)
def test_two_clones_installed_one_after_the_other_each_run_their_own_code(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for clone in (first, second):
        run(["git", "clone", "-q", str(REPO), str(clone)], cwd=tmp_path)
        # The committed Makefile and pyproject.toml may lag the working tree
        # while they are being changed; the clones test the working tree's.
        for name in ("Makefile", "pyproject.toml"):
            shutil.copy2(REPO / name, clone / name)
        run(["make", "install", f"DEPS_ROOT={DEPS_ROOT}"], cwd=clone)

    for clone in (first, second):
        assert clone_file(clone, "import segq; print(segq.__file__)") == str(
            clone / "segq/__init__.py"
        )
        # Console scripts are the clone's own too.
        script = (clone / ".venv/bin/segq").read_text().splitlines()[0]
        assert script == f"#!{clone}/.venv/bin/python"
        assert "migrate" in run([str(clone / ".venv/bin/segq"), "--help"], cwd=tmp_path)
        # The shared dependencies are seen, not copied into the clone.
        torch_file = clone_file(clone, "import torch; print(torch.__file__)")
        assert torch_file.startswith(str(DEPS_ROOT))

    shutil.rmtree(second)
    assert clone_file(first, "import segq.cli.main; print(segq.cli.main.__file__)") == str(
        first / "segq/cli/main.py"
    )
    assert "migrate" in run([str(first / ".venv/bin/segq"), "--help"], cwd=tmp_path)


def build_wheel(tmp_path: Path) -> Path:
    # A copy of the working tree, so the build's own folders stay out of the repo.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "demo-out"
        ),
    )
    wheels = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    run([*pip_wheel, str(source), "-w", str(wheels)], cwd=tmp_path)
    (wheel,) = wheels.glob("segq-*.whl")
    return wheel


@pytest.mark.slow
def test_a_wheel_carries_every_module_and_its_segq_migrate_builds_the_schema(
    tmp_path: Path,
) -> None:
    wheel = build_wheel(tmp_path)
    carried = set(zipfile.ZipFile(wheel).namelist())
    missing = [
        f"{folder}/{path.relative_to(REPO / folder)}"
        for folder, installed in INSTALLED_FOLDERS.items()
        for path in (REPO / folder).rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and f"{installed}/{path.relative_to(REPO / folder)}" not in carried
    ]
    assert missing == [], f"pyproject.toml's package list leaves out: {missing}"

    # A throwaway venv: the wheel installed into it, the dependencies seen from
    # this interpreter's site folders (not re-installed), and nothing of the repo.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin/python"
    own_site = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path
    ).strip()
    ours = sysconfig.get_path("purelib")
    dependency_sites = [path for path in sys.path if path.endswith("site-packages")]
    assert ours in dependency_sites
    Path(own_site, "dependencies.pth").write_text("\n".join(dependency_sites) + "\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)

    located = run([str(python), "-c", "import segq; print(segq.__file__)"], cwd=tmp_path)
    assert located.strip() == str(Path(own_site, "segq/__init__.py"))

    database = tmp_path / "fresh.db"
    environment = {**os.environ, "SEGQ_DATABASE_URL": f"sqlite:///{database}"}
    environment.pop("PYTHONPATH", None)
    migrated = subprocess.run(
        [str(venv / "bin/segq"), "migrate"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert {"jobs", "job_items", "projects", "alembic_version"} <= tables
