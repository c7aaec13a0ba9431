"""The embedded default: no configuration, so SQLite, the filesystem broker,
local-disk storage and the classical engine, all under SEGQ_DATA_DIR."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from celery.contrib.testing.worker import start_worker
from PIL import Image

from segq.api.app import create_app
from segq.db import make_engine, make_session_factory
from segq.projects import create_project
from segq.schema_migrations import upgrade_to_head
from segq.settings import Settings
from segq.worker.celery_app import create_worker_app
from segq.worker.runtime import segment_runtime_of
from tests.support.images import cognite_sample_body, png_bytes
from tests.support.tenants import Tenant

REPO = Path(__file__).resolve().parents[2]


def test_embedded_default_segments_through_the_queue(tmp_path: Path) -> None:
    settings = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path)})
    assert settings.database_url.startswith("sqlite:///")
    assert settings.broker_url == "filesystem://"
    assert settings.storage_url.startswith("file://")
    engine = make_engine(settings.database_url)
    upgrade_to_head(engine)
    with make_session_factory(engine).begin() as session:
        _, key = create_project(session, "local")
    app = create_app(settings)
    tenant = Tenant(app.test_client(), "local", key)
    # The worker as `segq worker` makes it, from the same settings: its
    # runtime is built when it starts, from nothing a test attaches.
    worker_app = create_worker_app(settings)
    file_id = tenant.upload(png_bytes(160, 120)).json["id"]
    job_id = tenant.post_job(cognite_sample_body(file_id)).json["jobId"]
    with start_worker(worker_app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        deadline = time.monotonic() + 60
        while (job := tenant.get_job(job_id).json)["status"] not in ("Completed", "Failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
    assert segment_runtime_of(worker_app).engine.name == "grabcut"
    assert job["status"] == "Completed", job
    url = job["items"][0]["segments"][0]["mask"]["url"]
    # No SEGQ_PUBLIC_URL and no `segq serve` to name its address: the link
    # is relative to the API's root, whatever Host the request named.
    assert url.startswith("/objects/")
    served = tenant.client.get(url)
    assert served.status_code == 200
    assert Image.open(io.BytesIO(served.data)).size == (160, 120)
    engine.dispose()


@pytest.mark.slow
def test_segq_demo_runs_from_the_command_line(tmp_path: Path) -> None:
    """What `make demo` runs: real `segq serve` and `segq worker` processes."""
    env = {**os.environ, "SEGQ_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO)}
    for name in [n for n in env if n.startswith("SEGQ_") and n != "SEGQ_DATA_DIR"]:
        del env[name]
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "segq.cli.main", "demo", "--out", str(out), "--timeout", "120"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"status": "Completed"' in done.stdout
    mask = np.asarray(Image.open(out / "mask.png"))
    sample = Image.open(out / "sample.png")
    assert mask.shape == (sample.height, sample.width)
    assert 0.02 < (mask == 255).mean() < 0.5  # an object, neither nothing nor everything
    assert Image.open(out / "overlay.png").size == sample.size
