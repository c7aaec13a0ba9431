"""JSON logs with request, project, job, item and attempt from the API and a
live `segq worker`, and the worker's Prometheus metrics scraped from its
main process while its prefork pool does the work."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.logs import configure_logging, log_context
from segq.settings import Settings
from segq.storage import S3Storage
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.live_processes import REPO, segq_env
from tests.support.services import free_port
from tests.support.tenants import make_tenant


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_api_json_logs_carry_the_request_id_and_project_and_an_access_line(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    celery_app: Any,
    captured_logs: io.StringIO,
) -> None:
    configure_logging("json", level=logging.INFO, stream=captured_logs)
    app = create_app(replace(settings, log_format="json"), storage=storage, celery=celery_app)
    client: FlaskClient = app.test_client()
    tenant = make_tenant(client, sessions, "acme")
    response = client.get(
        tenant.url("/context/vision/segment/12345"),
        headers={**tenant.headers, "X-Request-Id": "req-42"},
    )
    assert response.status_code == 404
    assert response.headers["X-Request-Id"] == "req-42"
    unnamed = client.get("/healthz")
    lines = json_lines(captured_logs.getvalue())
    access = [line for line in lines if line["logger"] == "segq.access"]
    assert len(access) == 2
    first, second = access
    assert first["request_id"] == "req-42"
    assert first["project"] == "acme"
    assert first["job_id"] == 12345
    assert (first["method"], first["status"]) == ("GET", 404)
    assert first["path"] == "/api/v1/projects/acme/context/vision/segment/12345"
    assert first["duration_ms"] >= 0
    assert first["level"] == "INFO" and first["time"]
    # A request without an id gets one, the same in its answer and its line.
    assert second["request_id"] == unnamed.headers["X-Request-Id"]
    assert "project" not in second
    assert "job_id" not in second


def test_text_logs_show_the_context_too(captured_logs: io.StringIO) -> None:
    configure_logging("text", level=logging.INFO, stream=captured_logs)
    with log_context(job_id=7, item_id=70, attempt=2):
        logging.getLogger("segq.test").info("segmented")
    logging.getLogger("segq.test").info("outside")
    first, second = captured_logs.getvalue().splitlines()
    assert first.endswith("segq.test: segmented [job_id=7 item_id=70 attempt=2]")
    assert second.endswith("segq.test: outside")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def test_a_live_worker_logs_json_and_serves_metrics_of_its_whole_pool(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    client: FlaskClient,
    tmp_path: Path,
) -> None:
    tenant = make_tenant(client, sessions, "acme")
    port = free_port()
    log_path = tmp_path / "worker.log"
    env = {
        **segq_env(settings, storage, tmp_path / "worker-data"),
        "SEGQ_MODEL": "grabcut",
        "SEGQ_RECONCILE_INTERVAL_SECONDS": "1",
        "SEGQ_LOG_FORMAT": "json",
        "SEGQ_METRICS_PORT": str(port),
        "SEGQ_JOB_RETENTION_DAYS": "30",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    # A count left by an earlier run must not be served as this one's.
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_1.db").write_bytes(b"stale")
    with log_path.open("wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "segq.cli.main", "worker", "--concurrency=2", "--loglevel=INFO"],
            env=env,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            file_ids = [tenant.upload(png_bytes(seed=s)).json["id"] for s in range(2)]
            body = {**scene_prompt_body(file_ids[0]), "items": [{"fileId": i} for i in file_ids]}
            job_id = tenant.post_job(body).json["jobId"]
            deadline = time.monotonic() + 90
            while tenant.get_job(job_id).json["status"] != "Completed":
                assert worker.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.3)
            completed = ("segq_worker_items_total", (("outcome", "completed"),))
            # The main process's own passes (every second) count too.
            passes = [
                ("segq_worker_retention_deleted_total", (("kind", "jobs"),)),
                ("segq_worker_reconciler_actions_total", (("action", "republished"),)),
            ]
            while (samples := _try_scrape(port)).get(completed) != 2.0 or any(
                key not in samples for key in passes
            ):
                assert time.monotonic() < deadline, (samples, log_path.read_text())
                time.sleep(0.3)
            pool = subprocess.run(
                ["pgrep", "-P", str(worker.pid)], capture_output=True, text=True, check=False
            ).stdout.split()
        finally:
            worker.terminate()
            worker.wait(timeout=30)

    assert len(pool) == 2  # the counts came from the pool's processes, summed
    assert samples[("segq_worker_encode_store_seconds_count", ())] == 2.0
    assert samples[("segq_worker_engine_seconds_count", (("engine", "grabcut"),))] == 2.0
    assert samples[("segq_worker_item_queue_wait_seconds_count", ())] == 2.0
    # Where each item's time went, stage by stage, beside its whole time.
    assert samples[("segq_worker_item_seconds_count", ())] == 2.0
    stages = {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "segq_worker_item_stage_seconds_count"
    }
    assert {
        "claim", "image_read", "engine", "encode_polygons", "encode_png",
        "storage_write", "completion", "notify",
    } <= set(stages)  # fmt: skip
    assert stages["engine"] == stages["completion"] == 2.0
    # GrabCut has no embedding: no cache tier is counted.
    assert not any(name == "segq_worker_embeddings_total" for name, _ in samples)

    lines = json_lines(log_path.read_text())
    finished = [line for line in lines if line["message"].endswith(": completed")]
    assert len(finished) == 2, log_path.read_text()
    for line in finished:
        assert line["job_id"] == job_id
        assert line["attempt"] == 1
        assert isinstance(line["item_id"], int)
        assert line["duration_ms"] > 0
        assert line["logger"] == "segq.worker.metrics"
    assert len({line["item_id"] for line in finished}) == 2
    # Celery's own lines are JSON too.
    assert any(line["logger"].startswith("celery") for line in lines)


def _try_scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        return scrape(port)
    except requests.ConnectionError:
        return {}
