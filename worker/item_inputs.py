"""What an attempt reads of its item: the image, fetched from storage or
from its URL and decoded under this worker's limits, and the prompt in
that image's pixel frame."""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from segq.contract import EVERYTHING, LOGITS_KEY, EverythingSettings
from segq.images import ImageRefused, decode_image
from segq.mask_logits import LogitsUnreadable, decode_logits
from segq.storage import ObjectNotFound, ObjectStorage
from segq.url_guard import FetchFailed, FetchPolicy, UrlRefused, fetch
from segq.worker.claims import Claim
from segq.worker.engines.base import Concept, EverythingOptions, Prompt


class ItemFailure(Exception):
    """The item cannot succeed, however often it is tried; the message is
    shown to the client as the item's errorMessage."""


@dataclass(frozen=True)
class ImageLimits:
    """What a worker accepts as an item's image."""

    max_pixels: int
    #: How URLs are fetched; None: items given as URLs fail.
    fetch_policy: FetchPolicy | None


#: How many bytes of decoded images a worker process keeps (``DecodedImages``).
DECODED_IMAGES_BYTES = 64 * 1024 * 1024


class DecodedImages:
    """The images this process decoded last, by storage key, least recently
    used first out once they pass ``max_bytes``: the next prompt on an image
    (a person clicking points on it) reads and decodes nothing. A stored
    file's key is written once and never rewritten (an upload over a file
    takes a new key; other bytes for one that holds its upload are
    refused), so what a key decoded to stays true. Images are kept
    read-only: an engine that wrote into one would change the next item's."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._images: OrderedDict[tuple[str, int], npt.NDArray[np.uint8]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, max_pixels: int) -> npt.NDArray[np.uint8] | None:
        with self._lock:
            image = self._images.get((key, max_pixels))
            if image is not None:
                self._images.move_to_end((key, max_pixels))
            return image

    def put(self, key: str, max_pixels: int, image: npt.NDArray[np.uint8]) -> None:
        if image.nbytes > self.max_bytes:
            return
        image.flags.writeable = False
        with self._lock:
            if (key, max_pixels) in self._images:
                return
            self._images[key, max_pixels] = image
            self._bytes += image.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._images.popitem(last=False)
                self._bytes -= dropped.nbytes


#: This process's (a forked pool process starts with its parent's, which
#: runs no items: empty).
_decoded_images = DecodedImages(DECODED_IMAGES_BYTES)


def load_image(storage: ObjectStorage, claim: Claim, limits: ImageLimits) -> npt.NDArray[np.uint8]:
    """The item's image as displayed, (H, W, 3) uint8 RGB (``segq.images``),
    read-only. A stored file's image this process decoded lately is not
    read again; one given as a URL always is (what a URL serves may change)."""
    if claim.source_url is None and claim.file_key is not None:
        known = _decoded_images.get(claim.file_key, limits.max_pixels)
        if known is not None:
            return known
        image = _read_and_decode(storage, claim, limits)
        _decoded_images.put(claim.file_key, limits.max_pixels, image)
        return image
    return _read_and_decode(storage, claim, limits)


def _read_and_decode(
    storage: ObjectStorage, claim: Claim, limits: ImageLimits
) -> npt.NDArray[np.uint8]:
    if claim.source_url is not None:
        if limits.fetch_policy is None:
            raise ItemFailure("this worker does not fetch URLs")
        try:
            data = fetch(claim.source_url, limits.fetch_policy)
        except (UrlRefused, FetchFailed) as exc:
            raise ItemFailure(f"fileUrl: {exc}") from None
    elif claim.file_key is None:
        raise ItemFailure("the file was deleted before the item ran")
    else:
        try:
            data = storage.get(claim.file_key)
        except ObjectNotFound:
            # Only when the file was overwritten or deleted just as the job
            # was created: the version an item was created on stays while
            # the item may run.
            raise ItemFailure(
                "the file's content from when the job was created is no longer stored"
            ) from None
    try:
        # Items given as URLs were never inspected by the API; stored files
        # were, but are bounded again under this worker's own limit.
        return decode_image(data, max_pixels=limits.max_pixels).pixels
    except ImageRefused as exc:
        raise ItemFailure(f"the image was refused: {exc}") from None


def everything_options(options: dict[str, Any]) -> EverythingOptions | None:
    """The job's segment-everything options (the API filled in every
    field), or None for a prompted job."""
    if options.get("mode") != EVERYTHING:
        return None
    chosen: EverythingSettings = options["everything"]
    return EverythingOptions(
        points_per_side=chosen["pointsPerSide"],
        pred_iou_thresh=chosen["predIouThresh"],
        stability_score_thresh=chosen["stabilityScoreThresh"],
        min_area=chosen["minArea"],
        max_segments=chosen["maxSegments"],
    )


def prompt_sets(prompt: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's prompts as stored: its ``prompts``, or its top-level prompt
    as the only one (prompt index 0)."""
    sets = prompt.get("prompts")
    return list(sets) if sets else [prompt]


