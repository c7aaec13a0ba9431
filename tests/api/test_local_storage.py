"""Local-disk storage, the embedded default: signed, expiring URLs served by the API."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from segq.api.app import create_app
from segq.settings import Settings
from segq.storage import LocalStorage, ObjectNotFound, open_storage


def test_put_get_delete_and_key_checks(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, secret_key="k")
    storage.put("projects/1/a.png", b"abc", "image/png")
    assert storage.get("projects/1/a.png") == b"abc"
    storage.put("projects/1/a.png", b"xyz", "image/png")  # fixed keys overwrite
    assert storage.get("projects/1/a.png") == b"xyz"
    storage.delete("projects/1/a.png")
    storage.delete("projects/1/a.png")  # deleting twice is fine
    with pytest.raises(ObjectNotFound):
        storage.get("projects/1/a.png")
    for bad in ("../escape", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ValueError, match="invalid storage key"):
            storage.put(bad, b"x", "image/png")


def test_open_storage_understands_both_schemes(tmp_path: Path) -> None:
    assert isinstance(
        open_storage(tmp_path.as_uri(), s3_endpoint_url=None, secret_key="k"), LocalStorage
    )
    with pytest.raises(ValueError, match="s3:// or file://"):
        open_storage("ftp://x", s3_endpoint_url=None, secret_key="k")
    with pytest.raises(ValueError, match="no bucket"):
        open_storage("s3://", s3_endpoint_url=None, secret_key="k")


def test_signed_urls_are_served_until_they_expire(tmp_path: Path) -> None:
    settings = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path)})
    app = create_app(settings)
    storage = app.extensions["segq"].storage
    assert isinstance(storage, LocalStorage)
    storage.put("projects/1/jobs/2/items/3/mask-0.png", b"\x89PNG fake", "image/png")
    client = app.test_client()

    url = storage.presigned_get_url("projects/1/jobs/2/items/3/mask-0.png", 60)
    served = client.get(url)
    assert served.status_code == 200
    assert served.data == b"\x89PNG fake"
    assert served.mimetype == "image/png"

    query = parse_qs(urlparse(url).query)
    path = urlparse(url).path
    tampered = client.get(
        f"/objects/projects/1/jobs/2/items/3/mask-1.png?expires={query['expires'][0]}&signature={query['signature'][0]}"
    )
    assert tampered.status_code == 403
    assert tampered.json["error"]["code"] == 403
    later = int(query["expires"][0]) + 100
    assert (
        client.get(f"{path}?expires={later}&signature={query['signature'][0]}").status_code == 403
    )
    assert client.get(path).status_code == 403

    expired = storage.presigned_get_url("projects/1/jobs/2/items/3/mask-0.png", 1)
    time.sleep(2.1)
    assert client.get(expired).status_code == 403


def test_every_process_of_an_installation_shares_one_secret(tmp_path: Path) -> None:
    first = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path)})
    second = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path)})
    assert first.secret_key == second.secret_key and len(first.secret_key) >= 32
    assert (
        Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path), "SEGQ_SECRET_KEY": "x"}).secret_key
        == "x"
    )


def test_each_object_keeps_its_type_beside_it_and_goes_with_it(tmp_path: Path) -> None:
    """The type an object was stored as is kept in a hidden sidecar that
    listing never shows and deletion removes; an object written before
    types were kept is served as an attachment of no known type."""
    settings = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path)})
    app = create_app(settings)
    storage = app.extensions["segq"].storage
    assert isinstance(storage, LocalStorage)
    storage.put("projects/1/files/abc", b"\xff\xd8\xff jpeg", "image/jpeg")
    storage.put("projects/1/files/abc.part0", b"part", "application/octet-stream")
    assert storage.content_type("projects/1/files/abc") == "image/jpeg"
    assert sorted(found.key for found in storage.list_objects("projects/1/")) == [
        "projects/1/files/abc",
        "projects/1/files/abc.part0",
    ]
    client = app.test_client()
    served = client.get(storage.presigned_get_url("projects/1/files/abc", 60))
    assert served.headers["Content-Type"] == "image/jpeg"
    assert served.headers["Content-Disposition"] == "inline"

    storage.delete_many(["projects/1/files/abc", "projects/1/files/abc.part0"])
    assert list((storage.root / "projects/1/files").iterdir()) == []

    # Written by an earlier segq, with no type beside it.
    (storage.root / "projects/1/files/old").write_bytes(b"<script>alert(1)</script>")
    served = client.get(storage.presigned_get_url("projects/1/files/old", 60))
    assert served.status_code == 200
    assert served.headers["Content-Type"] == "application/octet-stream"
    assert served.headers["Content-Disposition"] == "attachment"
    assert served.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in served.headers["Content-Security-Policy"]
