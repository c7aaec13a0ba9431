"""Checkpoint downloads, from a real HTTP server on loopback, and engine choice."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from segq.engine_catalogue import CHECKPOINT_NAMES
from segq.worker.engines import EngineChoice, EngineConfigError, resolve_engine
from segq.worker.weights import (
    CHECKPOINTS,
    WeightsError,
    download_checkpoint,
    engine_name,
    file_sha256,
    official_checkpoint_path,
)

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

    from segq.worker.engines import load_engine
    from segq.worker.engines.base import Prompt

    choice = resolve_engine("benchmark_fixed_mask", None, tmp_path)
    assert choice == EngineChoice("benchmark_fixed_mask", None)
    engine = load_engine(choice, "cpu")
    prompt = Prompt(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.array([0.0, 0.0, 5.0, 5.0]))
    [candidate] = engine.segment(np.zeros((40, 60, 3), dtype=np.uint8), prompt, multimask=True)
    assert candidate.mask.shape == (40, 60) and candidate.mask.sum() == 20 * 30


SAM2_SIZES = ["tiny", "small", "base_plus", "large"]
SAM2_NAMES = [f"sam2_hiera_{size}" for size in SAM2_SIZES]
SAM2_1_NAMES = [f"sam2.1_hiera_{size}" for size in SAM2_SIZES]
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


def test_sam2_checkpoints_are_meta_s_files_under_their_own_names(tmp_path: Path) -> None:
    # SAM 2's July 2024 release and SAM 2.1's September 2024 one, as
    # facebookresearch/sam2's checkpoints/download_ckpts.sh names them.
    releases = {"072824": SAM2_NAMES, "092824": SAM2_1_NAMES}
    for release, names in releases.items():
        for name in names:
            official = CHECKPOINTS[name]
            assert official.url == (
                f"https://dl.fbaipublicfiles.com/segment_anything_2/{release}/{name}.pt"
            )
            assert official.md5 is None  # Meta publishes none
            assert official_checkpoint_path(name, tmp_path) == tmp_path / f"{name}.pt"
            assert engine_name(name) == name
    assert engine_name("vit_h") == "sam_vit_h"
    # `segq weights download` offers every catalogued checkpoint.
    assert set(CHECKPOINT_NAMES) == set(CHECKPOINTS)
    assert len(CHECKPOINTS) == 3 + len(SAM2_NAMES) + len(SAM2_1_NAMES)


def test_a_sam2_download_needs_a_sha256_or_consent(server: Server, tmp_path: Path) -> None:
    url = f"{server.url}/sam.pth"
    # Meta publishes no checksum for SAM 2: nothing is fetched without one.
    with pytest.raises(WeightsError, match="--sha256"):
        download_checkpoint("sam2_hiera_tiny", tmp_path, url=url)
    assert server.requests == 0 and list(tmp_path.iterdir()) == []
    with pytest.raises(WeightsError, match=r"SHA256 \w+, expected"):
        download_checkpoint("sam2_hiera_tiny", tmp_path, url=url, expected_sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []
    path = download_checkpoint("sam2_hiera_tiny", tmp_path, url=url, expected_sha256=PAYLOAD_SHA256)
    assert path == tmp_path / "sam2_hiera_tiny.pt" and path.read_bytes() == PAYLOAD
    assert file_sha256(path) == PAYLOAD_SHA256
    unverified = download_checkpoint("sam2_hiera_small", tmp_path, url=url, unverified=True)
    assert unverified.read_bytes() == PAYLOAD
    # SAM 2.1 alike: refused without a checksum, kept under its own name with one.
    with pytest.raises(WeightsError, match="--sha256"):
        download_checkpoint("sam2.1_hiera_large", tmp_path, url=url)
    pinned = download_checkpoint(
        "sam2.1_hiera_large", tmp_path, url=url, expected_sha256=PAYLOAD_SHA256
    )
    assert pinned == tmp_path / "sam2.1_hiera_large.pt" and pinned.read_bytes() == PAYLOAD


def test_sam2_models_are_chosen_by_name(tmp_path: Path) -> None:
    assert resolve_engine("sam2_hiera_large", "/w/l.pt", tmp_path) == EngineChoice(
        "sam2_hiera_large", Path("/w/l.pt")
    )
    with pytest.raises(EngineConfigError, match="segq weights download sam2_hiera_tiny"):
        resolve_engine("sam2_hiera_tiny", None, tmp_path)
    official_checkpoint_path("sam2_hiera_tiny", tmp_path).write_bytes(b"x")
    assert resolve_engine("sam2_hiera_tiny", None, tmp_path) == EngineChoice(
        "sam2_hiera_tiny", tmp_path / "sam2_hiera_tiny.pt"
    )
    # SAM 2.1 is found under its own file, not SAM 2's.
    with pytest.raises(EngineConfigError, match=r"segq weights download sam2\.1_hiera_tiny"):
        resolve_engine("sam2.1_hiera_tiny", None, tmp_path)
    official_checkpoint_path("sam2.1_hiera_tiny", tmp_path).write_bytes(b"x")
    assert resolve_engine("sam2.1_hiera_tiny", None, tmp_path) == EngineChoice(
        "sam2.1_hiera_tiny", tmp_path / "sam2.1_hiera_tiny.pt"
    )
    # An unknown name is a startup error that lists SAM 2's and 2.1's names too.
    with pytest.raises(EngineConfigError, match="unknown SEGQ_MODEL 'sam2_hiera_huge'") as refused:
        resolve_engine("sam2_hiera_huge", None, tmp_path)
    assert all(name in str(refused.value) for name in SAM2_NAMES + SAM2_1_NAMES)


def test_the_cli_asks_for_a_sha256_before_fetching_sam2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from segq.cli.main import main

    runner = CliRunner()
    refused = runner.invoke(
        main, ["weights", "download", "sam2_hiera_tiny", "--dest", str(tmp_path)]
    )
    assert refused.exit_code == 1 and "--sha256" in refused.output
    malformed = runner.invoke(
        main, ["weights", "download", "sam2_hiera_tiny", "--sha256", "abc", "--dest", str(tmp_path)]
    )
    assert malformed.exit_code == 2 and "64 hexadecimal digits" in malformed.output
    # SAM 2.1's names are offered as well (not refused as an invalid choice, exit 2).
    sam2_1 = runner.invoke(
        main, ["weights", "download", "sam2.1_hiera_base_plus", "--dest", str(tmp_path)]
    )
    assert sam2_1.exit_code == 1 and "--sha256" in sam2_1.output
    assert list(tmp_path.iterdir()) == []
