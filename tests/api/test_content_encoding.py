"""Bodies sent compressed, as Cognite's SDK sends every JSON body: inflated
as they are read, bounded by the same limits counted after inflation."""

from __future__ import annotations

import gzip
import json
import resource
import zlib

import pytest

from segq.api.json_body import max_job_body_bytes
from segq.settings import Settings
from tests.support.images import png_bytes
from tests.support.tenants import Tenant


def _job_body(file_id: int) -> bytes:
    return json.dumps({"items": [{"fileId": file_id}], "points": [{"x": 0.5, "y": 0.5}]}).encode()


def _gzip_of_repeated(byte: bytes, size: int, head: bytes = b"", tail: bytes = b"") -> bytes:
    """gzip of ``head + byte * size + tail``, made without holding it inflated."""
    compressor = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS)
    parts = [compressor.compress(head)]
    chunk = byte * 1_000_000
    for _ in range(size // len(chunk)):
        parts.append(compressor.compress(chunk))
    parts += [compressor.compress(tail), compressor.flush()]
    return b"".join(parts)


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", _raw_deflate),
        ("identity", lambda data: data),
    ],
    ids=["gzip", "x-gzip", "case", "deflate-zlib", "deflate-raw", "identity"],
)
def test_compressed_json_bodies_create_jobs(tenant: Tenant, coding: str, compress: object) -> None:
    file_id = tenant.upload(png_bytes()).json["id"]
    response = tenant.client.post(
        tenant.url("/context/vision/segment"),
        data=compress(_job_body(file_id)),  # type: ignore[operator]
        headers={**tenant.headers, "Content-Encoding": coding},
        content_type="application/json",
    )
    assert response.status_code == 200, response.json
    assert response.json["items"] == [{"fileId": file_id}]


def test_a_compressed_upload_is_read_like_a_plain_one(tenant: Tenant) -> None:
    plain = tenant.upload(png_bytes(64, 48))
    boundary = "b0undary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png_bytes(64, 48)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = tenant.client.post(
        tenant.url("/files"),
        data=gzip.compress(form),
        headers={**tenant.headers, "Content-Encoding": "gzip"},
        content_type=f"multipart/form-data; boundary={boundary}",
    )
    assert response.status_code == 201, response.json
    assert response.json["sha256"] == plain.json["sha256"]


def test_a_gzip_bomb_is_413_without_being_inflated(tenant: Tenant, settings: Settings) -> None:
    # 400 MB of zeros in about 400 KB: the JSON route stops reading at its bound.
    bomb = _gzip_of_repeated(b" ", 400_000_000, head=b"[", tail=b"]")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    response = tenant.client.post(
        tenant.url("/context/vision/segment"),
        data=bomb,
        headers={**tenant.headers, "Content-Encoding": "gzip"},
        content_type="application/json",
    )
    assert response.status_code == 413, response.json
    assert len(bomb) < 1_000_000
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    job_limit = max_job_body_bytes(settings.max_upload_bytes)
    assert grown_kb * 1024 < 4 * job_limit + 50_000_000

    upload_bomb = _gzip_of_repeated(b"\0", 400_000_000)
    response = tenant.client.post(
        tenant.url("/files"),
        data=upload_bomb,
        headers={**tenant.headers, "Content-Encoding": "gzip"},
        content_type="multipart/form-data; boundary=x",
    )
    assert response.status_code == 413, response.json
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb * 1024 < 4 * job_limit + 50_000_000


@pytest.mark.parametrize(
    ("coding", "body", "status"),
    [
        ("br", b"\x0b\x02\x80{}\x03", 415),
        ("gzip, gzip", b"", 415),
        ("compress", b"", 415),
        ("gzip", b"not gzip at all", 400),
        ("gzip", gzip.compress(b'{"items": []}')[:-12], 400),
        ("gzip", gzip.compress(b'{"items": []}') + b"trailing", 400),
        ("deflate", b"\x78\x9c garbage", 400),
    ],
    ids=["brotli", "stacked", "compress", "not-gzip", "truncated", "trailing", "bad-deflate"],
)
def test_bad_or_unknown_encodings_get_the_envelope(
    tenant: Tenant, coding: str, body: bytes, status: int
) -> None:
    response = tenant.client.post(
        tenant.url("/context/vision/segment"),
        data=body,
        headers={**tenant.headers, "Content-Encoding": coding},
        content_type="application/json",
    )
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == status
