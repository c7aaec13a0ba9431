"""An attempt's result: its masks stored under keys of the attempt, and the
description of them that the item's row keeps; and the clean-up of objects
that no row refers to."""

from __future__ import annotations

import logging
from typing import Any

from segq.storage import ObjectStorage, StorageError
from worker.claims import Claim
from worker.engines.base import Candidate
from worker.masks import (
    encode_png,
    mask_area,
    mask_bounding_box,
    mask_polygons,
    mask_rle,
    polygons_svg_path,
)

log = logging.getLogger(__name__)


#: Candidates an engine returns at most (multimask output).
MAX_CANDIDATES = 3


def mask_key(claim: Claim, index: int, attempt: int | None = None) -> str:
    """Per item, attempt and candidate. An attempt that lost its lease may
    still be running (its worker cut off from the database, not from
    storage): under a key of its own it can never replace the objects of
    the attempt that completed, whose keys the item's row records."""
    attempt = claim.attempt if attempt is None else attempt
    return (
        f"projects/{claim.project_id}/jobs/{claim.job_id}/items/{claim.item_id}"
        f"/attempt-{attempt}/mask-{index}.png"
    )


def discard_objects(storage: ObjectStorage, keys: list[str]) -> None:
    """Delete objects no row refers to; storage that fails leaves them as
    garbage, never as a result."""
    for key in keys:
        try:
            storage.delete(key)
        except StorageError:
            log.warning("could not delete %s; it is referred to by no item", key, exc_info=True)


def objects_of_result(result: dict[str, Any] | None) -> list[str]:
    """The objects ``result`` refers to (none for a failure)."""
    if result is None:
        return []
    return [segment["maskKey"] for segment in result["segments"] if "maskKey" in segment]


def objects_of_earlier_attempts(claim: Claim) -> list[str]:
    """Where attempts before ``claim``'s may have left objects (a worker
    killed, or cut off, between its writes and its completion)."""
    return [
        mask_key(claim, index, attempt)
        for attempt in range(1, claim.attempt)
        for index in range(MAX_CANDIDATES)
    ]


def encode_result(
    claim: Claim,
    candidates: list[Candidate],
    storage: ObjectStorage,
    width: int,
    height: int,
) -> dict[str, Any]:
    """Store the masks and describe them as the item's result (keys, not URLs)."""
    outputs = set(claim.options.get("outputs") or ("polygons", "mask"))
    segments: list[dict[str, Any]] = []
    for index, candidate in enumerate(candidates):
        mask = candidate.mask
        box = mask_bounding_box(mask)
        segment: dict[str, Any] = {
            "score": round(float(candidate.score), 6),
            "boundingBox": (
                None
                if box is None
                else {"xMin": box[0], "yMin": box[1], "xMax": box[2], "yMax": box[3]}
            ),
            "area": mask_area(mask),
        }
        rings = mask_polygons(mask) if outputs & {"polygons", "svgPath"} else []
        if "polygons" in outputs:
            segment["polygons"] = [
                {"vertices": [list(v) for v in ring.vertices], "isHole": ring.is_hole}
                for ring in rings
            ]
        if "svgPath" in outputs:
            segment["svgPath"] = polygons_svg_path(rings, width, height)
        if "rle" in outputs:
            segment["rle"] = mask_rle(mask)
        if "mask" in outputs:
            key = mask_key(claim, index)
            storage.put(key, encode_png(mask), "image/png")
            segment["maskKey"] = key
        segments.append(segment)
    return {"width": width, "height": height, "segments": segments}
