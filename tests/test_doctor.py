"""``segq doctor``: objects no row names and rows whose objects are gone,
reported, and repaired on request, through the real command."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.cli.main import main
from segq.models import ItemStatus, JobItem, StoredFile
from segq.storage import S3Storage
from tests.harness import TEST_BUCKET, Tenant
from tests.test_deletion import finished_job, job_prefix


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
