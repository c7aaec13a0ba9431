"""Cognite's own Python SDK, unmodified, against segq as users run it: a
`segq serve` and a `segq worker` process, on Postgres, Redis and S3 (moto)
and on the embedded default (SQLite, the filesystem broker, local disk).
Its Files API calls, its segment calls with gzip left on, the masks fetched
through the SDK's own HTTP client, and its error classes."""

from __future__ import annotations

import base64
import io
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from cognite.client import ClientConfig, CogniteClient, global_config
from cognite.client.credentials import Token
from cognite.client.data_classes import (
    FileMetadata,
    FileMetadataFilter,
    FileMetadataUpdate,
    FileMetadataWrite,
    GeoLocation,
    Geometry,
    Label,
    LabelFilter,
)
from cognite.client.data_classes.data_modeling import NodeId
from cognite.client.exceptions import (
    CogniteAPIError,
    CogniteDuplicatedError,
    CogniteFileUploadError,
    CogniteNotFoundError,
    CogniteProjectAccessError,
)
from cognite.client.utils._async_helpers import run_sync
from PIL import Image

from segq.api.cognite_files import UploadLinks
from segq.models import StoredFile
from tests.support.images import png_bytes
from tests.support.live_processes import LiveSegq, services_env

#: Both deployments sign with it, so that a test can sign an expired URL.
SECRET_KEY = "segq-cognite-sdk-tests"
MAX_UPLOAD_BYTES = 2 * 1024 * 1024
URL_EXPIRES_SECONDS = 3600
BOX = {"xMin": 0.2, "yMin": 0.2, "xMax": 0.8, "yMax": 0.8}


@pytest.fixture(scope="module", params=["postgres-redis-s3", "embedded"])
def deployment(
    request: pytest.FixtureRequest,
    database_url: str,
    s3_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveSegq]:
    env = {
        "SEGQ_SECRET_KEY": SECRET_KEY,
        "SEGQ_MODEL": "grabcut",
        "SEGQ_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "SEGQ_URL_EXPIRES_SECONDS": str(URL_EXPIRES_SECONDS),
    }
    if request.param == "postgres-redis-s3":
        env |= services_env(database_url, s3_endpoint, "sdk")
    live = LiveSegq(env, tmp_path_factory.mktemp(request.param))
    try:
        yield live
    finally:
        live.stop()


@dataclass(frozen=True)
class Project:
    name: str
    key: str
    url: str

    def client(self, key: str | None = None) -> CogniteClient:
        return CogniteClient(
            ClientConfig(
                client_name="segq-tests",
                base_url=self.url,
                project=self.name,
                credentials=Token(key or self.key),
            )
        )

    @property
    def segment_route(self) -> str:
        return f"/api/v1/projects/{self.name}/context/vision/segment"


def new_project(deployment: LiveSegq) -> Project:
    name = f"p-{uuid.uuid4().hex[:10]}"
    return Project(name, deployment.new_project(name), deployment.url)


@pytest.fixture
def project(deployment: LiveSegq) -> Project:
    return new_project(deployment)


