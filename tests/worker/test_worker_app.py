"""The worker's Celery app: settings read once, when the worker starts, and
the runtime built from them in the process that runs the tasks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from celery.contrib.testing.worker import start_worker

from segq.queue import WEBHOOK_QUEUE
from segq.settings import Settings
from segq.storage import S3Storage
from segq.worker.celery_app import create_worker_app
from segq.worker.runtime import runtime_of
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.services import TEST_BUCKET
from tests.support.tenants import Tenant

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_worker_app_module_reads_no_environment(tmp_path: Path) -> None:
    """Only asking for ``app`` (as ``celery -A worker.celery_app`` does)
    reads the settings, which make the key file and the broker's folders."""
    data_dir = tmp_path / "data"
    env = {**os.environ, "SEGQ_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}
    for name in [n for n in env if n.startswith("SEGQ_") and n != "SEGQ_DATA_DIR"]:
        del env[name]
    script = (
        "import os, sys\n"
        "import worker.celery_app as module\n"
        "made = os.path.exists(sys.argv[1])\n"
        "assert module.app is module.app\n"
        "print(made, module.app.conf.broker_url)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "filesystem://"]
    assert (data_dir / "secret_key").is_file()
    assert (data_dir / "broker" / "in").is_dir()


def test_a_threads_worker_builds_its_runtime_from_its_settings(
    tenant: Tenant, settings: Settings, storage: S3Storage
) -> None:
    """No fork and no worker_process_init: the worker's main process builds
    the runtime its threads run items with."""
    # The API's storage, this test's prefix of the bucket.
    storage_url = f"s3://{TEST_BUCKET}/{storage.prefix.rstrip('/')}"
    worker_app = create_worker_app(replace(settings, storage_url=storage_url))
    assert runtime_of(worker_app) is None
    file_id = tenant.upload(png_bytes()).json["id"]
    job_id = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    with start_worker(worker_app, pool="threads", perform_ping_check=False, shutdown_timeout=10):
        deadline = time.monotonic() + 60
        while (job := tenant.get_job(job_id).json)["status"] not in ("Completed", "Failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
    assert job["status"] == "Completed", job
    runtime = runtime_of(worker_app)
    assert runtime is not None and runtime.segment is not None
    assert runtime.segment.engine.name == "grabcut"
    assert runtime.segment.max_attempts == settings.max_attempts
    assert runtime.segment.lease_seconds == settings.lease_seconds


def test_segmenting_workers_sweep_orphaned_file_objects(settings: Settings) -> None:
    worker_app = create_worker_app(settings)
    with start_worker(worker_app, pool="threads", perform_ping_check=False, shutdown_timeout=10):
        passes = {thread.name for thread in threading.enumerate()}
    assert {"segq-orphan-sweeper", "segq-embedding-sweeper"} <= passes


def test_a_worker_that_only_delivers_webhooks_loads_no_engine(settings: Settings) -> None:
    worker_app = create_worker_app(settings)
    with start_worker(
        worker_app,
        pool="threads",
        perform_ping_check=False,
        shutdown_timeout=10,
        queues=[WEBHOOK_QUEUE],
    ):
        runtime = runtime_of(worker_app)
        passes = {thread.name for thread in threading.enumerate()}
    assert "segq-orphan-sweeper" not in passes
    assert runtime is not None
    assert runtime.segment is None
    assert runtime.delivery is not None
    assert runtime.delivery.rules.retry_delays == settings.webhook_retry_delays
