"""What ``segq submit`` is asked to segment: image paths from files, folders
and glob patterns, each with its prompt (from the command line or a JSONL
file), and the key that makes a rerun find the work already done."""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
#: Keys a line of --prompts-from may hold besides "image".
PROMPT_KEYS = ("points", "boundingBox", "prompts", "text", "boxes")


class InputError(ValueError):
    """An argument or a prompts file names nothing usable; says which."""


@dataclass(frozen=True)
class ImageTask:
    """One image to segment with one request (prompt and options)."""

    path: Path
    #: The job body without its items: the prompt and the options.
    request: Mapping[str, Any]
    #: sha256 of the image's bytes.
    content_sha256: str

    @property
    def key(self) -> str:
        """Derived from the content and the request only: the same image
        under another name, asked the same, is the same work."""
        canonical = json.dumps(self.request, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(f"{self.content_sha256}\n{canonical}".encode()).hexdigest()


def expand_images(arguments: Sequence[str]) -> list[Path]:
    """Files as given, folders' JPEG and PNG files (not recursive), and glob
    patterns (``**`` recursive) for shells that left them unexpanded; each
    image once, in the order named."""
    found: dict[Path, None] = {}
    for argument in arguments:
        path = Path(argument)
        if path.is_file():
            found[path] = None
        elif path.is_dir():
            images = sorted(p for p in path.iterdir() if _is_image(p))
            if not images:
                raise InputError(f"{argument}: the folder holds no .jpg, .jpeg or .png file")
            found.update(dict.fromkeys(images))
        elif glob.has_magic(argument):
            matches = sorted(Path(p) for p in glob.glob(argument, recursive=True))
            images = [p for p in matches if _is_image(p)]
            if not images:
                raise InputError(f"{argument}: the pattern matches no image")
            found.update(dict.fromkeys(images))
        else:
            raise InputError(f"{argument}: no such file, folder or pattern")
    return list(found)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def read_prompts_file(path: Path) -> dict[Path, dict[str, Any]]:
    """``--prompts-from``: one JSON object a line, ``{"image": "a.jpg",
    "points": [...], "boundingBox": {...}}``, ``{"image": ..., "text":
    "person", "boxes": [...]}`` or ``{"image": ..., "prompts": [...]}`` as
    the job body has them; image paths relative to the file's
    folder. Blank lines are skipped. The server validates the prompts."""
    prompts: dict[Path, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{where}: not JSON ({exc})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise InputError(f'{where}: each line is an object with an "image" path')
        unknown = set(entry) - {"image", *PROMPT_KEYS}
        if unknown:
            raise InputError(f"{where}: unknown keys {sorted(unknown)}")
        prompt = {key: entry[key] for key in PROMPT_KEYS if key in entry}
        if not prompt:
            raise InputError(f"{where}: no points, boundingBox, text or prompts")
        image = path.parent / entry["image"]
        if not image.is_file():
            raise InputError(f"{where}: {image}: no such file")
        prompts[image] = prompt
    return prompts


def image_tasks(
    images: Sequence[Path],
    per_image: Mapping[Path, Mapping[str, Any]],
    default_prompt: Mapping[str, Any],
    options: Mapping[str, Any],
) -> list[ImageTask]:
    """An ImageTask per image: its line of the prompts file, else the
    command line's prompt (an image with neither is an InputError)."""
    by_resolved = {path.resolve(): prompt for path, prompt in per_image.items()}
    tasks = []
    seen: set[Path] = set()
    for path in [*images, *per_image]:
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        prompt = by_resolved.get(resolved) or default_prompt
        if not prompt:
            raise InputError(f"{path}: no prompt (give --point/--box/--text or --prompts-from)")
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path}: {exc}") from None
        tasks.append(ImageTask(path, {**prompt, **options}, hashlib.sha256(content).hexdigest()))
    return tasks