def wait_finished(client: CogniteClient, project: Project, job: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    while job["status"] not in ("Completed", "Failed") and time.monotonic() < deadline:
        time.sleep(0.3)
        job = client.get(f"{project.segment_route}/{job['jobId']}").json()
    return job


def sdk_download(client: CogniteClient, url: str) -> bytes:
    """``url`` fetched as the SDK fetches a file's download link: its own
    HTTP client, retries and all."""
    content: bytes = run_sync(client.get_async_client().files._download_file(url))
    return content


def test_the_sdk_gzips_its_bodies() -> None:
    # What the segment test below relies on to exercise inflation.
    assert global_config.disable_gzip is False


def test_files_round_trip_through_the_sdk(project: Project) -> None:
    client = project.client()
    image = png_bytes(seed=1)
    created = client.files.upload_bytes(
        image,
        name="one.png",
        external_id="one",
        metadata={"site": "north"},
        directory="/north/gate",
        source_created_time=1_600_000_000_000,
    )
    assert created.id is not None
    by_id = client.files.retrieve(id=created.id)
    assert by_id is not None
    assert by_id.uploaded is True
    assert by_id.external_id == "one"
    assert by_id.metadata == {"site": "north"}
    assert by_id.mime_type == "image/png"
    assert by_id.last_updated_time is not None
    assert (by_id.directory, by_id.source_created_time) == ("/north/gate", 1_600_000_000_000)
    assert by_id.source is None
    by_external_id = client.files.retrieve(external_id="one")
    assert by_external_id is not None and by_external_id.id == created.id
    assert client.files.retrieve(id=created.id + 10_000) is None

    assert client.files.download_bytes(id=created.id) == image
    urls = client.files.retrieve_download_urls(external_id="one")
    assert sdk_download(client, urls["one"]) == image

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
    assert len(client.files.list(mime_type="image/png", limit=-1)) == 6
    assert client.files.list(created_time={"min": 0, "max": 1}, limit=-1) == []
    assert [f.id for f in client.files.list(directory_prefix="/north/", limit=-1)] == [created.id]
    assert client.files.list(directory_prefix="/north_", limit=-1) == []
    in_2020 = {"min": 1_577_836_800_000, "max": 1_609_459_199_999}
    assert [f.id for f in client.files.list(source_created_time=in_2020, limit=-1)] == [created.id]
    assert client.files.list(source_modified_time=in_2020, limit=-1) == []
    assert client.files.aggregate_count() == 6
    assert client.files.aggregate_count(filter={"external_id_prefix": "batch-"}) == 5

    updated = client.files.update(
        FileMetadataUpdate(id=created.id)
        .metadata.add({"shift": "night"})
        .external_id.set("uno")
        .source.set("gate camera")
        .source_modified_time.set(1_700_000_000_000)
    )
    assert updated.external_id == "uno"
    assert updated.metadata == {"site": "north", "shift": "night"}
    assert updated.last_updated_time >= by_id.last_updated_time
    assert (updated.source, updated.source_modified_time) == ("gate camera", 1_700_000_000_000)
    assert updated.directory == "/north/gate"
    cleared = client.files.update(FileMetadataUpdate(id=created.id).directory.set(None))
    assert (cleared.directory, cleared.source) == (None, "gate camera")
    assert [f.id for f in client.files.list(source="gate camera", limit=-1)] == [created.id]
    assert client.files.list(source="gate", limit=-1) == []

    client.files.delete(external_id=["uno", "batch-2"])
    assert client.files.aggregate_count() == 4
    client.files.delete(external_id="gone", ignore_unknown_ids=True)
    with pytest.raises(CogniteNotFoundError) as missing:
        client.files.delete(external_id="gone")
    assert missing.value.not_found == [{"externalId": "gone"}]


def test_uploads_from_disk_in_parts_and_by_instance_id(project: Project, tmp_path: Path) -> None:
    client = project.client()
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
        f"/api/v1/projects/{project.name}/files",
        json={"name": "cam.png", "instanceId": {"space": "plant", "externalId": "camera-7"}},
    )
    client.files.upload_content_bytes(png_bytes(seed=5), instance_id=node)
    by_instance = client.files.retrieve(instance_id=node)
    assert by_instance is not None
    assert by_instance.instance_id == node
    assert by_instance.uploaded is True
    assert client.files.download_bytes(instance_id=node) == png_bytes(seed=5)

    # Content for files whose metadata exists, in parts (multiuploadlink):
    # from a file on disk, and part by part.
    client.post(
        f"/api/v1/projects/{project.name}/files", json={"name": "later.png", "externalId": "later"}
    )
    client.files.upload_content(str(on_disk), external_id="later")
    assert client.files.download_bytes(external_id="later") == png_bytes(seed=4)
    parted = NodeId("plant", "camera-9")
    client.post(
        f"/api/v1/projects/{project.name}/files",
        json={"name": "p.png", "instanceId": {"space": "plant", "externalId": "camera-9"}},
    )
    image = png_bytes(seed=8)
    with client.files.multipart_upload_content_session(parts=2, instance_id=parted) as session:
        session.upload_part(1, image[1000:])
        session.upload_part(0, image[:1000])
    assert client.files.download_bytes(instance_id=parted) == image


