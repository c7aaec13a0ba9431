"""The weights of the catalogue's engines (segq/engine_catalogue.py): the
official checkpoints, where they are and how to fetch them safely; and the
snapshot folders an operator downloads (SAM 3's is gated), which segq
checks. No torch here."""

from __future__ import annotations

import hashlib
import json
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


#: ``config.json``'s ``model_type`` of the facebook/sam3 snapshot.
SNAPSHOT_MODEL_TYPE = "sam3_video"
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_DIGEST_CHUNK_BYTES = 1 << 20


def snapshot_problem(directory: Path) -> str | None:
    """What makes ``directory`` not a SAM 3 snapshot, naming the file and
    what is wrong; None when it looks like one (its tensors are checked
    when it loads). Reads no tensors, so ``segq weights`` can ask it."""
    if not directory.is_dir():
        return f"{directory} is not a directory (SEGQ_MODEL=sam3 takes the facebook/sam3 snapshot)"
    config_path = directory / "config.json"
    if not config_path.is_file():
        return f"{config_path} is missing: not a Hugging Face snapshot of facebook/sam3"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{config_path} is not readable JSON: {exc}"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != SNAPSHOT_MODEL_TYPE:
        return (
            f"{config_path} has model_type {model_type!r}, not {SNAPSHOT_MODEL_TYPE!r}: "
            "not the facebook/sam3 snapshot (its detector and tracker)"
        )
    if not weight_files(directory):
        return f"{directory} holds no *.safetensors file: the snapshot's weights are missing"
    if not (directory / "tokenizer.json").is_file() and not (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    ):
        return f"{directory / 'tokenizer.json'} is missing: SAM 3 needs its text tokenizer"
    if not any((directory / name).is_file() for name in _PROCESSOR_FILES):
        return f"{directory / _PROCESSOR_FILES[0]} is missing: SAM 3 needs its image processor"
    return None


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def snapshot_digest(directory: Path) -> str:
    """SHA-256 over the snapshot's config and weight files (names and
    contents), hex: the model's identity in the embedding cache."""
    digest = hashlib.sha256()
    for path in [directory / "config.json", *weight_files(directory)]:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_DIGEST_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()
