"""The official checkpoints of the catalogue's engines
(segq/engine_catalogue.py): where they are and how to fetch them safely."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import requests

from segq.engine_catalogue import ENGINES_BY_WEIGHTS, OFFICIAL_CHECKPOINTS, OfficialCheckpoint


class WeightsError(RuntimeError):
    pass


#: ``segq weights download``'s names -> the files (segq/engine_catalogue.py).
CHECKPOINTS: dict[str, OfficialCheckpoint] = OFFICIAL_CHECKPOINTS
CHUNK_BYTES = 1 << 20


def official_checkpoint_path(architecture: str, weights_dir: Path) -> Path:
    if architecture not in CHECKPOINTS:
        raise WeightsError(
            f"no official checkpoint for {architecture!r}; known: {sorted(CHECKPOINTS)}"
        )
    return weights_dir / CHECKPOINTS[architecture].filename


def engine_name(checkpoint: str) -> str:
    """The SEGQ_MODEL that runs the official checkpoint named ``checkpoint``
    (a key of CHECKPOINTS)."""
    return ENGINES_BY_WEIGHTS[checkpoint].name


def file_md5(path: Path) -> str:
    return _file_digest(path, "md5")


def file_sha256(path: Path) -> str:
    return _file_digest(path, "sha256")


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_checkpoint(
    architecture: str,
    dest_dir: Path,
    *,
    url: str | None = None,
    expected_md5: str | None = None,
    expected_sha256: str | None = None,
    unverified: bool = False,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Fetch the checkpoint into ``dest_dir`` and verify it; returns its path.

    The file is checked against ``expected_sha256`` when given, else against
    ``expected_md5`` or Meta's published MD5. A checkpoint Meta publishes no
    checksum for (SAM 2) is refused without ``expected_sha256`` unless
    ``unverified`` says to keep it unchecked (a file that is not a fitting
    checkpoint still fails when the model loads).

    Streams to ``<name>.part`` while hashing and renames only a verified file,
    so a broken download never looks like a checkpoint. A file already there
    with the right hash (or any, when unverified) is kept and nothing is
    downloaded."""
    official = CHECKPOINTS.get(architecture)
    if official is None:
        raise WeightsError(
            f"no official checkpoint for {architecture!r}; known: {sorted(CHECKPOINTS)}"
        )
    url = url or official.url
    algorithm, expected = "sha256", expected_sha256
    if expected is None:
        algorithm, expected = "md5", expected_md5 or official.md5
    if expected is None and not unverified:
        raise WeightsError(
            f"Meta publishes no checksum for {official.filename}: give the SHA-256 you "
            "trust (--sha256), or accept the file unverified (--unverified)"
        )
    target = dest_dir / official.filename
    if target.is_file() and (expected is None or _file_digest(target, algorithm) == expected):
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.new(algorithm, usedforsecurity=False)
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            if response.status_code != 200:
                raise WeightsError(f"{url} answered {response.status_code}")
            total = (
                int(response.headers["Content-Length"])
                if "Content-Length" in response.headers
                else None
            )
            received = 0
            with partial.open("wb") as handle:
                for chunk in response.iter_content(CHUNK_BYTES):
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if progress is not None:
                        progress(received, total)
        if expected is not None and digest.hexdigest() != expected:
            raise WeightsError(
                f"{url} has {algorithm.upper()} {digest.hexdigest()}, expected {expected}; "
                "file discarded"
            )
        os.replace(partial, target)
    except requests.RequestException as exc:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"could not download {url}: {exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target