def test_search_on_name(project: Project) -> None:
    client = project.client()
    for name, external_id in (
        ("North Gate.png", "a-1"),
        ("gate 2 north.png", "a-2"),
        ("yard.png", "b-1"),
    ):
        client.files.upload_bytes(png_bytes(), name=name, external_id=external_id)
    # Every word, whatever the case; names that start with the search first.
    assert [f.name for f in client.files.search(name="NORTH gate")] == [
        "North Gate.png",
        "gate 2 north.png",
    ]
    assert [f.name for f in client.files.search(name="gate")] == [
        "gate 2 north.png",
        "North Gate.png",
    ]
    assert [f.name for f in client.files.search(name="png", limit=2)] == [
        "North Gate.png",
        "gate 2 north.png",
    ]
    assert [
        f.name for f in client.files.search(name="png", filter={"external_id_prefix": "b-"})
    ] == ["yard.png"]
    assert client.files.search(name="100%") == []


def test_both_uploads_make_the_same_file(project: Project) -> None:
    client = project.client()
    form = requests.post(
        f"{project.url}/api/v1/projects/{project.name}/files",
        files={"file": ("image.png", png_bytes(seed=7))},
        data={"externalId": "form"},
        headers={"Authorization": f"Bearer {project.key}"},
        timeout=10,
    )
    assert form.status_code == 201
    client.files.upload_bytes(png_bytes(seed=7), name="image.png", external_id="json")
    both = client.files.retrieve_multiple(external_ids=["form", "json"])
    assert [file.uploaded for file in both] == [True, True]
    bodies = [
        client.post(
            f"/api/v1/projects/{project.name}/files/byids", json={"items": [{"id": file.id}]}
        ).json()["items"][0]
        for file in both
    ]
    assert set(bodies[0]) == set(bodies[1])
    for field in ("name", "mimeType", "size", "width", "height", "sha256"):
        assert bodies[0][field] == bodies[1][field]


def test_segment_jobs_through_the_sdk_with_gzip_on(project: Project) -> None:
    client = project.client()
    created = client.files.upload_bytes(png_bytes(200, 150), name="seg.png", external_id="seg")
    instance = {"space": "plant", "externalId": "camera-8"}
    client.post(
        f"/api/v1/projects/{project.name}/files", json={"name": "c.png", "instanceId": instance}
    )
    client.files.upload_content_bytes(
        png_bytes(120, 90, seed=6), instance_id=NodeId("plant", "camera-8")
    )

    job = client.post(
        project.segment_route,
        json={"items": [{"fileId": created.id}, {"fileInstanceId": instance}], "boundingBox": BOX},
    ).json()
    assert job["status"] == "Queued"
    assert job["items"][1]["fileInstanceId"] == instance
    job = wait_finished(client, project, job)
    assert job["status"] == "Completed", job
    assert job["progress"] == {"total": 2, "completed": 2, "failed": 0}
    first, second = job["items"]
    assert first["fileExternalId"] == "seg"
    assert second["fileInstanceId"] == instance
    for item, size in ((first, (200, 150)), (second, (120, 90))):
        mask = item["segments"][0]["mask"]
        png = Image.open(io.BytesIO(sdk_download(client, mask["url"])))
        assert png.size == size == (mask["width"], mask["height"])
        pixels = np.asarray(png)
        assert set(np.unique(pixels)) <= {0, 255} and (pixels == 255).any()

    unknown = {"items": [{"fileInstanceId": {"space": "plant", "externalId": "nope"}}]}
    with pytest.raises(CogniteNotFoundError) as missing:
        client.post(project.segment_route, json={"boundingBox": BOX, **unknown})
    assert missing.value.not_found == [{"instanceId": {"space": "plant", "externalId": "nope"}}]


