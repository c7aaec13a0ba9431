"""README.md's "Using it" section, run as written: the shell blocks marked
``<!-- run -->`` (tests/support/markdown_blocks.py reads them), in one bash session,
in a folder holding the images they name, against a fresh data folder
(segq's embedded default: SQLite, a filesystem broker, local-disk storage,
the classical engine). The one change: port 8080
becomes a free port, so that the test never meets another server. Every
step's output is checked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import free_port
from tests.support.images import encode, scene
from tests.support.markdown_blocks import PAGES, README, code_blocks

#: Printed before each command the script runs: the command's first line.
STEP_MARK = "@@step "
TRACE = (
    "__segq_step() { printf '\\n" + STEP_MARK + "%s\\n' \"${1%%$'\\n'*}\"; }\n"
    "trap '__segq_step \"$BASH_COMMAND\"' DEBUG\n"
)


def steps(output: str) -> list[tuple[str, str]]:
    """(command, what it printed) for each command the script ran."""
    found = []
    for chunk in output.split("\n" + STEP_MARK)[1:]:
        command, _, printed = chunk.partition("\n")
        found.append((command, printed.strip()))
    return found


def json_printed(printed: str) -> Any:
    """The JSON document a step printed (curl -s prints no newline after it)."""
    start = printed.index("{")
    document, _ = json.JSONDecoder().raw_decode(printed[start:])
    return document


@pytest.mark.slow
def test_the_readme_s_using_it_section_runs_as_written(tmp_path: Path) -> None:
    blocks = [block for block in code_blocks(README) if "run" in block.marks]
    assert [block.language for block in blocks] == ["sh", "sh"]
    # Marked blocks elsewhere would not be run by anything.
    assert [
        block for page in PAGES for block in code_blocks(page) if "run" in block.marks
    ] == blocks
    script = "\n".join(block.text for block in blocks).replace("8080", str(free_port()))
    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    (work / "shots/day-1").mkdir(parents=True)
    (work / "photos/a.png").write_bytes(encode(scene(120, 90, seed=1)[0]))
    (work / "photos/b.jpg").write_bytes(encode(scene(120, 90, seed=2)[0], "JPEG"))
    (work / "shots/day-1/c.jpg").write_bytes(encode(scene(120, 90, seed=3)[0], "JPEG"))
    (work / "photo.jpg").write_bytes(encode(scene(160, 120, seed=4)[0], "JPEG"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("SEGQ_")}
    # segq on the PATH, as the README asks; a data folder of the test's own.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SEGQ_DATA_DIR"] = str(tmp_path / "data")
    shell = subprocess.Popen(
        ["bash", "-c", "set -euo pipefail\n" + TRACE + script],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Its own process group: whatever the script left running is stopped below.
        start_new_session=True,
    )
    try:
        output, errors = shell.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGTERM)
    assert shell.returncode == 0, f"{output}\n{errors}"

    ran = steps(output)
    commands = [command.split()[0] for command, _ in ran]
    assert commands == [
        "segq",  # migrate
        "export",
        "export",
        "segq",  # serve
        "segq",  # worker
        "curl",  # readyz
        "segq",  # submit
        "curl",  # upload
        "JOB=$(curl",
        "curl",  # the job
        "kill",
    ], ran
    printed = [text for _, text in ran]
    assert "database is at the latest schema" in printed[0]
    assert json_printed(printed[5])["status"] == "ready"
    submitted = printed[6].splitlines()
    for image in ("photos/a.png", "photos/b.jpg", "shots/day-1/c.jpg"):
        assert any(
            line.startswith("Completed") and f" {image} -> masks/{image}.json" in line
            for line in submitted
        ), submitted
        result = json.loads((work / f"masks/{image}.json").read_text())
        assert result["status"] == "Completed" and result["segments"]
        assert (work / f"masks/{image}.mask-0.png").is_file()
    uploaded = json_printed(printed[7])
    assert uploaded["externalId"] == "cam-3/0001" and uploaded["name"] == "photo.jpg"
    job = json_printed(printed[9])
    assert job["status"] == "Completed", job
    [item] = job["items"]
    assert item["fileExternalId"] == "cam-3/0001" and item["segments"]
