"""An attempt's result: its masks stored under keys of the attempt, and the
description of them that the item's row keeps; and the clean-up of objects
that no row refers to."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from segq.contract import (
    LOGITS_KEY,
    LOGITS_SHAPE,
    MASK_KEY,
    OutputKind,
    StoredResult,
    StoredSegment,
    chosen_outputs,
    objects_named_by_result,
)
from segq.images import PNG
from segq.mask_logits import NPY_MEDIA_TYPE, encode_logits
from segq.storage import ObjectStorage, StorageError
from segq.worker.claims import Claim
from segq.worker.engines.base import Candidate
from segq.worker.item_inputs import ItemFailure
from segq.worker.item_stages import Stage, timed_stage
from segq.worker.masks import (
    encode_png,
    mask_area,
    mask_bounding_box,
    mask_polygons,
    mask_rle,
    polygons_svg_path,
)
from segq.worker.metrics import ENCODE_STORE_SECONDS

log = logging.getLogger(__name__)


def mask_key(claim: Claim, prompt_index: int | None, index: int, attempt: int | None = None) -> str:
    """Per item, attempt, prompt (None: segment everything) and candidate.
    An attempt that lost its lease may still be running (its worker cut off
    from the database, not from storage): under a key of its own it can
    never replace the objects of the attempt that completed, whose keys the
    item's row records."""
    return _answer_prefix(claim, prompt_index, attempt) + f"/mask-{index}.png"


def logits_key(
    claim: Claim, prompt_index: int | None, index: int, attempt: int | None = None
) -> str:
    """Where a candidate's low-resolution logits go; fixed as ``mask_key``."""
    return _answer_prefix(claim, prompt_index, attempt) + f"/logits-{index}.npy"


def _answer_prefix(claim: Claim, prompt_index: int | None, attempt: int | None) -> str:
    attempt = claim.attempt if attempt is None else attempt
    answer = "everything" if prompt_index is None else f"prompt-{prompt_index}"
    return f"{item_prefix(claim)}attempt-{attempt}/{answer}"


def discard_objects(storage: ObjectStorage, keys: list[str]) -> None:
    """Delete objects no row refers to, in one request per thousand;
    storage that fails leaves them as garbage, never as a result, and is
    told in one line (storage down is the breaker's to report)."""
    if not keys:
        return
    try:
        storage.delete_many(keys)
    except StorageError as exc:
        log.warning("could not delete %s objects that no item refers to: %s", len(keys), exc)


def item_prefix(claim: Claim) -> str:
    """Where every attempt at ``claim``'s item writes."""
    return f"projects/{claim.project_id}/jobs/{claim.job_id}/items/{claim.item_id}/"


def discard_objects_of_earlier_attempts(
    storage: ObjectStorage, claim: Claim, result: StoredResult | None
) -> None:
    """Delete what attempts before ``claim``'s left under the item (a worker
    killed, or cut off, between its writes and its completion; an attempt
    given back for an outage): one listing, then one delete of what was
    really written and ``result`` (the completed attempt's) does not name.
    Never a request per key that might exist."""
    kept = set(objects_named_by_result(result))
    try:
        written = [stored.key for stored in storage.list_objects(item_prefix(claim))]
    except StorageError as exc:
        log.warning("could not list item %s's objects to clean up: %s", claim.item_id, exc)
        return
    discard_objects(storage, [key for key in written if key not in kept])


def encode_result(
    claim: Claim,
    answers: Sequence[tuple[int | None, list[Candidate]]],
    storage: ObjectStorage,
    width: int,
    height: int,
) -> StoredResult:
    """Store the masks and describe them as the item's result (keys, not
    URLs). ``answers``: (prompt index, its candidates best first) in prompt
    order, the index None for segment everything; the segments keep that
    order and name their prompt."""
    with ENCODE_STORE_SECONDS.time():
        return _encode_and_store(claim, answers, storage, width, height)


def _encode_and_store(
    claim: Claim,
    answers: Sequence[tuple[int | None, list[Candidate]]],
    storage: ObjectStorage,
    width: int,
    height: int,
) -> StoredResult:
    outputs = set(chosen_outputs(claim.options))
    if "logits" in outputs and any(c.logits is None for _, cs in answers for c in cs):
        raise ItemFailure("logits need a SAM engine; this server's engine gives none")
    segments: list[StoredSegment] = []
    for prompt_index, candidates in answers:
        for index, candidate in enumerate(candidates):
            segment = _encode_segment(candidate, outputs, width, height)
            if prompt_index is not None:
                segment["promptIndex"] = prompt_index
            if "mask" in outputs:
                key = mask_key(claim, prompt_index, index)
                with timed_stage(Stage.ENCODE_PNG):
                    png = encode_png(candidate.mask)
                with timed_stage(Stage.STORAGE_WRITE):
                    storage.put(key, png, PNG.mime_type)
                segment[MASK_KEY] = key
            if "logits" in outputs and candidate.logits is not None:
                key = logits_key(claim, prompt_index, index)
                with timed_stage(Stage.ENCODE_LOGITS):
                    npy = encode_logits(candidate.logits)
                with timed_stage(Stage.STORAGE_WRITE):
                    storage.put(key, npy, NPY_MEDIA_TYPE)
                segment[LOGITS_KEY] = key
                segment[LOGITS_SHAPE] = list(candidate.logits.shape)
            segments.append(segment)
    return {"width": width, "height": height, "segments": segments}


def _normalized_box(
    box: npt.NDArray[np.float64], width: int, height: int
) -> tuple[float, float, float, float]:
    """A box in pixels as the contract's normalized one, clipped to the image."""
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    return (
        min(max(x_min / width, 0.0), 1.0),
        min(max(y_min / height, 0.0), 1.0),
        min(max(x_max / width, 0.0), 1.0),
        min(max(y_max / height, 0.0), 1.0),
    )


def _encode_segment(
    candidate: Candidate, outputs: set[OutputKind], width: int, height: int
) -> StoredSegment:
    """The parts of a segment kept in the item's row."""
    mask = candidate.mask
    with timed_stage(Stage.ENCODE_SUMMARY):
        # The engine's own box where it found one (SAM 3's detector), else the mask's.
        box = (
            mask_bounding_box(mask)
            if candidate.box is None
            else _normalized_box(candidate.box, width, height)
        )
        segment: StoredSegment = {
            "score": round(float(candidate.score), 6),
            "boundingBox": (
                None
                if box is None
                else {"xMin": box[0], "yMin": box[1], "xMax": box[2], "yMax": box[3]}
            ),
            "area": mask_area(mask),
        }
    # An SVG path is drawn from the polygons' rings: tracing them counts as
    # the polygons' encoding, whichever of the two was asked for.
    rings = []
    if outputs & {"polygons", "svgPath"}:
        with timed_stage(Stage.ENCODE_POLYGONS):
            rings = mask_polygons(mask)
            if "polygons" in outputs:
                segment["polygons"] = [
                    {"vertices": [list(v) for v in ring.vertices], "isHole": ring.is_hole}
                    for ring in rings
                ]
    if "svgPath" in outputs:
        with timed_stage(Stage.ENCODE_SVG_PATH):
            segment["svgPath"] = polygons_svg_path(rings, width, height)
    if "rle" in outputs:
        with timed_stage(Stage.ENCODE_RLE):
            segment["rle"] = mask_rle(mask)
    return segment