def test_keys_of_nobody_and_of_another_project(deployment: LiveSegq, project: Project) -> None:
    with pytest.raises(CogniteProjectAccessError):
        project.client("not-a-key").files.list()
    other = new_project(deployment)
    with pytest.raises(CogniteAPIError) as forbidden:
        project.client(other.key).files.list()
    assert forbidden.value.code == 403
    inspection = project.client().iam.token.inspect()
    assert [found.url_name for found in inspection.projects] == [project.name]


def test_unknown_and_duplicated_ids_are_the_sdks_errors(project: Project) -> None:
    client = project.client()
    known = client.files.upload_bytes(png_bytes(), name="a.png", external_id="same")
    with pytest.raises(CogniteNotFoundError) as missing:
        client.files.retrieve_multiple(ids=[known.id, known.id + 10_000])
    assert missing.value.not_found == [{"id": known.id + 10_000}]
    found = client.files.retrieve_multiple(
        ids=[known.id, known.id + 10_000], ignore_unknown_ids=True
    )
    assert [file.id for file in found] == [known.id]

    with pytest.raises(CogniteDuplicatedError) as duplicated:
        client.files.upload_bytes(png_bytes(), name="b.png", external_id="same")
    assert duplicated.value.duplicated == [{"externalId": "same"}]
    replaced = client.files.upload_bytes(
        png_bytes(seed=9), name="b.png", external_id="same", overwrite=True
    )
    assert replaced.id == known.id
    assert client.files.download_bytes(id=replaced.id) == png_bytes(seed=9)


def test_fields_segq_does_not_support_are_refused_in_plain_words(project: Project) -> None:
    client = project.client()
    files_route = f"/api/v1/projects/{project.name}/files"
    refusals: dict[str, tuple[str, Callable[[], object]]] = {
        "filter.assetSubtreeIds": (
            "filter on assetIds",
            lambda: client.files.list(asset_subtree_ids=[1]),
        ),
        "filter.assetExternalIds": (
            "filter on assetIds",
            lambda: client.files.list(asset_external_ids=["pump"]),
        ),
        "filter.dataSetIds[0].externalId": (
            "by id",
            lambda: client.files.list(data_set_external_ids=["ds"]),
        ),
        "filter.geoLocation": (
            "yourself",
            lambda: client.post(
                f"{files_route}/list",
                json={"filter": {"geoLocation": {"relation": "within", "shape": {}}}},
            ),
        ),
        "seconds": (
            "leave it out",
            lambda: client.post(files_route, json={"name": "a", "seconds": 1}),
        ),
        "items[0].update.colour": (
            "leave it out",
            lambda: client.post(
                f"{files_route}/update", json={"items": [{"id": 1, "update": {"colour": {}}}]}
            ),
        ),
    }
    for field, (instead, call) in refusals.items():
        with pytest.raises(CogniteAPIError) as refused:
            call()
        assert refused.value.code == 400
        unsupported = field.rsplit(".", 1)[-1].split("[")[0]
        assert refused.value.message.startswith(
            f"{field}: segq does not support {unsupported!r} here; "
        ), refused.value.message
        assert instead in refused.value.message
        assert "Extra inputs" not in refused.value.message
    assert client.files.aggregate_count() == 0


