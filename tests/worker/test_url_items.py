"""Items given as fileUrl (fetched by the worker through the URL guard) or
imageData (inline), and the guard itself, against real HTTP servers on loopback."""

from __future__ import annotations

import base64
import contextlib
import gzip
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from celery import Celery
from flask import Flask
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.models import Job, JobItem, StoredFile
from segq.queue import SEGMENT_QUEUE
from segq.settings import Settings
from segq.storage import S3Storage
from segq.url_guard import (
    FetchFailed,
    FetchPolicy,
    HostNotFound,
    UrlRefused,
    check_url,
    fetch,
    parse_networks,
    system_resolver,
)
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.item_inputs import ImageLimits
from segq.worker.pipeline import ItemOutcome, process_item
from tests.support.fake_dns import fake_dns
from tests.support.harness import REDIS_URL, TEST_LIMITS, Tenant, make_tenant
from tests.support.images import cut_short, flat_png, jpeg_bytes, png_bytes
from tests.support.refused_urls import INTERNAL_SPELLINGS

LOOPBACK_ONLY = parse_networks("127.0.0.1/32")
PROMPT = {"points": [{"x": 0.5, "y": 0.5, "label": 1}]}


class ImageServer:
    """Serves /image.png, redirects, oversized and gzip-bomb bodies; records Host headers."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.redirect_to = ""
        #: Extra paths and the bytes served at them.
        self.bodies: dict[str, bytes] = {}
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.hosts.append(self.headers.get("Host", ""))
                if self.path in served.bodies:
                    self._send(served.bodies[self.path])
                elif self.path == "/image.png":
                    self._send(png_bytes(160, 120))
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", served.redirect_to)
                    self.end_headers()
                elif self.path == "/big":
                    self._send(b"\0" * 3_000_000)
                elif self.path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    with contextlib.suppress(OSError):  # the client hangs up
                        for _ in range(1000):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                            time.sleep(0.05)
                elif self.path == "/bomb":
                    self._send(gzip.compress(b"\0" * 20_000_000), {"Content-Encoding": "gzip"})
                else:
                    self.send_error(404)

            def _send(self, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(200)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Do not wait for a dripping handler at teardown.
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def policy(max_bytes: int = 2_000_000) -> FetchPolicy:
    return FetchPolicy(max_bytes=max_bytes, timeout_seconds=5, allowed_networks=LOOPBACK_ONLY)


FORBIDDEN = [
    "http://127.0.0.2/x",
    "http://[::1]/x",
    "http://[::ffff:127.0.0.1]/x",
    "http://[::ffff:7f00:1]/x",
    "http://2130706433/x",
    "http://0177.0.0.1/x",
    "http://0x7f000001/x",
    "http://0x7f.1/x",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://10.1.2.3/x",
    "http://172.16.0.1/x",
    "http://192.168.1.1/x",
    "http://100.64.0.1/x",
    "http://0.0.0.0/x",
    "http://[fe80::1]/x",
    "http://[fd12:3456::1]/x",
    "http://[64:ff9b::a00:1]/x",
    "http://[2002:c0a8:101::]/x",
    "http://224.0.0.1/x",
    "ftp://example.com/x",
    "file:///etc/passwd",
    "gopher://example.com/x",
    "http://user:secret@example.com/x",
    "http://exa mple.com/x",
    "http:///x",
    "http://example.com:0/x",
    "http://example.com:99999/x",
    "http://[2606:4700:4700::1111%25eth0]/x",  # a zone id means nothing off this link
    *INTERNAL_SPELLINGS,
]


@pytest.mark.parametrize("url", FORBIDDEN)
def test_forbidden_urls_are_refused_before_any_connection(url: str) -> None:
    production = FetchPolicy(max_bytes=1_000_000)  # nothing allowed beyond the public internet
    with pytest.raises(UrlRefused):
        check_url(url, production)
    with pytest.raises(UrlRefused):
        fetch(url, production, resolve=lambda *_: pytest.fail("must not resolve"))


def test_public_addresses_and_names_pass_the_static_check() -> None:
    for url in (
        "https://example.com/a.jpg",
        "https://Example.COM./a.jpg",
        "https://xn--bcher-kva.example/a.jpg",
        "http://93.184.216.34/a.png",
        "http://93.184.216.34./a.png",
        "http://[2606:2800:220:1::]/",
        "http://[64:ff9b::5db8:d822]/",  # NAT64 of 93.184.216.34
        "http://[2002:5db8:d822::1]/",  # 6to4 of 93.184.216.34
        "http://192.0.0.9/",  # PCP anycast: global although 192.0.0.0/24 is not
    ):
        check_url(url, FetchPolicy(max_bytes=1))


def test_a_name_with_no_address_is_told_apart_from_a_resolver_in_trouble(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dns = fake_dns(monkeypatch)
    dns.set("gone.segq.test", socket.EAI_NONAME)
    dns.set("slow.segq.test", socket.EAI_AGAIN)
    dns.set("broken.segq.test", socket.EAI_FAIL)
    with pytest.raises(HostNotFound, match="does not resolve"):
        system_resolver("gone.segq.test", 80)
    for transient in ("slow.segq.test", "broken.segq.test"):
        with pytest.raises(FetchFailed) as failure:
            system_resolver(transient, 80)
        assert not isinstance(failure.value, HostNotFound)
    with pytest.raises(HostNotFound, match="has no address"):
        fetch("http://empty.segq.test/x", policy(), resolve=lambda *_: [])


def test_fetch_reads_an_allowed_url(image_server: ImageServer) -> None:
    assert fetch(f"{image_server.url}/image.png", policy())[:4] == b"\x89PNG"


def test_names_are_resolved_once_and_the_checked_address_is_the_one_dialled(
    image_server: ImageServer,
) -> None:
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])  # a rebinding DNS: safe first, private next
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    data = fetch(
        f"http://images.example:{image_server.port}/image.png", policy(), resolve=rebinding
    )
    assert data[:4] == b"\x89PNG"
    assert calls == ["images.example"]
    assert image_server.hosts[-1] == f"images.example:{image_server.port}"
    # A name with any private answer is refused outright.
    with pytest.raises(UrlRefused, match="resolves to a private"):
        fetch("http://evil.example/x", policy(), resolve=lambda *_: ["127.0.0.1", "10.0.0.1"])


@pytest.mark.parametrize(
    "target",
    ["http://127.0.0.2/x", "http://[::1]/x", "http://169.254.169.254/", "file:///etc/passwd"],
)
def test_redirects_are_checked_hop_by_hop(image_server: ImageServer, target: str) -> None:
    image_server.redirect_to = target
    with pytest.raises(UrlRefused):
        fetch(f"{image_server.url}/redirect", policy())


def test_redirect_loops_and_bodies_are_bounded(image_server: ImageServer) -> None:
    image_server.redirect_to = f"{image_server.url}/redirect"
    with pytest.raises(FetchFailed, match="redirects"):
        fetch(f"{image_server.url}/redirect", policy())
    with pytest.raises(FetchFailed, match="larger than"):
        fetch(f"{image_server.url}/big", policy(max_bytes=1_000_000))
    with pytest.raises(FetchFailed, match="larger than"):
        fetch(f"{image_server.url}/bomb", policy(max_bytes=1_000_000))
    with pytest.raises(FetchFailed, match="404"):
        fetch(f"{image_server.url}/missing", policy())


def test_a_dripping_server_cannot_hold_a_worker(image_server: ImageServer) -> None:
    started = time.monotonic()
    slow = FetchPolicy(max_bytes=10_000, timeout_seconds=0.5, allowed_networks=LOOPBACK_ONLY)
    with pytest.raises(FetchFailed, match="too slowly"):
        fetch(f"{image_server.url}/drip", slow)
    assert time.monotonic() - started < 3


@pytest.fixture
def url_app(
    settings: Settings, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> Flask:
    return create_app(
        replace(settings, fetch_allowed_networks="127.0.0.1/32"), storage=storage, celery=celery_app
    )


def count(sessions: sessionmaker[Session], model: Any) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def run_all(
    sessions: sessionmaker[Session], storage: S3Storage, limits: ImageLimits
) -> list[ItemOutcome]:
    with sessions() as session:
        ids = list(session.scalars(select(JobItem.id).order_by(JobItem.id)))
    engine = GrabCutEngine()
    return [
        process_item(
            sessions, storage, engine, i, lease_seconds=60, max_attempts=3, limits=limits
        ).outcome
        for i in ids
    ]


def test_a_url_item_is_fetched_by_the_worker(
    url_app: Flask, sessions: sessionmaker[Session], storage: S3Storage, image_server: ImageServer
) -> None:
    tenant = make_tenant(url_app.test_client(), sessions, "acme")
    url = f"{image_server.url}/image.png"
    created = tenant.post_job(
        {"items": [{"fileUrl": url}, {"fileUrl": f"{image_server.url}/missing"}], **PROMPT}
    )
    assert created.status_code == 200, created.json
    assert created.json["items"] == [{"fileUrl": url}, {"fileUrl": f"{image_server.url}/missing"}]
    limits = replace(TEST_LIMITS, fetch_policy=policy())
    assert run_all(sessions, storage, limits) == [ItemOutcome.COMPLETED, ItemOutcome.FAILED]
    job = tenant.get_job(created.json["jobId"]).json
    assert job["status"] == "Completed"
    assert job["items"][0]["segments"][0]["mask"]["width"] == 160
    assert job["failedItems"][0]["errorMessage"] == "fileUrl: the server answered 404"


def test_the_worker_refuses_broken_and_oversized_url_images(
    url_app: Flask, sessions: sessionmaker[Session], storage: S3Storage, image_server: ImageServer
) -> None:
    # What the API would refuse at upload, the worker refuses for a URL:
    # a JPEG cut short with an end marker, and a valid PNG over the 4 Mpx limit.
    image_server.bodies["/cut.jpg"] = cut_short(jpeg_bytes(300, 200))
    image_server.bodies["/over.png"] = flat_png(2001, 2000)
    tenant = make_tenant(url_app.test_client(), sessions, "acme")
    urls = [f"{image_server.url}/cut.jpg", f"{image_server.url}/over.png"]
    created = tenant.post_job({"items": [{"fileUrl": url} for url in urls], **PROMPT})
    assert created.status_code == 200, created.json
    limits = replace(TEST_LIMITS, fetch_policy=policy())
    assert run_all(sessions, storage, limits) == [ItemOutcome.FAILED, ItemOutcome.FAILED]
    failed = {
        group["items"][0]["fileUrl"]: group["errorMessage"]
        for group in tenant.get_job(created.json["jobId"]).json["failedItems"]
    }
    assert failed[urls[0]].startswith("the image was refused: file is not a readable JPEG image")
    assert failed[urls[1]] == (
        "the image was refused: image has 2001x2000 pixels, more than the 4000000 allowed"
    )


def test_forbidden_urls_get_400_and_store_nothing(
    tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    for url in FORBIDDEN:
        response = tenant.post_job({"items": [{"fileUrl": url}], **PROMPT})
        assert response.status_code == 400, (url, response.json)
        assert response.json["error"]["message"].startswith("items[0].fileUrl")
    assert count(sessions, Job) == 0
    assert count(sessions, JobItem) == 0
    queue = redis.Redis.from_url(REDIS_URL)
    assert queue.llen(SEGMENT_QUEUE) == 0
    queue.close()


def test_inline_images_become_files_of_the_project(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage
) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(160, 120)).decode()
    created = tenant.post_job({"items": [{"imageData": data_url}], **PROMPT})
    assert created.status_code == 200, created.json
    [item] = created.json["items"]
    assert (
        tenant.client.get(tenant.url(f"/files/{item['fileId']}"), headers=tenant.headers).json[
            "width"
        ]
        == 160
    )
    assert run_all(sessions, storage, TEST_LIMITS) == [ItemOutcome.COMPLETED]


@pytest.mark.parametrize(
    "spelling",
    [
        "DATA:IMAGE/PNG;BASE64,{b64}",
        "data:image/png;name=photo.png;charset=binary;base64,{b64}",
        "data:;base64,{b64}",
        "data:image/png;base64,{wrapped}",
        "data:image/png;base64,{unpadded}",
        "data:image/png;base64,{escaped}",
    ],
    ids=["upper-case", "parameters", "no-type", "line-wrapped", "no-padding", "percent-encoded"],
)
def test_data_urls_are_read_as_rfc_2397_says(
    tenant: Tenant, sessions: sessionmaker[Session], spelling: str
) -> None:
    # An image whose base64 ends in padding, to test its absence.
    image = next(i for i in (png_bytes(33, 17, seed) for seed in range(30)) if len(i) % 3)
    b64 = base64.b64encode(image).decode()
    data_url = spelling.format(
        b64=b64,
        wrapped="\r\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),
        unpadded=b64.rstrip("="),
        escaped=b64.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D"),
    )
    created = tenant.post_job({"items": [{"imageData": data_url}], **PROMPT})
    assert created.status_code == 200, created.json
    [item] = created.json["items"]
    stored = tenant.client.get(tenant.url(f"/files/{item['fileId']}"), headers=tenant.headers)
    assert (stored.json["width"], stored.json["height"]) == (33, 17)
    assert stored.json["size"] == len(image)


@pytest.mark.parametrize(
    ("image_data", "status"),
    [
        ("data:image/png;base64,not*base64!", 400),
        ("data:image/gif;base64,R0lGODlh", 415),
        ("https://example.com/x.png", 400),
        ("data:image/png;base64," + base64.b64encode(b"GIF89a not really").decode(), 415),
        ("data:image/jpeg;base64," + base64.b64encode(png_bytes()[:60]).decode(), 415),
        ("data:image/png;base64," + "A" * 3_000_000, 413),
        ("data:image/jpeg;base64," + base64.b64encode(cut_short(jpeg_bytes())).decode(), 415),
        ("data:image/png;base64," + base64.b64encode(flat_png(2001, 2000)).decode(), 413),
    ],
    ids=[
        "not-base64",
        "gif",
        "not-a-data-url",
        "not-an-image",
        "truncated",
        "too-large",
        "cut-short-with-end-marker",
        "too-many-pixels",
    ],
)
def test_bad_inline_images_store_nothing(
    tenant: Tenant, sessions: sessionmaker[Session], image_data: str, status: int
) -> None:
    good = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    response = tenant.post_job(
        {"items": [{"imageData": good}, {"imageData": image_data}], **PROMPT}
    )
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == status
    assert count(sessions, StoredFile) == 0
    assert count(sessions, JobItem) == 0
