"""Checkpoint downloads, from a real HTTP server on loopback, and engine choice."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from worker.engines import EngineChoice, EngineConfigError, resolve_engine
from worker.weights import WeightsError, download_checkpoint, official_checkpoint_path

PAYLOAD = b"pretend checkpoint " * 50_000
PAYLOAD_MD5 = hashlib.md5(PAYLOAD, usedforsecurity=False).hexdigest()


class Server:
    def __init__(self) -> None:
        self.requests = 0
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.requests += 1
                if self.path != "/sam.pth":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                self.wfile.write(PAYLOAD)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    thread = threading.Thread(target=running.httpd.serve_forever, daemon=True)
    thread.start()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


def test_verified_download_lands_under_the_official_name(server: Server, tmp_path: Path) -> None:
    seen: list[int] = []
    path = download_checkpoint(
        "vit_b",
        tmp_path,
        url=f"{server.url}/sam.pth",
        expected_md5=PAYLOAD_MD5,
        progress=lambda received, total: seen.append(received),
    )
    assert path == tmp_path / "sam_vit_b_01ec64.pth" == official_checkpoint_path("vit_b", tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert seen[-1] == len(PAYLOAD)
    # Already there and right: nothing is fetched again.
    before = server.requests
    assert (
        download_checkpoint(
            "vit_b", tmp_path, url=f"{server.url}/sam.pth", expected_md5=PAYLOAD_MD5
        )
        == path
    )
    assert server.requests == before


def test_a_wrong_hash_leaves_nothing_behind(server: Server, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="expected"):
        download_checkpoint("vit_l", tmp_path, url=f"{server.url}/sam.pth", expected_md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_http_errors_and_unknown_architectures(server: Server, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="404"):
        download_checkpoint("vit_h", tmp_path, url=f"{server.url}/missing.pth")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WeightsError, match="could not download"):
        download_checkpoint("vit_h", tmp_path, url="http://127.0.0.1:9/sam.pth", timeout=2)
    with pytest.raises(WeightsError, match="no official checkpoint"):
        download_checkpoint("vit_q", tmp_path)


def test_engine_choice_follows_the_settings(tmp_path: Path) -> None:
    assert resolve_engine(None, None, tmp_path) == EngineChoice("grabcut", None)
    assert resolve_engine(None, "/w/sam.pth", tmp_path) == EngineChoice(
        "sam_vit_b", Path("/w/sam.pth")
    )
    assert resolve_engine("grabcut", "/w/sam.pth", tmp_path) == EngineChoice("grabcut", None)
    assert resolve_engine("sam_vit_h", "/w/h.pth", tmp_path) == EngineChoice(
        "sam_vit_h", Path("/w/h.pth")
    )
    with pytest.raises(EngineConfigError, match="segq weights download vit_l"):
        resolve_engine("sam_vit_l", None, tmp_path)
    with pytest.raises(EngineConfigError, match="unknown SEGQ_MODEL"):
        resolve_engine("sam2", None, tmp_path)
    # A downloaded official checkpoint is found without configuration.
    official_checkpoint_path("vit_b", tmp_path).write_bytes(b"x")
    assert resolve_engine(None, None, tmp_path) == EngineChoice(
        "sam_vit_b", tmp_path / "sam_vit_b_01ec64.pth"
    )


def test_the_benchmark_engine_is_chosen_only_by_name(tmp_path: Path) -> None:
    import numpy as np

    from worker.engines import load_engine
    from worker.engines.base import Prompt

    choice = resolve_engine("benchmark_fixed_mask", None, tmp_path)
    assert choice == EngineChoice("benchmark_fixed_mask", None)
    engine = load_engine(choice, "cpu")
    prompt = Prompt(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.array([0.0, 0.0, 5.0, 5.0]))
    [candidate] = engine.segment(np.zeros((40, 60, 3), dtype=np.uint8), prompt, multimask=True)
    assert candidate.mask.shape == (40, 60) and candidate.mask.sum() == 20 * 30
