"""Official Segment Anything checkpoints: where they are and how to fetch them safely."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests


class WeightsError(RuntimeError):
    pass


@dataclass(frozen=True)
class OfficialCheckpoint:
    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_BASE = "https://dl.fbaipublicfiles.com/segment_anything"
# Meta publishes MD5s (each file is named after the first six hex digits of its own).
CHECKPOINTS = {
    "vit_b": OfficialCheckpoint(
        f"{_BASE}/sam_vit_b_01ec64.pth", "01ec64d29a2fca3f0661936605ae66f8"
    ),
    "vit_l": OfficialCheckpoint(
        f"{_BASE}/sam_vit_l_0b3195.pth", "0b3195507c641ddb6910d2bb5adee89c"
    ),
    "vit_h": OfficialCheckpoint(
        f"{_BASE}/sam_vit_h_4b8939.pth", "4b8939a88964f0f4ff5f5b2642c598a6"
    ),
}
CHUNK_BYTES = 1 << 20


def official_checkpoint_path(architecture: str, weights_dir: Path) -> Path:
    if architecture not in CHECKPOINTS:
        raise WeightsError(
            f"no official checkpoint for {architecture!r}; known: {sorted(CHECKPOINTS)}"
        )
    return weights_dir / CHECKPOINTS[architecture].filename


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
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
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Fetch the checkpoint into ``dest_dir`` and verify it; returns its path.

    Streams to ``<name>.part`` while hashing and renames only a verified file,
    so a broken download never looks like a checkpoint. A file already there
    with the right hash is kept and nothing is downloaded."""
    official = CHECKPOINTS.get(architecture)
    if official is None:
        raise WeightsError(
            f"no official checkpoint for {architecture!r}; known: {sorted(CHECKPOINTS)}"
        )
    url = url or official.url
    expected_md5 = expected_md5 or official.md5
    target = dest_dir / official.filename
    if target.is_file() and file_md5(target) == expected_md5:
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
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
        if digest.hexdigest() != expected_md5:
            raise WeightsError(
                f"{url} has MD5 {digest.hexdigest()}, expected {expected_md5}; file discarded"
            )
        os.replace(partial, target)
    except requests.RequestException as exc:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"could not download {url}: {exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target
