"""Encoders for one object mask: PNG, polygon rings, box, area, COCO RLE, SVG path.

Every function takes ``mask``: an (H, W) bool array in the image's pixel frame
(row y, column x, origin top-left), True on the object. Normalized outputs
divide x by W and y by H, so they do not depend on the image's resolution.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

BoolMask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Ring:
    """One closed contour of a mask.

    vertices: (x / W, y / H) pairs, where (x, y) are the integer column and
        row of a boundary pixel of the object (so every vertex lies in
        [0, (W - 1) / W] x [0, (H - 1) / H]). Consecutive vertices are joined
        by horizontal, vertical or 45-degree runs of boundary pixels; the ring
        is implicitly closed (the first vertex is not repeated). A part one
        pixel thin yields a ring of one or two vertices.
    is_hole: False for the outer boundary of a connected part (8-connected
        object pixels), True for the boundary around a hole in a part. A hole
        ring runs through the object pixels that border the hole, not
        through the hole itself.
    """

    vertices: tuple[tuple[float, float], ...]
    is_hole: bool


class CocoRle(TypedDict):
    """COCO's uncompressed run-length encoding.

    size: [H, W].
    counts: run lengths over the mask flattened column by column (Fortran
        order), alternating background and object, starting with background
        (so the first count is 0 when pixel (0, 0) is on the object).
    """

    size: list[int]
    counts: list[int]


def encode_png(mask: BoolMask) -> bytes:
    """A single-channel 8-bit PNG of the mask at its own size: 0 background, 255 object."""
    _check_mask(mask)
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_polygons(mask: BoolMask) -> list[Ring]:
    """Every contour of the mask: the outer boundary of each disjoint part and
    the boundary of each hole, traced by ``cv2.findContours`` (RETR_CCOMP,
    CHAIN_APPROX_SIMPLE). See ``Ring`` for the vertex convention.

    Rings come in OpenCV's order; an outer ring and a hole ring run in
    opposite directions. ``rasterize_rings`` turns the result back into
    exactly this mask. An empty mask has no rings.
    """
    _check_mask(mask)
    height, width = mask.shape
    contours, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if hierarchy is None:
        return []
    rings: list[Ring] = []
    # hierarchy[0][i] is (next, previous, first_child, parent); with RETR_CCOMP
    # only holes have a parent.
    for contour, links in zip(contours, hierarchy[0], strict=True):
        pixels = contour.reshape(-1, 2)
        vertices = tuple((int(x) / width, int(y) / height) for x, y in pixels)
        rings.append(Ring(vertices=vertices, is_hole=bool(links[3] >= 0)))
    return rings


def rasterize_rings(rings: Sequence[Ring], height: int, width: int) -> BoolMask:
    """The (height, width) bool mask that ``mask_polygons`` traced ``rings`` from.

    An outer ring covers its boundary pixels and everything inside them; a
    hole ring covers only what lies strictly inside its boundary pixels (those
    are object pixels). XOR-ing the rings' pixel sets gives back the mask
    exactly, whatever the nesting (parts inside holes inside parts).
    """
    result = np.zeros((height, width), dtype=np.uint8)
    for ring in rings:
        pixels = _ring_pixels(ring, height, width)
        filled = np.zeros((height, width), dtype=np.uint8)
        cv2.fillPoly(filled, [pixels], 1)
        boundary = np.zeros((height, width), dtype=np.uint8)
        # fillPoly can leave out pixels of zero-area stretches (one pixel thin
        # spurs, single-pixel parts), which the outline always covers.
        cv2.polylines(boundary, [pixels], isClosed=True, color=1)
        covered = filled & (1 - boundary) if ring.is_hole else filled | boundary
        result ^= covered
    return result.astype(np.bool_)


def mask_bounding_box(mask: BoolMask) -> tuple[float, float, float, float] | None:
    """(x_min, y_min, x_max, y_max) normalized, with pixel edges as bounds:
    x_min = x0 / W and x_max = (x1 + 1) / W for the first and last object
    columns x0, x1 (rows likewise). None when the mask is empty."""
    _check_mask(mask)
    height, width = mask.shape
    columns = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if columns.size == 0:
        return None
    return (
        int(columns[0]) / width,
        int(rows[0]) / height,
        (int(columns[-1]) + 1) / width,
        (int(rows[-1]) + 1) / height,
    )


def mask_area(mask: BoolMask) -> float:
    """The fraction of the image's pixels on the object, in [0, 1]."""
    _check_mask(mask)
    return int(np.count_nonzero(mask)) / mask.size


def mask_rle(mask: BoolMask) -> CocoRle:
    """COCO uncompressed RLE of the mask (see ``CocoRle``)."""
    _check_mask(mask)
    height, width = mask.shape
    column_major = mask.flatten(order="F")
    # Positions where the value flips, plus both ends, give the run lengths;
    # a leading False sentinel makes the first run background.
    flips = np.flatnonzero(np.diff(column_major, prepend=False, append=not column_major[-1]))
    counts = np.diff(flips, prepend=0)
    return {"size": [height, width], "counts": [int(c) for c in counts]}


def polygons_svg_path(rings: Sequence[Ring], width: int, height: int) -> str:
    """An SVG path (the ``d`` attribute) of the rings, in pixels of a
    ``viewBox="0 0 width height"``, where pixel (x, y) covers the unit square
    [x, x + 1] x [y, y + 1]; vertices sit at pixel centres (x + 0.5, y + 0.5).
    One closed subpath per ring; draw it with ``fill-rule="evenodd"`` so holes
    (and parts inside holes) come out right whatever the ring directions."""
    subpaths: list[str] = []
    for ring in rings:
        if not ring.vertices:
            continue
        points = [
            f"{_svg_number(x * width + 0.5)} {_svg_number(y * height + 0.5)}"
            for x, y in ring.vertices
        ]
        subpaths.append("M" + " L".join(points) + " Z")
    return " ".join(subpaths)


def _ring_pixels(ring: Ring, height: int, width: int) -> npt.NDArray[np.int32]:
    """(N, 1, 2) int32 pixel coordinates of the ring, as OpenCV's drawing wants."""
    normalized = np.asarray(ring.vertices, dtype=np.float64).reshape(-1, 2)
    # Round, because x / W * W is not always x again in floating point.
    pixels = np.rint(normalized * np.array([width, height], dtype=np.float64))
    return pixels.astype(np.int32).reshape(-1, 1, 2)


def _svg_number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _check_mask(mask: BoolMask) -> None:
    if mask.ndim != 2 or mask.dtype != np.bool_ or 0 in mask.shape:
        raise ValueError(
            f"mask must be a non-empty (H, W) bool array, got {mask.dtype} {mask.shape}"
        )
