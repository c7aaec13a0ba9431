"""Cognite's own Python SDK, unmodified, against segq served on a loopback
port: its Files API calls, its segment calls with gzip left on, and its
error classes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from celery import Celery
from cognite.client import ClientConfig, CogniteClient
from cognite.client.credentials import Token
from cognite.client.data_classes import FileMetadata, FileMetadataUpdate
from cognite.client.data_classes.data_modeling import NodeId
from cognite.client.exceptions import (
    CogniteAPIError,
    CogniteDuplicatedError,
    CogniteNotFoundError,
    CogniteProjectAccessError,
)
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import make_server

from api import create_app
from api.cognite_files import UploadLinks
from segq.models import StoredFile
from segq.settings import Settings
from segq.storage import S3Storage
from tests.harness import Tenant, free_port, grabcut_worker
from tests.images import png_bytes


@pytest.fixture
def base_url(
    settings: Settings, storage: S3Storage, celery_app: Celery, sessions: sessionmaker[Session]
) -> Iterator[str]:
    """segq on a loopback port, its public URL that address (as `segq serve`
    sets it), so that upload URLs are absolute."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_app(replace(settings, public_url=url), storage=storage, celery=celery_app)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        thread.join()


def sdk(base_url: str, project: str, key: str) -> CogniteClient:
    return CogniteClient(
        ClientConfig(
            client_name="segq-tests",
            base_url=base_url,
            project=project,
            credentials=Token(key),
        )
    )


def test_files_round_trip_through_the_sdk(base_url: str, tenant: Tenant) -> None:
    client = sdk(base_url, tenant.name, tenant.key)
    image = png_bytes(seed=1)
    created = client.files.upload_bytes(
        image, name="one.png", external_id="one", metadata={"site": "north"}
    )
    assert created.id is not None
    by_id = client.files.retrieve(id=created.id)
    assert by_id is not None
    assert by_id.uploaded is True
    assert by_id.external_id == "one"
    assert by_id.metadata == {"site": "north"}
    assert by_id.mime_type == "image/png"
    assert by_id.last_updated_time is not None
    by_external_id = client.files.retrieve(external_id="one")
    assert by_external_id is not None and by_external_id.id == created.id
    assert client.files.retrieve(id=created.id + 10_000) is None

    assert client.files.download_bytes(id=created.id) == image
    urls = client.files.retrieve_download_urls(external_id="one")
    assert requests.get(urls["one"], timeout=10).content == image

    for seed in range(2, 7):
        client.files.upload_bytes(
            png_bytes(seed=seed), name=f"{seed}.png", external_id=f"batch-{seed}"
        )
    chunks = [list(chunk) for chunk in client.files(chunk_size=2, external_id_prefix="batch-")]
    assert [len(chunk) for chunk in chunks] == [2, 2, 1]
    assert {file.external_id for chunk in chunks for file in chunk} == {
        f"batch-{seed}" for seed in range(2, 7)
    }
    # The SDK's own page size, made small so that its cursor loop pages here.
    client.get_async_client().files._LIST_LIMIT = 2
    assert [f.external_id for f in client.files.list(external_id_prefix="batch-", limit=10)] == [
        f"batch-{seed}" for seed in range(2, 7)
    ]
    client.get_async_client().files._LIST_LIMIT = 1000
    assert len(client.files.list(uploaded=True, limit=-1)) == 6
    assert client.files.list(created_time={"min": 0, "max": 1}, limit=-1) == []
    assert client.files.aggregate_count() == 6
    assert client.files.aggregate_count(filter={"external_id_prefix": "batch-"}) == 5

    updated = client.files.update(
        FileMetadataUpdate(id=created.id).metadata.add({"shift": "night"}).external_id.set("uno")
    )
    assert updated.external_id == "uno"
    assert updated.metadata == {"site": "north", "shift": "night"}
    assert updated.last_updated_time >= by_id.last_updated_time

    client.files.delete(external_id=["uno", "batch-2"])
    assert client.files.aggregate_count() == 4
    client.files.delete(external_id="gone", ignore_unknown_ids=True)
    with pytest.raises(CogniteNotFoundError) as missing:
        client.files.delete(external_id="gone")
    assert missing.value.not_found == [{"externalId": "gone"}]