def test_every_file_field_is_kept_and_updated_as_cognite_does(project: Project) -> None:
    client = project.client()
    point = GeoLocation("Feature", Geometry("Point", [10.5, 59.9]), {"site": "north"})
    created = client.files.upload_bytes(
        png_bytes(seed=2),
        name="a.png",
        external_id="a",
        asset_ids=[1, 2],
        data_set_id=7,
        labels=[Label("pump"), Label("valve")],
        geo_location=point,
        security_categories=[3],
    )
    found = client.files.retrieve(id=created.id)
    assert found is not None
    assert (found.asset_ids, found.data_set_id, found.security_categories) == ([1, 2], 7, [3])
    assert [label.external_id for label in found.labels or []] == ["pump", "valve"]
    assert found.geo_location == point

    # The SDK's first update pattern: what was read, changed, sent back whole.
    found.source = "gate camera"
    updated = client.files.update(found)
    assert updated.source == "gate camera"
    assert (updated.asset_ids, updated.data_set_id, updated.mime_type) == ([1, 2], 7, "image/png")

    changed = client.files.update(
        FileMetadataUpdate(id=created.id)
        .asset_ids.add([3])
        .asset_ids.remove([1])
        .labels.add(["gauge"])
        .labels.remove(["pump"])
        .security_categories.set([4, 5])
        .data_set_id.set(None)
        .geo_location.set(None)
        .mime_type.set("IMAGE/PNG")
    )
    assert (changed.asset_ids, changed.security_categories) == ([2, 3], [4, 5])
    assert [label.external_id for label in changed.labels or []] == ["valve", "gauge"]
    assert (changed.data_set_id, changed.geo_location, changed.mime_type) == (
        None,
        None,
        "image/png",
    )

    # The bytes are a PNG: no other type can be said of them.
    with pytest.raises(CogniteAPIError) as contradicted:
        client.files.update(FileMetadataUpdate(id=created.id).mime_type.set("image/jpeg"))
    assert contradicted.value.code == 400
    assert contradicted.value.message.startswith("items[0].update.mimeType: ")
    assert "image/png bytes" in contradicted.value.message
    # Bounded as metadata is, so that a listing's answer stays bounded.
    too_many = GeoLocation("Feature", Geometry("MultiPoint", [[0.0, 1.0]] * 257))
    with pytest.raises(CogniteAPIError) as too_large:
        client.files.update(FileMetadataUpdate(id=created.id).geo_location.set(too_many))
    assert too_large.value.message.startswith("items[0].update.geoLocation.set.geometry: ")
    assert "257 positions" in too_large.value.message
    # A file still waiting for its bytes takes any type it is given.
    client.post(f"/api/v1/projects/{project.name}/files", json={"name": "w", "externalId": "w"})
    waiting = client.files.update(FileMetadataUpdate(external_id="w").mime_type.set("image/jpeg"))
    assert (waiting.mime_type, waiting.uploaded) == ("image/jpeg", False)

    # replace: every field the write does not give is cleared (setNull, set []).
    replaced = client.files.update(
        FileMetadataWrite(name="a.png", external_id="a", directory="/yard", asset_ids=[9]),
        mode="replace",
    )
    assert (replaced.directory, replaced.asset_ids, replaced.source) == ("/yard", [9], None)
    assert (replaced.labels, replaced.security_categories, replaced.metadata) == (None, None, {})
    # setNull on a PNG's type leaves it the type of its bytes.
    assert (replaced.mime_type, replaced.uploaded) == ("image/png", True)
    assert client.files.retrieve(id=created.id) == replaced


