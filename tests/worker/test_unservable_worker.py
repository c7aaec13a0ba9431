"""A worker that cannot serve stops at once: given a checkpoint that does
not fit its model, `segq worker` exits non-zero before it consumes
anything, naming the file and the model, and a job queued meanwhile says
why it waits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from segq.models import JobItem
from segq.settings import Settings
from segq.storage import S3Storage
from tests.support.harness import Tenant, Worker, item_ids, queued_messages, segq_env
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.tiny_sam import build_tiny_sam

#: Each test builds a SAM-family model (make test-fast skips them).
pytestmark = pytest.mark.model

#: How soon a worker whose engine cannot be built must have exited: its
#: start (Python, torch, Celery) and one failed load, on a loaded machine.
EXIT_WITHIN_SECONDS = 120


@pytest.mark.slow
def test_a_worker_whose_checkpoint_does_not_fit_exits_and_the_queued_job_says_why(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    settings: Settings,
    storage: S3Storage,
    tmp_path: Path,
) -> None:
    # The tiny SAM saved wrong: laid out as SAM 2's files are ({"model":
    # state dict}), as a SAM 2.1 file given to a SAM model would be.
    broken = tmp_path / "tiny-sam-saved-as-sam2.pt"
    torch.save({"model": build_tiny_sam().state_dict()}, broken)
    file_id = tenant.upload(png_bytes()).json["id"]
    response = tenant.post_job(scene_prompt_body(file_id))
    assert response.status_code == 200, response.json
    job_id = response.json["jobId"]
    [item_id] = item_ids(tenant, job_id)

    env = {
        **segq_env(settings, storage, tmp_path / "worker-data"),
        "SEGQ_MODEL": "sam_vit_b",
        "SEGQ_MODEL_CHECKPOINT": str(broken),
        "SEGQ_PROBE_TINY_SAM": "1",
    }
    worker = Worker(env, concurrency=1, log=tmp_path / "worker.log")
    try:
        exit_code = worker.process.wait(timeout=EXIT_WITHIN_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker still runs: {worker.log_path.read_text()[-3000:]}")
    finally:
        worker.stop()
    log = worker.log_path.read_text()
    assert exit_code != 0, log[-3000:]
    assert f"could not build sam_vit_b from {broken}" in log, log[-3000:]

    # It took nothing: the item's message still waits, and the item was never tried.
    assert queued_messages() == 1
    with sessions() as session:
        item = session.get_one(JobItem, item_id)
        assert (item.status, item.attempt) == ("Queued", 0)

    job = tenant.get_job(job_id).json
    assert job["status"] == "Queued"
    reason = job["waitingFor"]
    assert reason.startswith("no worker is running; the last one to start failed: ")
    assert f"could not build sam_vit_b from {broken}" in reason
    assert "does not fit" in reason or "not a state dict" in reason or "holds" in reason
    ready = tenant.client.get("/readyz").json
    assert ready["workers"] == {"serving": 0, "paused": 0, "waitingFor": reason}