def item_prompts(
    storage: ObjectStorage,
    prompt: dict[str, Any],
    width: int,
    height: int,
    options: dict[str, Any] | None = None,
) -> list[Prompt]:
    """Every prompt of the job, in order, in the image's pixel frame, with
    the logits a prompt's ``maskInput`` names read from storage, and text
    prompts with the job's ``textOptions`` (the API filled in every field)."""
    prompts = []
    for entry in prompt_sets(prompt):
        if entry.get("text") is not None:
            prompts.append(text_prompt(entry, (options or {})["textOptions"], width, height))
            continue
        pixels = pixel_prompt(entry, width, height)
        mask_input = entry.get("maskInput")
        if mask_input is not None:
            pixels = replace(pixels, mask_input=_stored_logits(storage, mask_input))
        prompts.append(pixels)
    return prompts


def _stored_logits(storage: ObjectStorage, mask_input: dict[str, Any]) -> npt.NDArray[np.float32]:
    """(1, h, w) float32: the logits the API found for ``mask_input``, or
    those the request gave inline."""
    if "inline" in mask_input:
        try:
            return decode_logits(base64.b64decode(mask_input["inline"]))[None]
        except LogitsUnreadable as exc:
            raise ItemFailure(f"mask_input is unreadable: {exc}") from None
    named = (
        f"maskInput (job {mask_input['jobId']}, item {mask_input['itemIndex']}, "
        f"segment {mask_input['segmentIndex']})"
    )
    try:
        return decode_logits(storage.get(mask_input[LOGITS_KEY]))[None]
    except ObjectNotFound:
        raise ItemFailure(f"{named}: its logits are no longer stored") from None
    except LogitsUnreadable as exc:
        raise ItemFailure(f"{named}: its logits are unreadable: {exc}") from None


def text_prompt(
    prompt: dict[str, Any], text_options: dict[str, Any], width: int, height: int
) -> Prompt:
    """A stored text prompt (its phrase and normalized exemplar boxes) as
    the engine's Concept in the image's pixel frame."""
    exemplars = prompt.get("boxes") or []
    return Prompt(
        points=np.zeros((0, 2), dtype=np.float64),
        labels=np.zeros(0, dtype=np.int64),
        box=None,
        concept=Concept(
            text=prompt["text"],
            exemplar_boxes=np.array(
                [
                    [b["xMin"] * width, b["yMin"] * height, b["xMax"] * width, b["yMax"] * height]
                    for b in exemplars
                ],
                dtype=np.float64,
            ).reshape(-1, 4),
            exemplar_labels=np.array([b["label"] for b in exemplars], dtype=np.int64),
            score_threshold=text_options["scoreThreshold"],
            mask_threshold=text_options["maskThreshold"],
            max_segments=text_options["maxSegments"],
        ),
    )


def pixel_prompt(prompt: dict[str, Any], width: int, height: int) -> Prompt:
    """The contract's normalized prompt in the image's pixel frame."""
    points = prompt.get("points") or []
    box = prompt.get("boundingBox")
    return Prompt(
        points=np.array(
            [[p["x"] * width, p["y"] * height] for p in points], dtype=np.float64
        ).reshape(-1, 2),
        labels=np.array([p["label"] for p in points], dtype=np.int64),
        box=(
            np.array(
                [
                    box["xMin"] * width,
                    box["yMin"] * height,
                    box["xMax"] * width,
                    box["yMax"] * height,
                ],
                dtype=np.float64,
            )
            if box
            else None
        ),
    )
