"""``segq doctor``: objects no row names and rows whose objects are gone,
reported, and repaired on request, through the real command."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.cli.main import main
from segq.doctor import examine, repair
from segq.models import ItemStatus, JobItem, StoredFile
from segq.storage import S3Storage
from tests.api.test_deletion import finished_job, job_prefix
from tests.api.test_file_versions import (
    create_from_metadata,
    init_multipart,
    mask_size,
    put_bytes,
    run_queued_items,
    storage_key,
)
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.services import TEST_BUCKET
from tests.support.tenants import Tenant


@pytest.fixture
def doctor_env(
    tmp_path: Path, database_url: str, s3_endpoint: str, storage: S3Storage
) -> dict[str, str]:
    return {
        "SEGQ_DATA_DIR": str(tmp_path / "data"),
        "SEGQ_SECRET_KEY": "doctor-test",
        "SEGQ_DATABASE_URL": database_url,
        "SEGQ_STORAGE_URL": f"s3://{TEST_BUCKET}/{storage.prefix.rstrip('/')}",
        "SEGQ_S3_ENDPOINT_URL": s3_endpoint,
    }


def test_doctor_reports_both_ways_and_repairs_what_it_can(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    doctor_env: dict[str, str],
) -> None:
    job_id = finished_job(tenant, sessions, storage)
    prefix = job_prefix(sessions, job_id)
    project_prefix = prefix.split("jobs/")[0]
    runner = CliRunner()

    healthy = runner.invoke(main, ["doctor", "--grace-seconds", "0"], env=doctor_env)
    assert healthy.exit_code == 0, healthy.output
    assert "0 orphan objects, 0 files without bytes, 0 missing item objects" in healthy.output

    # An object of a job that no longer exists; one of an item still running
    # (its attempt writes before it completes: not an orphan).
    orphan = project_prefix + "jobs/987654/items/1/attempt-1/prompt-0/mask-0.png"
    storage.put(orphan, b"orphan", "image/png")
    with sessions.begin() as session:
        running, completed = session.scalars(
            select(JobItem).where(JobItem.job_id == job_id).order_by(JobItem.id)
        ).all()
        running.status = ItemStatus.RUNNING
        running_object = f"{prefix}items/{running.id}/attempt-2/prompt-0/mask-0.png"
        assert completed.result is not None
        lost_mask = completed.result["segments"][0]["maskKey"]
        completed_id = completed.id
        lost_file = session.scalars(select(StoredFile).order_by(StoredFile.id)).first()
        assert lost_file is not None
        lost_file_id, lost_file_key = lost_file.id, lost_file.storage_key
    storage.put(running_object, b"in progress", "image/png")
    storage.delete(lost_mask)
    storage.delete(lost_file_key)

    # Within the grace period nothing written just now is an orphan.
    graced = runner.invoke(main, ["doctor"], env=doctor_env)
    assert f"orphan object: {orphan}" not in graced.output

    report = runner.invoke(main, ["doctor", "--grace-seconds", "0"], env=doctor_env)
    assert report.exit_code == 1
    assert f"orphan object: {orphan}" in report.output
    assert running_object not in report.output
    assert f"file {lost_file_id} has no bytes: {lost_file_key}" in report.output
    assert f"item {completed_id} is missing {lost_mask}" in report.output
    assert "1 orphan objects, 1 files without bytes, 1 missing item objects" in report.output
    # Reporting changed nothing.
    assert orphan in {found.key for found in storage.list_objects(project_prefix)}

    repaired = runner.invoke(main, ["doctor", "--repair", "--grace-seconds", "0"], env=doctor_env)
    assert "deleted 1 objects and 1 file rows" in repaired.output
    # The missing mask cannot be remade: still a failure to look at.
    assert repaired.exit_code == 1
    keys = {found.key for found in storage.list_objects(project_prefix)}
    assert orphan not in keys
    assert running_object in keys
    with sessions() as session:
        assert session.get(StoredFile, lost_file_id) is None
        assert session.scalar(select(StoredFile.id).where(StoredFile.id != lost_file_id))

    after = runner.invoke(main, ["doctor", "--grace-seconds", "0"], env=doctor_env)
    assert "0 orphan objects, 0 files without bytes, 1 missing item objects" in after.output


def test_doctor_keeps_what_files_still_hold_beside_their_content(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    """Not orphans, however old: the version a queued item was created on
    (the file was overwritten since) and the parts of an overwrite still
    uploading. Repair leaves them, and the item segments its version."""
    created = create_from_metadata(tenant, "cam")
    put_bytes(tenant, created["uploadUrl"], png_bytes(160, 120))
    pinned = storage_key(sessions, created["id"])
    job_id = tenant.post_job(scene_prompt_body(created["id"])).json["jobId"]
    replaced = create_from_metadata(tenant, "cam", overwrite=True)
    put_bytes(tenant, replaced["uploadUrl"], png_bytes(200, 100, seed=1))
    other = create_from_metadata(tenant, "other")
    put_bytes(tenant, other["uploadUrl"], png_bytes(100, 100))
    uploading = init_multipart(tenant, "other", overwrite=True)
    put_bytes(tenant, uploading["uploadUrls"][0], b"part")
    time.sleep(1.5)  # everything older than the grace period below

    findings = examine(sessions, storage, grace_seconds=1)
    assert findings.orphan_objects == []
    repair(sessions, storage, findings)
    assert pinned in {stored.key for stored in storage.list_objects("projects/")}
    run_queued_items(sessions, storage)
    job = tenant.get_job(job_id).json
    assert job["status"] == "Completed", job
    assert mask_size(job) == (160, 120)
