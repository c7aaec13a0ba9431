"""POST/GET/DELETE /files against Postgres and S3 (moto over HTTP)."""

from __future__ import annotations

import hashlib
import io
import zlib

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from segq.models import StoredFile
from segq.storage import S3Storage
from tests.support.database import count_files
from tests.support.images import (
    cut_short,
    flat_png,
    jpeg_bytes,
    jpeg_claiming,
    png_bytes,
    scene,
    with_exif_orientation,
)
from tests.support.tenants import Tenant


def test_upload_records_what_the_image_is(tenant: Tenant, storage: S3Storage) -> None:
    data = jpeg_bytes(200, 100)
    response = tenant.upload(data, "0001.jpg", externalId="cam-3/0001")
    assert response.status_code == 201, response.json
    body = response.json
    assert body["externalId"] == "cam-3/0001"
    assert body["name"] == "0001.jpg"
    assert body["mimeType"] == "image/jpeg"
    assert (body["width"], body["height"]) == (200, 100)
    assert body["size"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert response.headers["Location"].endswith(f"/files/{body['id']}")

    fetched = tenant.client.get(tenant.url(f"/files/{body['id']}"), headers=tenant.headers)
    assert fetched.json == body
    listed = tenant.client.get(tenant.url("/files?externalId=cam-3/0001"), headers=tenant.headers)
    assert [f["id"] for f in listed.json["items"]] == [body["id"]]


def test_content_is_sniffed_not_trusted(tenant: Tenant, sessions: sessionmaker[Session]) -> None:
    png_named_jpg = tenant.upload(png_bytes(), "photo.jpg")
    assert png_named_jpg.status_code == 201
    assert png_named_jpg.json["mimeType"] == "image/png"

    for data in (b"GIF89a" + b"\0" * 100, b"%PDF-1.4 hello", b"", b"\x89PNG\r\n\x1a\n garbage"):
        response = tenant.upload(data, "not-an-image.jpg")
        assert response.status_code == 415, (data[:10], response.json)
        assert response.json["error"]["code"] == 415
        assert "X-Request-Id" in response.headers
    assert count_files(sessions) == 1


def test_truncated_jpeg_is_refused(tenant: Tenant, sessions: sessionmaker[Session]) -> None:
    data = jpeg_bytes(300, 200)
    response = tenant.upload(data[: len(data) // 2], "cut.jpg")
    assert response.status_code == 415
    assert count_files(sessions) == 0


def test_jpeg_cut_short_with_an_end_marker_is_refused(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    # Pillow alone decodes this as an image whose lower half is grey.
    response = tenant.upload(cut_short(jpeg_bytes(300, 200)), "cut.jpg")
    assert response.status_code == 415, response.json
    assert "not a readable JPEG" in response.json["error"]["message"]
    assert count_files(sessions) == 0


def test_a_tiny_jpeg_claiming_millions_of_pixels_is_refused(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    # ~630 bytes claiming 1900x2000 pixels, within the test limit of 4 Mpx.
    response = tenant.upload(jpeg_claiming(1900, 2000), "claim.jpg")
    assert response.status_code == 415, response.json
    assert count_files(sessions) == 0


def test_the_pixel_limit_is_segqs_own(tenant: Tenant, sessions: sessionmaker[Session]) -> None:
    # Valid PNGs, far below Pillow's own bomb guard: only segq's limit
    # (4 Mpx in the test settings) tells them apart.
    at_limit = tenant.upload(flat_png(2000, 2000), "at-limit.png")
    assert at_limit.status_code == 201, at_limit.json
    over = tenant.upload(flat_png(2001, 2000), "over.png")
    assert over.status_code == 413, over.json
    assert over.json["error"]["message"] == (
        "image has 2001x2000 pixels, more than the 4000000 allowed"
    )
    assert count_files(sessions) == 1


def test_an_image_too_costly_to_check_is_refused_from_its_header(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    # Within the pixel limit (4 Mpx), but a progressive CMYK JPEG of 2000 x
    # 2000 needs 8 bytes of coefficients a pixel, over the 32 MiB that
    # checking may take; its data (16 x 16 pixels) is never decoded.
    response = tenant.upload(jpeg_claiming(2000, 2000, "CMYK", progressive=True), "cmyk.jpg")
    assert response.status_code == 413, response.json
    assert response.json["error"]["message"].startswith("checking this image would need")
    assert count_files(sessions) == 0


def test_the_size_reported_is_the_size_displayed(tenant: Tenant) -> None:
    # Stored 200 wide and 100 tall, shown rotated a quarter turn.
    response = tenant.upload(with_exif_orientation(scene(200, 100)[0], 6), "rotated.jpg")
    assert response.status_code == 201, response.json
    assert (response.json["width"], response.json["height"]) == (100, 200)


def test_pixel_bomb_is_refused_without_decoding(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    # A valid PNG header claiming 30000 x 30000 pixels, with a tiny body:
    # refused from the header alone (the test settings allow 4 Mpx).
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            len(payload).to_bytes(4, "big")
            + kind
            + payload
            + zlib.crc32(kind + payload).to_bytes(4, "big")
        )

    header = (30000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    response = tenant.upload(bomb, "bomb.png")
    assert response.status_code == 413, response.json
    assert count_files(sessions) == 0


def test_oversized_upload_is_413(tenant: Tenant, sessions: sessionmaker[Session]) -> None:
    noise = Image.effect_noise((1500, 1500), 100).convert("RGB")  # ~2.3 Mpx, > 2 MiB as PNG
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    assert len(buffer.getvalue()) > 2 * 1024 * 1024
    response = tenant.upload(buffer.getvalue(), "big.png")
    assert response.status_code == 413
    assert response.json["error"]["code"] == 413
    assert count_files(sessions) == 0


def test_external_id_is_unique_per_project(tenant: Tenant, other_tenant: Tenant) -> None:
    assert tenant.upload(png_bytes(), externalId="same").status_code == 201
    again = tenant.upload(png_bytes(), externalId="same")
    assert again.status_code == 409
    assert other_tenant.upload(png_bytes(), externalId="same").status_code == 201


def test_upload_needs_the_file_field(tenant: Tenant) -> None:
    response = tenant.client.post(
        tenant.url("/files"),
        data={"name": "x"},
        headers=tenant.headers,
        content_type="multipart/form-data",
    )
    assert response.status_code == 400
    # JSON is Cognite's file metadata, which has no 'file' field; other types are refused.
    as_json = tenant.client.post(tenant.url("/files"), json={"file": "x"}, headers=tenant.headers)
    assert as_json.status_code == 400
    as_text = tenant.client.post(
        tenant.url("/files"), data=b"x", headers=tenant.headers, content_type="text/plain"
    )
    assert as_text.status_code == 415


def test_delete_removes_row_and_object(
    tenant: Tenant, storage: S3Storage, sessions: sessionmaker[Session]
) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    with sessions() as session:
        stored = session.get(StoredFile, file_id)
        assert stored is not None
        key = stored.storage_key
    assert storage.get(key)[:4] == b"\x89PNG"
    assert (
        tenant.client.delete(tenant.url(f"/files/{file_id}"), headers=tenant.headers).status_code
        == 204
    )
    assert (
        tenant.client.get(tenant.url(f"/files/{file_id}"), headers=tenant.headers).status_code
        == 404
    )
    assert count_files(sessions) == 0
    try:
        storage.get(key)
    except KeyError:
        pass
    else:
        raise AssertionError("object still in storage")


def test_control_characters_in_ids_are_400(tenant: Tenant, sessions: sessionmaker[Session]) -> None:
    assert tenant.upload(png_bytes(), externalId="cam\x00-1").status_code == 400
    assert tenant.upload(png_bytes(), externalId="cam\n1").status_code == 400
    listed = tenant.client.get(tenant.url("/files?externalId=a%00b"), headers=tenant.headers)
    assert listed.status_code == 400 and listed.json["error"]["code"] == 400
    job = tenant.post_job(
        {"items": [{"fileExternalId": "a\x00b"}], "points": [{"x": 0.5, "y": 0.5}]}
    )
    assert job.status_code == 400
    assert count_files(sessions) == 0
    # A weird multipart filename is kept only in its printable part.
    named = tenant.upload(png_bytes(), "bad\x00name.png")
    assert named.status_code == 201 and named.json["name"] == "badname.png"


def test_oversized_chunked_upload_is_413(tenant: Tenant, sessions: sessionmaker[Session]) -> None:
    noise = Image.effect_noise((1500, 1500), 100).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    boundary = "segqboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + buffer.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    # No Content-Length: the body ends where the stream ends, as a WSGI server
    # presents a chunked request.
    response = tenant.client.post(
        tenant.url("/files"),
        input_stream=io.BytesIO(body),
        headers={**tenant.headers, "Transfer-Encoding": "chunked"},
        content_type=f"multipart/form-data; boundary={boundary}",
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413, response.json
    assert count_files(sessions) == 0


def test_upload_urls_never_come_from_the_host_header(tenant: Tenant) -> None:
    created = tenant.client.post(
        tenant.url("/files"),
        json={"name": "h.png"},
        headers={**tenant.headers, "Host": "attacker.example"},
    ).get_json()
    assert created["uploadUrl"].startswith("/api/v1/files/upload/")