def test_duplicate_external_id_is_the_sdks_duplicated_error(base_url: str, tenant: Tenant) -> None:
    client = sdk(base_url, tenant.name, tenant.key)
    client.files.upload_bytes(png_bytes(), name="a.png", external_id="same")
    with pytest.raises(CogniteDuplicatedError) as duplicated:
        client.files.upload_bytes(png_bytes(), name="b.png", external_id="same")
    assert duplicated.value.duplicated == [{"externalId": "same"}]
    replaced = client.files.upload_bytes(
        png_bytes(seed=9), name="b.png", external_id="same", overwrite=True
    )
    assert client.files.download_bytes(id=replaced.id) == png_bytes(seed=9)


def test_keys_of_nobody_and_of_another_project(
    base_url: str, tenant: Tenant, other_tenant: Tenant
) -> None:
    with pytest.raises(CogniteProjectAccessError):
        sdk(base_url, tenant.name, "not-a-key").files.list()
    with pytest.raises(CogniteAPIError) as forbidden:
        sdk(base_url, tenant.name, other_tenant.key).files.list()
    assert forbidden.value.code == 403
    inspection = sdk(base_url, tenant.name, tenant.key).iam.token.inspect()
    assert [project.url_name for project in inspection.projects] == [tenant.name]


def test_upload_urls_are_bound_to_their_file_and_expire(
    base_url: str, tenant: Tenant, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    headers = tenant.headers
    created = requests.post(
        f"{base_url}/api/v1/projects/{tenant.name}/files",
        json={"name": "x.png", "externalId": "pending"},
        headers=headers,
        timeout=10,
    ).json()
    upload_url = created["uploadUrl"]
    assert created["uploaded"] is False
    # A file without its bytes cannot be segmented.
    refused = requests.post(
        f"{base_url}/api/v1/projects/{tenant.name}/context/vision/segment",
        json={
            "items": [{"fileExternalId": "pending"}],
            "boundingBox": {"xMin": 0.2, "yMin": 0.2, "xMax": 0.8, "yMax": 0.8},
        },
        headers=headers,
        timeout=10,
    )
    assert refused.status_code == 400
    assert f"file {created['id']}" in refused.json()["error"]["message"]

    assert upload_url.startswith(base_url + "/")
    tampered = upload_url[:-3] + ("aaa" if not upload_url.endswith("aaa") else "bbb")
    assert requests.put(tampered, data=png_bytes(), timeout=10).status_code == 403
    with sessions() as session:
        stored = session.get(StoredFile, created["id"])
        assert stored is not None
        links = UploadLinks(settings.secret_key, base_url, settings.url_expires_seconds)
        expired = links.url_for(stored, expires_time=1)
        # Signed for another file: the file this one was before an overwrite.
        foreign = links.url_for(stored)
    assert requests.put(expired, data=png_bytes(), timeout=10).status_code == 403
    replaced = requests.post(
        f"{base_url}/api/v1/projects/{tenant.name}/files?overwrite=true",
        json={"name": "x.png", "externalId": "pending"},
        headers=headers,
        timeout=10,
    ).json()
    assert replaced["id"] == created["id"]
    assert requests.put(foreign, data=png_bytes(), timeout=10).status_code == 404
    upload_url = replaced["uploadUrl"]
    bad_bytes = requests.put(upload_url, data=b"not an image", timeout=10)
    assert bad_bytes.status_code == 415

    assert requests.put(upload_url, data=png_bytes(), timeout=10).status_code == 200
    # The same bytes again are no change; other bytes are a conflict.
    assert requests.put(upload_url, data=png_bytes(), timeout=10).status_code == 200
    assert requests.put(upload_url, data=png_bytes(seed=3), timeout=10).status_code == 409


def test_segment_job_through_the_sdk_with_gzip_on(
    base_url: str,
    tenant: Tenant,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    client = sdk(base_url, tenant.name, tenant.key)
    created = client.files.upload_bytes(png_bytes(), name="seg.png", external_id="seg")
    route = f"/api/v1/projects/{tenant.name}/context/vision/segment"
    with grabcut_worker(celery_app, sessions, storage):
        job = client.post(
            route,
            json={
                "items": [{"fileId": created.id}],
                "boundingBox": {"xMin": 0.2, "yMin": 0.2, "xMax": 0.8, "yMax": 0.8},
            },
        ).json()
        deadline = time.monotonic() + 60
        while job["status"] not in ("Completed", "Failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = client.get(f"{route}/{job['jobId']}").json()
    assert job["status"] == "Completed", job
    assert job["items"][0]["fileExternalId"] == "seg"
    mask = job["items"][0]["segments"][0]["mask"]["url"]
    assert requests.get(mask, timeout=10).status_code == 200


def test_upload_from_disk_and_by_instance_id(base_url: str, tenant: Tenant, tmp_path: Path) -> None:
    client = sdk(base_url, tenant.name, tenant.key)
    on_disk = tmp_path / "disk.png"
    on_disk.write_bytes(png_bytes(seed=4))
    # The SDK uploads a file on disk in parts (initmultipartupload).
    uploaded = client.files.upload(str(on_disk), external_id="disk")
    assert isinstance(uploaded, FileMetadata)
    assert client.files.download_bytes(external_id="disk") == png_bytes(seed=4)
    retrieved = client.files.retrieve(id=uploaded.id)
    assert retrieved is not None and retrieved.uploaded is True

    node = NodeId("plant", "camera-7")
    client.post(
        f"/api/v1/projects/{tenant.name}/files",
        json={"name": "cam.png", "instanceId": {"space": "plant", "externalId": "camera-7"}},
    )
    client.files.upload_content_bytes(png_bytes(seed=5), instance_id=node)
    by_instance = client.files.retrieve(instance_id=node)
    assert by_instance is not None
    assert by_instance.instance_id == node
    assert by_instance.uploaded is True
    assert client.files.download_bytes(instance_id=node) == png_bytes(seed=5)


def test_segment_items_by_instance_id(
    base_url: str,
    tenant: Tenant,
    celery_app: Celery,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    client = sdk(base_url, tenant.name, tenant.key)
    instance = {"space": "plant", "externalId": "camera-8"}
    client.post(
        f"/api/v1/projects/{tenant.name}/files", json={"name": "c.png", "instanceId": instance}
    )
    client.files.upload_content_bytes(png_bytes(seed=6), instance_id=NodeId("plant", "camera-8"))
    route = f"/api/v1/projects/{tenant.name}/context/vision/segment"
    body = {
        "items": [{"fileInstanceId": instance}],
        "boundingBox": {"xMin": 0.2, "yMin": 0.2, "xMax": 0.8, "yMax": 0.8},
    }
    with grabcut_worker(celery_app, sessions, storage):
        job = client.post(route, json=body).json()
        assert job["items"][0]["fileInstanceId"] == instance
        deadline = time.monotonic() + 60
        while job["status"] not in ("Completed", "Failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = client.get(f"{route}/{job['jobId']}").json()
    assert job["status"] == "Completed", job
    assert job["items"][0]["fileInstanceId"] == instance
    unknown = {"items": [{"fileInstanceId": {"space": "plant", "externalId": "nope"}}]}
    with pytest.raises(CogniteNotFoundError):
        client.post(route, json={**body, **unknown})


def test_both_uploads_make_the_same_file(base_url: str, tenant: Tenant) -> None:
    client = sdk(base_url, tenant.name, tenant.key)
    form = tenant.upload(png_bytes(seed=7), externalId="form")
    assert form.status_code == 201
    client.files.upload_bytes(png_bytes(seed=7), name="image.png", external_id="json")
    both = client.files.retrieve_multiple(external_ids=["form", "json"])
    assert [file.uploaded for file in both] == [True, True]
    bodies = [
        client.post(
            f"/api/v1/projects/{tenant.name}/files/byids", json={"items": [{"id": file.id}]}
        ).json()["items"][0]
        for file in both
    ]
    assert set(bodies[0]) == set(bodies[1])
    for field in ("name", "mimeType", "size", "width", "height", "sha256"):
        assert bodies[0][field] == bodies[1][field]
    with pytest.raises(CogniteDuplicatedError):
        client.files.upload_bytes(png_bytes(), name="again.png", external_id="form")
    assert tenant.upload(png_bytes(), externalId="json").get_json()["error"]["duplicated"] == [
        {"externalId": "json"}
    ]


def test_compressed_bodies_are_bounded_after_inflating(base_url: str, tenant: Tenant) -> None:
    client = sdk(base_url, tenant.name, tenant.key)
    # Compresses to a few kilobytes: the bound is on what it inflates to.
    bomb = {"filter": {"mimeType": "a" * (4 * 1024 * 1024)}}
    with pytest.raises(CogniteAPIError) as too_large:
        client.post(f"/api/v1/projects/{tenant.name}/files/list", json=bomb)
    assert too_large.value.code == 413


def test_upload_urls_never_come_from_the_host_header(tenant: Tenant) -> None:
    created = tenant.client.post(
        tenant.url("/files"),
        json={"name": "h.png"},
        headers={**tenant.headers, "Host": "attacker.example"},
    ).get_json()
    assert created["uploadUrl"].startswith("/api/v1/files/upload/")