def test_every_file_filter_and_partitioned_listing(project: Project) -> None:
    client = project.client()
    route = f"/api/v1/projects/{project.name}/files/list"
    ids: dict[str, int] = {}
    for index, (name, metadata, asset_ids, data_set_id, labels) in enumerate(
        (
            ("gate.png", {"site": "north", "shift": "day", 'q"ü.x': "ü"}, [1, 2], 7, ["pump"]),
            ("gate.png", {"site": "north"}, [3], 2**53 - 1, ["pump", "valve"]),
            ("yard.png", {"site": "south"}, None, None, ["valve"]),
        )
    ):
        ids[f"f{index}"] = client.files.upload_bytes(
            png_bytes(seed=index),
            name=name,
            external_id=f"f{index}",
            metadata=metadata,
            asset_ids=asset_ids,
            data_set_id=data_set_id,
            labels=[Label(label) for label in labels],
        ).id
    for index in range(3, 12):
        ids[f"f{index}"] = client.files.upload_bytes(
            png_bytes(seed=index), name="more.png", external_id=f"f{index}"
        ).id

    def listed(**filters: Any) -> list[str]:
        return sorted(str(f.external_id) for f in client.files.list(limit=-1, **filters))

    assert listed(name="gate.png") == ["f0", "f1"]
    assert listed(metadata={"site": "north"}) == ["f0", "f1"]
    assert listed(metadata={"site": "north", "shift": "day"}) == ["f0"]
    # Any key: quotes, dots and escaped characters in it name no JSON path.
    assert listed(metadata={'q"ü.x': "ü"}) == ["f0"]
    assert listed(asset_ids=[2, 3]) == ["f0", "f1"]
    assert listed(asset_ids=[4]) == []
    # Ids past 32 bits, as Cognite's are.
    assert listed(data_set_ids=[2**53 - 1]) == ["f1"]
    assert listed(data_set_ids=[7, 8]) == ["f0"]
    assert listed(labels=LabelFilter(contains_any=["valve"])) == ["f1", "f2"]
    assert listed(labels=LabelFilter(contains_all=["pump", "valve"])) == ["f1"]
    assert listed(name="gate.png", labels=LabelFilter(contains_any=["valve"])) == ["f1"]
    both = FileMetadataFilter(metadata={"site": "north"}, asset_ids=[1])
    assert client.files.aggregate_count(filter=both) == 1

    # Each partition a disjoint slice; together, the whole listing.
    slices = [
        [item["id"] for item in client.post(route, json={"partition": f"{m}/3"}).json()["items"]]
        for m in (1, 2, 3)
    ]
    assert sorted(id_ for part in slices for id_ in part) == sorted(ids.values())
    assert all(part for part in slices)
    # The SDK's parallel listing, each partition paged by its cursor.
    client.get_async_client().files._LIST_LIMIT = 2
    parallel = client.files.list(limit=-1, partitions=4)
    assert sorted(f.id for f in parallel) == sorted(ids.values())
    assert sorted(f.id for f in client.files.list(limit=-1, partitions=2, name="more.png")) == [
        ids[f"f{index}"] for index in range(3, 12)
    ]
    client.get_async_client().files._LIST_LIMIT = 1000
    for bad in ("0/3", "4/3", "1/0", "1/101", "a/b"):
        with pytest.raises(CogniteAPIError) as refused:
            client.post(route, json={"partition": bad})
        assert refused.value.code == 400 and refused.value.message.startswith("partition: ")


def test_a_refused_upload_leaves_a_file_without_content_that_overwrite_replaces(
    project: Project,
) -> None:
    """What Cognite keeps too: the metadata, not uploaded, whose externalId
    a retry takes with overwrite."""
    client = project.client()
    for external_id, content, code in (
        ("not-an-image", b"not an image", 415),
        ("too-large", b"\x89PNG" + bytes(MAX_UPLOAD_BYTES), 413),
    ):
        with pytest.raises(CogniteFileUploadError) as refused:
            client.files.upload_bytes(content, name="x.png", external_id=external_id)
        assert refused.value.code == code
        kept = client.files.retrieve(external_id=external_id)
        assert kept is not None and kept.uploaded is False
        with pytest.raises(CogniteDuplicatedError):
            client.files.upload_bytes(png_bytes(), name="x.png", external_id=external_id)
        retried = client.files.upload_bytes(
            png_bytes(seed=3), name="y.png", external_id=external_id, overwrite=True
        )
        assert retried.id == kept.id
        assert client.files.download_bytes(external_id=external_id) == png_bytes(seed=3)
        after = client.files.retrieve(id=kept.id)
        assert after is not None and (after.uploaded, after.name) == (True, "y.png")
    assert client.files.aggregate_count() == 2
    assert client.files.list(uploaded=False, limit=-1) == []


