"""``segq submit`` and ``segq jobs …`` driven through click against a live
segq (HTTP on loopback, Postgres, Redis, moto S3, a real GrabCut worker)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from celery import Celery
from click.testing import CliRunner, Result
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.cli.exit_codes import ExitCode
from segq.cli.main import main
from segq.models import StoredFile
from segq.storage import S3Storage
from tests.support.database import count_files
from tests.support.images import encode, scene
from tests.support.in_process_workers import grabcut_worker
from tests.support.tenants import Tenant

BOX = "0.2,0.15,0.8,0.85"


@pytest.fixture
def segq(
    live_server: str, tenant: Tenant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> CliRunner:
    """A runner whose commands reach the live server as the tenant, in a
    working folder of its own."""
    monkeypatch.chdir(tmp_path)
    return CliRunner(
        env={"SEGQ_URL": live_server, "SEGQ_PROJECT": tenant.name, "SEGQ_API_KEY": tenant.key}
    )


@pytest.fixture
def worker(
    celery_app: Celery, sessions: sessionmaker[Session], storage: S3Storage
) -> Iterator[None]:
    with grabcut_worker(celery_app, sessions, storage):
        yield


def run(runner: CliRunner, *arguments: str) -> Result:
    return runner.invoke(main, list(arguments), catch_exceptions=False)


def json_of(result: Result) -> Any:
    return json.loads(result.stdout)


def write_images(root: Path) -> None:
    (root / "photos/sub").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "photos/a.png").write_bytes(encode(scene(120, 90, seed=1)[0]))
    (root / "photos/b.png").write_bytes(encode(scene(120, 90, seed=2)[0]))
    (root / "photos/notes.txt").write_text("not an image")
    (root / "photos/sub/c.jpg").write_bytes(encode(scene(120, 90, seed=3)[0], "JPEG"))
    # The same bytes as a.png under another name: one item, two results.
    shutil.copy(root / "photos/a.png", root / "other/a-copy.png")


def job_count(runner: CliRunner) -> int:
    return len(json_of(run(runner, "jobs", "ls", "--json", "--limit", "1000")))


def test_submit_folders_and_globs_in_jobs_of_n_then_a_rerun_skips_them(
    segq: CliRunner, worker: None, tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    write_images(tmp_path)
    arguments = ["submit", "photos", "photos/**/*.jpg", "other/a-copy.png", "--box", BOX]
    arguments += ["--items-per-job", "2", "--out", "out", "--progress", "--json"]

    # Submitted without waiting (as if interrupted), then followed by a rerun
    # that finds the same jobs by their idempotency keys.
    submitted = run(segq, *arguments, "--no-wait")
    assert submitted.exit_code == 0, submitted.output
    assert {image["status"] for image in json_of(submitted)["images"]} == {"Submitted"}
    jobs = json_of(submitted)["jobs"]
    assert len(jobs) == 2  # three distinct images, two a job

    done = run(segq, *arguments)
    assert done.exit_code == ExitCode.OK, done.output
    report = json_of(done)
    assert report["jobs"] == jobs and job_count(segq) == 2
    # A status in any case.
    completed = json_of(run(segq, "jobs", "ls", "--status", "completed", "--json"))
    assert sorted(job["jobId"] for job in completed) == sorted(jobs)
    assert [image["image"] for image in report["images"]] == [
        "photos/a.png",
        "photos/b.png",
        "photos/sub/c.jpg",
        "other/a-copy.png",
    ]
    assert {image["status"] for image in report["images"]} == {"Completed"}
    assert "3/3" in done.stderr  # the progress bar

    result = json.loads((tmp_path / "out/photos/a.png.json").read_text())
    assert result["status"] == "Completed" and result["jobId"] in jobs
    [segment] = result["segments"]
    assert segment["maskFile"] == "a.png.mask-0.png" and "mask" not in segment
    mask = np.asarray(Image.open(tmp_path / "out/photos/a.png.mask-0.png")) == 255
    truth = scene(120, 90, seed=1)[1]
    assert (mask & truth).sum() / (mask | truth).sum() > 0.8
    copy = json.loads((tmp_path / "out/other/a-copy.png.json").read_text())
    assert copy["fileId"] == result["fileId"] and copy["segments"] == [
        {**segment, "maskFile": "a-copy.png.mask-0.png"}
    ]
    files = count_files(sessions)
    assert files == 3
    with sessions() as session:
        names = sorted(str(name) for name in session.scalars(select(StoredFile.name)))
    assert names == ["a.png", "b.png", "c.jpg"]  # the first of a.png and a-copy.png

    again = run(segq, *arguments)
    assert again.exit_code == 0
    assert {image["status"] for image in json_of(again)["images"]} == {"Skipped"}
    assert json_of(again)["jobs"] == [] and job_count(segq) == 2

    # A result removed is done again, as a job of its own; nothing is re-uploaded.
    (tmp_path / "out/photos/b.png.json").unlink()
    redone = run(segq, *arguments)
    statuses = {i["image"]: i["status"] for i in json_of(redone)["images"]}
    assert statuses["photos/b.png"] == "Completed" and statuses["photos/a.png"] == "Skipped"
    assert job_count(segq) == 3 and count_files(sessions) == files

    # Another prompt is other work.
    other = run(segq, "submit", "photos/a.png", "--point", "0.5,0.5", "--out", "out", "--json")
    assert json_of(other)["images"][0]["status"] == "Completed"


def test_prompts_per_image_from_a_jsonl_file(segq: CliRunner, worker: None, tmp_path: Path) -> None:
    write_images(tmp_path)
    lines = [
        {
            "image": "photos/a.png",
            "boundingBox": {"xMin": 0.2, "yMin": 0.15, "xMax": 0.8, "yMax": 0.85},
        },
        {
            "image": "photos/b.png",
            "prompts": [
                {"points": [{"x": 0.5, "y": 0.5, "label": 1}]},
                {"boundingBox": {"xMin": 0.0, "yMin": 0.0, "xMax": 0.3, "yMax": 0.3}},
            ],
        },
    ]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    done = run(segq, "submit", "--prompts-from", "prompts.jsonl", "--out", "out", "--json")
    assert done.exit_code == 0, done.output
    assert len(json_of(done)["jobs"]) == 2  # two requests, two jobs
    b = json.loads((tmp_path / "out/photos/b.png.json").read_text())
    assert [s["promptIndex"] for s in b["segments"]] == [0, 1]
    assert b["request"]["prompts"] == lines[1]["prompts"]
    assert (tmp_path / "out/photos/b.png.mask-1.png").exists()

    (tmp_path / "bad.jsonl").write_text('{"image": "photos/a.png"}\n')
    bad = run(segq, "submit", "--prompts-from", "bad.jsonl")
    assert bad.exit_code == ExitCode.USAGE and "bad.jsonl:1" in bad.output


def test_canceled_timed_out_refused_and_unreachable_have_their_exit_codes(
    segq: CliRunner,
    tmp_path: Path,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    live_server: str,
) -> None:
    write_images(tmp_path)
    arguments = ["submit", "photos/a.png", "--box", BOX, "--out", "out", "--json"]
    # No worker runs: the wait ends at its timeout.
    waited = run(segq, *arguments, "--timeout", "1")
    assert waited.exit_code == ExitCode.TIMED_OUT, waited.output
    [job_id] = json_of(waited)["jobs"]
    assert json_of(waited)["images"][0]["status"] == "Running"
    assert not (tmp_path / "out/photos/a.png.json").exists()

    canceled = run(segq, "jobs", "cancel", str(job_id), "--json")
    assert canceled.exit_code == 0 and json_of(canceled)["status"] == "Canceled"
    watched = run(segq, "jobs", "watch", str(job_id), "--json")
    assert watched.exit_code == ExitCode.FAILED_ITEMS and json_of(watched)["status"] == "Canceled"

    # A rerun asks again for what the canceled job never did.
    with grabcut_worker(celery_app, sessions, storage):
        resumed = run(segq, *arguments)
        assert resumed.exit_code == 0, resumed.output
        [new_job] = json_of(resumed)["jobs"]
        assert new_job != job_id
        watched = run(segq, "jobs", "watch", str(new_job), "--json")
        assert watched.exit_code == 0 and json_of(watched)["status"] == "Completed"
    refused = run(segq, "jobs", "cancel", str(new_job), "--json")  # already finished: 409
    assert refused.exit_code == ExitCode.REFUSED and json_of(refused)["error"]["status"] == 409

    listed = run(segq, "jobs", "ls")
    assert listed.exit_code == 0 and listed.stdout.splitlines()[0].split()[:2] == [
        str(new_job),
        "Completed",
    ]
    got = run(segq, "jobs", "get", str(new_job))
    assert "1 segment(s)" in got.stdout and "viewer: http://" in got.stdout
    opened = run(segq, "jobs", "open", str(new_job), "--no-browser", "--json")
    link = json_of(opened)["viewUrl"]
    assert link.startswith(live_server) and requests.get(link, timeout=10).status_code == 200

    missing = run(segq, "jobs", "get", "999999", "--json")
    assert missing.exit_code == ExitCode.REFUSED and json_of(missing)["error"]["status"] == 404
    wrong_key = run(segq, "jobs", "ls", "--api-key", "segq_wrong")
    assert wrong_key.exit_code == ExitCode.REFUSED and "401" in wrong_key.stderr
    nowhere = run(segq, "jobs", "ls", "--url", "http://127.0.0.1:9")
    assert nowhere.exit_code == ExitCode.UNREACHABLE and "cannot reach segq" in nowhere.stderr
    assert run(segq, "submit", "nothing/*.png", "--box", BOX).exit_code == ExitCode.USAGE
    no_prompt = run(segq, "submit", "photos/a.png")
    assert no_prompt.exit_code == ExitCode.USAGE and "no prompt" in no_prompt.output


def test_text_on_a_server_without_sam3_is_refused_naming_the_setting(
    segq: CliRunner, tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    write_images(tmp_path)
    (tmp_path / "text.jsonl").write_text(json.dumps({"image": "photos/a.png", "text": "cat"}))
    for arguments in (
        ["photos/a.png", "--text", "person"],
        ["--prompts-from", "text.jsonl"],
    ):
        refused = run(segq, "submit", *arguments, "--out", "out", "--json")
        assert refused.exit_code == ExitCode.REFUSED, refused.output
        error = json_of(refused)["error"]
        assert error["status"] == 422 and "SEGQ_MODEL=sam3" in error["message"]
    assert job_count(segq) == 0 and not (tmp_path / "out").exists()
