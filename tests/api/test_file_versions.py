"""A file overwritten while items created on it wait, and the objects no
file holds any more: each item segments the version of the file it was
created on, and the orphan sweep removes what nothing holds (parts of
uploads never completed, overwritten versions once no item wants them,
content left by a crash), against Postgres and S3 (moto over HTTP)."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.file_objects import new_file_key, sweep_orphaned_file_objects
from segq.models import JobItem, Project, StoredFile
from segq.storage import S3Storage
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.pipeline import process_item
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.in_process_workers import TEST_LIMITS
from tests.support.tenants import Tenant


def project_id(sessions: sessionmaker[Session], tenant: Tenant) -> int:
    with sessions() as session:
        found = session.scalar(select(Project.id).where(Project.name == tenant.name))
        assert found is not None
        return found


def storage_key(sessions: sessionmaker[Session], file_id: int) -> str:
    with sessions() as session:
        return session.get_one(StoredFile, file_id).storage_key


def file_objects(storage: S3Storage, sessions: sessionmaker[Session], tenant: Tenant) -> set[str]:
    prefix = f"projects/{project_id(sessions, tenant)}/files/"
    return {stored.key for stored in storage.list_objects(prefix)}


def create_from_metadata(tenant: Tenant, external_id: str, overwrite: bool = False) -> Any:
    response = tenant.client.post(
        tenant.url("/files") + ("?overwrite=true" if overwrite else ""),
        json={"name": f"{external_id}.png", "externalId": external_id},
        headers=tenant.headers,
    )
    assert response.status_code == 201, response.json
    return response.json


def put_bytes(tenant: Tenant, upload_url: str, data: bytes) -> None:
    response = tenant.client.put(upload_url, data=data)
    assert response.status_code == 200, response.json


def run_queued_items(sessions: sessionmaker[Session], storage: S3Storage) -> None:
    with sessions() as session:
        ids = list(session.scalars(select(JobItem.id).order_by(JobItem.id)))
    for item_id in ids:
        process_item(
            sessions,
            storage,
            GrabCutEngine(),
            item_id,
            lease_seconds=60,
            max_attempts=3,
            limits=TEST_LIMITS,
        )


def mask_size(job: Any) -> tuple[int, int]:
    mask = job["items"][0]["segments"][0]["mask"]
    return mask["width"], mask["height"]


def test_a_queued_item_segments_the_version_it_was_created_on(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    created = create_from_metadata(tenant, "cam")
    put_bytes(tenant, created["uploadUrl"], png_bytes(160, 120))
    first_version = storage_key(sessions, created["id"])
    before = tenant.post_job(scene_prompt_body(created["id"])).json["jobId"]

    replaced = create_from_metadata(tenant, "cam", overwrite=True)
    assert replaced["id"] == created["id"]
    # Until the new bytes arrive the file is what it was, and is segmented so.
    assert (replaced["uploaded"], replaced["width"]) == (True, 160)
    during = tenant.post_job(scene_prompt_body(created["id"])).json["jobId"]
    put_bytes(tenant, replaced["uploadUrl"], png_bytes(200, 100, seed=1))
    second_version = storage_key(sessions, created["id"])
    assert second_version != first_version
    # A job created now is on the new version.
    after = tenant.post_job(scene_prompt_body(created["id"])).json["jobId"]
    assert file_objects(storage, sessions, tenant) == {first_version, second_version}

    # Nothing is swept while the first jobs' items may still run on it.
    assert sweep_orphaned_file_objects(sessions, storage, older_than_seconds=0) == 0
    run_queued_items(sessions, storage)
    jobs = [tenant.get_job(job_id).json for job_id in (before, during, after)]
    assert [job["status"] for job in jobs] == ["Completed"] * 3
    assert [mask_size(job) for job in jobs] == [(160, 120), (160, 120), (200, 100)]

    assert sweep_orphaned_file_objects(sessions, storage, older_than_seconds=0) == 1
    assert file_objects(storage, sessions, tenant) == {second_version}


def test_an_overwrite_keeps_the_content_until_the_new_bytes_arrive(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    created = create_from_metadata(tenant, "cam")
    put_bytes(tenant, created["uploadUrl"], png_bytes(seed=1))
    first_version = storage_key(sessions, created["id"])
    abandoned = init_multipart(tenant, "cam", overwrite=True)
    put_bytes(tenant, abandoned["uploadUrls"][0], b"part")
    # An overwrite never uploaded changes the metadata, not the content ...
    assert downloaded(tenant, created["id"]) == png_bytes(seed=1)
    # ... and another overwrite voids its upload: its URLs and its parts.
    replaced = create_from_metadata(tenant, "cam", overwrite=True)
    assert tenant.client.put(abandoned["uploadUrls"][1], data=b"part").status_code == 404
    assert file_objects(storage, sessions, tenant) == {first_version}

    put_bytes(tenant, replaced["uploadUrl"], png_bytes(seed=2))
    # No item wanted the old content: it went with the upload that replaced it.
    assert file_objects(storage, sessions, tenant) == {storage_key(sessions, created["id"])}
    assert downloaded(tenant, created["id"]) == png_bytes(seed=2)
    # The file holds its last upload now: other bytes are a conflict.
    assert tenant.client.put(replaced["uploadUrl"], data=png_bytes(seed=3)).status_code == 409


def downloaded(tenant: Tenant, file_id: int) -> bytes:
    """The file's content, through its download link (S3's pre-signed URL)."""
    response = tenant.client.post(
        tenant.url("/files/downloadlink"), json={"items": [{"id": file_id}]}, headers=tenant.headers
    )
    assert response.status_code == 200, response.json
    return requests.get(response.json["items"][0]["downloadUrl"], timeout=10).content


def test_a_deleted_file_fails_its_queued_items_and_its_content_goes_at_once(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    job_id = tenant.post_job(scene_prompt_body(file_id)).json["jobId"]
    deleted = tenant.client.delete(tenant.url(f"/files/{file_id}"), headers=tenant.headers)
    assert deleted.status_code == 204
    assert file_objects(storage, sessions, tenant) == set()
    run_queued_items(sessions, storage)
    job = tenant.get_job(job_id).json
    assert job["status"] == "Failed"
    assert "deleted" in job["failedItems"][0]["errorMessage"]


def init_multipart(tenant: Tenant, external_id: str, overwrite: bool = False) -> Any:
    response = tenant.client.post(
        tenant.url("/files/initmultipartupload")
        + f"?parts=2&overwrite={'true' if overwrite else 'false'}",
        json={"name": f"{external_id}.png", "externalId": external_id},
        headers=tenant.headers,
    )
    assert response.status_code == 201, response.json
    return response.json


def test_parts_of_an_upload_never_completed_are_swept_by_age(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    upload = init_multipart(tenant, "big")
    put_bytes(tenant, upload["uploadUrls"][0], png_bytes()[:100])
    key = storage_key(sessions, upload["id"])
    assert file_objects(storage, sessions, tenant) == {f"{key}.part0"}

    # Young parts stay: their upload may still be completed.
    assert sweep_orphaned_file_objects(sessions, storage, older_than_seconds=3600) == 0
    assert sweep_orphaned_file_objects(sessions, storage, older_than_seconds=0) == 1
    assert file_objects(storage, sessions, tenant) == set()
    late = tenant.client.post(
        tenant.url("/files/completemultipartupload"),
        json={"id": upload["id"], "uploadId": upload["uploadId"]},
        headers=tenant.headers,
    )
    assert late.status_code == 400
    assert "part 0" in late.json["error"]["message"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_completing_an_upload_again_answers_as_the_first_completion(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, overwrite: bool
) -> None:
    """A client that lost the first answer retries: the same success, and
    the file as the first completion left it."""
    if overwrite:
        tenant.upload(png_bytes(seed=1), externalId="big")
    upload = init_multipart(tenant, "big", overwrite=overwrite)
    content = png_bytes(seed=3)
    put_bytes(tenant, upload["uploadUrls"][0], content[:100])
    put_bytes(tenant, upload["uploadUrls"][1], content[100:])
    completion = {"id": upload["id"], "uploadId": upload["uploadId"]}
    answers = [
        tenant.client.post(
            tenant.url("/files/completemultipartupload"), json=completion, headers=tenant.headers
        )
        for _ in range(3)
    ]
    assert [(a.status_code, a.json) for a in answers] == [(200, {})] * 3
    shown = tenant.client.get(tenant.url(f"/files/{upload['id']}"), headers=tenant.headers).json
    assert shown["uploaded"] and shown["sha256"] == hashlib.sha256(content).hexdigest()
    assert file_objects(storage, sessions, tenant) == {storage_key(sessions, upload["id"])}
    # Another upload of the file is not a retry of this one.
    later = init_multipart(tenant, "big", overwrite=True)
    stale = tenant.client.post(
        tenant.url("/files/completemultipartupload"), json=completion, headers=tenant.headers
    )
    assert stale.status_code == 400
    assert later["uploadId"] != upload["uploadId"]


def test_parts_go_with_their_file_deleted_or_overwritten(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    first = init_multipart(tenant, "one")
    put_bytes(tenant, first["uploadUrls"][1], b"part")
    second = init_multipart(tenant, "two")
    put_bytes(tenant, second["uploadUrls"][0], b"part")
    assert len(file_objects(storage, sessions, tenant)) == 2

    init_multipart(tenant, "one", overwrite=True)
    deleted = tenant.client.post(
        tenant.url("/files/delete"), json={"items": [{"id": second["id"]}]}, headers=tenant.headers
    )
    assert deleted.status_code == 200
    assert file_objects(storage, sessions, tenant) == set()


def test_content_no_file_holds_is_swept_and_content_a_file_holds_is_kept(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    kept = tenant.upload(png_bytes()).json["id"]
    # What a crash between writing an object and committing its row leaves.
    left_over = new_file_key(project_id(sessions, tenant))
    storage.put(left_over, png_bytes(seed=2), "image/png")
    assert sweep_orphaned_file_objects(sessions, storage, older_than_seconds=3600) == 0
    assert sweep_orphaned_file_objects(sessions, storage, older_than_seconds=0) == 1
    assert file_objects(storage, sessions, tenant) == {storage_key(sessions, kept)}
    assert tenant.client.get(tenant.url(f"/files/{kept}"), headers=tenant.headers).json["uploaded"]


def test_a_job_created_during_an_upload_is_on_the_version_the_upload_leaves(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    """An upload replacing a file's content holds the file's row for update
    (UploadLinks.target_of) until it commits the new key; a job naming the
    file meanwhile waits, then pins the new key, never the one the upload
    is about to discard."""
    created = create_from_metadata(tenant, "cam")
    put_bytes(tenant, created["uploadUrl"], png_bytes())
    answers: list[int] = []
    with sessions.begin() as upload:
        stored = upload.scalar(
            select(StoredFile).where(StoredFile.id == created["id"]).with_for_update()
        )
        assert stored is not None
        job = threading.Thread(
            target=lambda: answers.append(
                tenant.post_job(scene_prompt_body(created["id"])).status_code
            )
        )
        job.start()
        job.join(timeout=1)
        assert job.is_alive() and answers == []
        stored.storage_key = new_key = new_file_key(stored.project_id)
    job.join(timeout=10)
    assert answers == [200]
    with sessions() as session:
        assert session.scalar(select(JobItem.file_storage_key)) == new_key


def test_a_file_deleted_during_an_overwrite_takes_both_versions_with_it(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    """Deleting goes objects first (segq/deletion.py): the content, and the
    parts of an overwrite still uploading, none left to the orphan sweep."""
    created = create_from_metadata(tenant, "cam")
    put_bytes(tenant, created["uploadUrl"], png_bytes())
    overwrite = init_multipart(tenant, "cam", overwrite=True)
    put_bytes(tenant, overwrite["uploadUrls"][0], b"part")
    assert len(file_objects(storage, sessions, tenant)) == 2
    deleted = tenant.client.delete(tenant.url(f"/files/{created['id']}"), headers=tenant.headers)
    assert deleted.status_code == 204
    assert file_objects(storage, sessions, tenant) == set()