def test_compressed_bodies_too_large_before_or_after_inflating(project: Project) -> None:
    client = project.client()
    route = f"/api/v1/projects/{project.name}/files/list"
    # Compresses to a few kilobytes: the bound is on what it inflates to.
    bomb = {"filter": {"mimeType": "a" * (4 * 1024 * 1024)}}
    # Random bytes hardly compress: about 3 MiB on the wire, over the 2 MiB
    # a JSON body may have, under what the server reads of any body.
    noise = {"filter": {"mimeType": base64.b64encode(os.urandom(3 * 1024 * 1024)).decode()}}
    for body in (bomb, noise):
        with pytest.raises(CogniteAPIError) as too_large:
            client.post(route, json=body)
        assert too_large.value.code == 413
    assert client.files.aggregate_count() == 0


def test_upload_urls_are_bound_to_their_file_and_expire(
    deployment: LiveSegq, project: Project
) -> None:
    headers = {"Authorization": f"Bearer {project.key}"}
    files_route = f"{project.url}/api/v1/projects/{project.name}/files"
    created = requests.post(
        files_route, json={"name": "x.png", "externalId": "pending"}, headers=headers, timeout=10
    ).json()
    upload_url = created["uploadUrl"]
    assert created["uploaded"] is False
    # A file without its bytes cannot be segmented.
    refused = requests.post(
        f"{project.url}{project.segment_route}",
        json={"items": [{"fileExternalId": "pending"}], "boundingBox": BOX},
        headers=headers,
        timeout=10,
    )
    assert refused.status_code == 400
    assert f"file {created['id']}" in refused.json()["error"]["message"]

    assert upload_url.startswith(project.url + "/")
    tampered = upload_url[:-3] + ("aaa" if not upload_url.endswith("aaa") else "bbb")
    assert requests.put(tampered, data=png_bytes(), timeout=10).status_code == 403
    with deployment.database() as sessions, sessions() as session:
        stored = session.get_one(StoredFile, created["id"])
        links = UploadLinks(SECRET_KEY, project.url, URL_EXPIRES_SECONDS)
        expired = links.url_for(stored, expires_time=1)
        # Signed for the file as it was before an overwrite.
        foreign = links.url_for(stored)
    assert requests.put(expired, data=png_bytes(), timeout=10).status_code == 403
    replaced = requests.post(
        f"{files_route}?overwrite=true",
        json={"name": "x.png", "externalId": "pending"},
        headers=headers,
        timeout=10,
    ).json()
    assert replaced["id"] == created["id"]
    assert requests.put(foreign, data=png_bytes(), timeout=10).status_code == 404
    # Signed by another server (another secret key), for this very file.
    stranger = UploadLinks("another-secret", project.url, URL_EXPIRES_SECONDS)
    with deployment.database() as sessions, sessions() as session:
        foreign_server = stranger.url_for(session.get_one(StoredFile, created["id"]))
    assert requests.put(foreign_server, data=png_bytes(), timeout=10).status_code == 403

    upload_url = replaced["uploadUrl"]
    bad_bytes = requests.put(upload_url, data=b"not an image", timeout=10)
    assert bad_bytes.status_code == 415
    assert requests.put(upload_url, data=png_bytes(), timeout=10).status_code == 200
    # The same bytes again are no change; other bytes are a conflict.
    assert requests.put(upload_url, data=png_bytes(), timeout=10).status_code == 200
    assert requests.put(upload_url, data=png_bytes(seed=3), timeout=10).status_code == 409
