"""Mask encoders on shapes whose answers are known by construction."""

from __future__ import annotations

import io

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from segq.worker.masks import (
    CocoRle,
    Ring,
    encode_png,
    mask_area,
    mask_bounding_box,
    mask_polygons,
    mask_rle,
    polygons_svg_path,
    rasterize_rings,
)

BoolMask = npt.NDArray[np.bool_]


def two_parts_with_holes() -> BoolMask:
    """(60, 80) bool: a square frame with an island in its hole, a disk with two
    holes, a lone pixel and a one-pixel-thin diagonal line: 5 parts, 3 holes."""
    mask = np.zeros((60, 80), dtype=np.bool_)
    mask[5:35, 5:35] = True  # square part
    mask[10:30, 10:30] = False  # its hole
    mask[17:23, 17:23] = True  # an island inside the hole
    disk = np.zeros((60, 80), dtype=np.uint8)
    cv2.circle(disk, (58, 30), 18, 1, thickness=-1)
    mask |= disk.astype(np.bool_)
    mask[25:29, 50:54] = False  # first hole in the disk
    mask[33:37, 62:66] = False  # second hole in the disk
    mask[55, 3] = True  # a lone pixel
    for step in range(6):  # a diagonal line, 8-connected
        mask[50 + step, 20 + step] = True
    return mask


def decode_rle(rle: CocoRle) -> BoolMask:
    height, width = rle["size"]
    values: list[bool] = []
    for index, count in enumerate(rle["counts"]):
        values.extend([index % 2 == 1] * count)
    assert len(values) == height * width
    return np.array(values, dtype=np.bool_).reshape((height, width), order="F")


def test_rings_count_outer_parts_and_holes() -> None:
    rings = mask_polygons(two_parts_with_holes())

    outer = [ring for ring in rings if not ring.is_hole]
    holes = [ring for ring in rings if ring.is_hole]
    # square, island, disk, lone pixel, diagonal line; square hole, two disk holes
    assert len(outer) == 5
    assert len(holes) == 3


def test_rings_rasterize_back_to_the_same_mask() -> None:
    mask = two_parts_with_holes()

    restored = rasterize_rings(mask_polygons(mask), *mask.shape)

    assert restored.dtype == np.bool_
    assert restored.shape == mask.shape
    assert np.array_equal(restored, mask)


def test_rings_rasterize_back_on_random_blobs() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        height, width = (int(n) for n in rng.integers(1, 70, size=2))
        noise = rng.random((height, width)).astype(np.float32)
        blur = float(rng.choice([0.0, 1.0, 2.0]))
        if blur:
            noise = np.asarray(cv2.GaussianBlur(noise, (0, 0), blur), dtype=np.float32)
        mask = noise > np.median(noise)

        restored = rasterize_rings(mask_polygons(mask), height, width)

        assert np.array_equal(restored, mask)


def test_ring_vertices_are_normalized_boundary_pixels() -> None:
    mask = np.zeros((40, 100), dtype=np.bool_)
    mask[10:20, 30:50] = True  # rows 10..19, columns 30..49

    (ring,) = mask_polygons(mask)

    assert not ring.is_hole
    assert set(ring.vertices) == {
        (30 / 100, 10 / 40),
        (30 / 100, 19 / 40),
        (49 / 100, 19 / 40),
        (49 / 100, 10 / 40),
    }


def test_vertices_lie_in_the_unit_square_even_on_the_image_border() -> None:
    mask = np.ones((33, 47), dtype=np.bool_)
    mask[10:20, 10:20] = False

    rings = mask_polygons(mask)

    assert [ring.is_hole for ring in rings].count(True) == 1
    for ring in rings:
        for x, y in ring.vertices:
            assert 0.0 <= x <= 1.0
            assert 0.0 <= y <= 1.0
    assert max(x for ring in rings for x, _ in ring.vertices) == pytest.approx(46 / 47)


def test_empty_mask_has_no_rings_box_or_area() -> None:
    mask = np.zeros((12, 9), dtype=np.bool_)

    assert mask_polygons(mask) == []
    assert mask_bounding_box(mask) is None
    assert mask_area(mask) == 0.0
    assert not rasterize_rings([], 12, 9).any()


def test_bounding_box_uses_pixel_edges() -> None:
    mask = np.zeros((50, 200), dtype=np.bool_)
    mask[10:20, 30:50] = True
    mask[44, 151] = True

    assert mask_bounding_box(mask) == (30 / 200, 10 / 50, 152 / 200, 45 / 50)


def test_bounding_box_of_full_mask_is_the_unit_square() -> None:
    assert mask_bounding_box(np.ones((7, 3), dtype=np.bool_)) == (0.0, 0.0, 1.0, 1.0)


def test_area_is_the_fraction_of_pixels() -> None:
    mask = np.zeros((50, 200), dtype=np.bool_)
    mask[10:20, 30:50] = True

    assert mask_area(mask) == 200 / 10_000


def test_rle_decodes_back_to_the_mask() -> None:
    mask = two_parts_with_holes()

    rle = mask_rle(mask)

    assert rle["size"] == [60, 80]
    assert sum(rle["counts"]) == 60 * 80
    assert np.array_equal(decode_rle(rle), mask)


def test_rle_is_column_major_and_starts_with_background() -> None:
    mask = np.array([[True, False, False], [True, True, False]])

    # columns: (T, T), (F, T), (F, F) -> 0 zeros, 2 ones, 1 zero, 1 one, 2 zeros
    assert mask_rle(mask) == {"size": [2, 3], "counts": [0, 2, 1, 1, 2]}
    assert mask_rle(np.zeros((2, 2), dtype=np.bool_))["counts"] == [4]
    assert mask_rle(np.ones((2, 2), dtype=np.bool_))["counts"] == [0, 4]


def test_png_is_single_channel_0_or_255_at_the_mask_size() -> None:
    mask = two_parts_with_holes()

    decoded = Image.open(io.BytesIO(encode_png(mask)))

    assert decoded.format == "PNG"
    assert decoded.mode == "L"
    assert decoded.size == (80, 60)
    pixels = np.asarray(decoded)
    assert set(np.unique(pixels).tolist()) == {0, 255}
    assert np.array_equal(pixels == 255, mask)


def test_svg_path_has_one_closed_subpath_per_ring_at_pixel_centres() -> None:
    mask = np.zeros((40, 100), dtype=np.bool_)
    mask[10:20, 30:50] = True
    mask[13:16, 35:38] = False
    rings = mask_polygons(mask)

    path = polygons_svg_path(rings, 100, 40)

    assert path.count("M") == len(rings) == 2
    assert path.count("Z") == 2
    assert "30.5 10.5" in path
    assert "49.5 19.5" in path


def test_svg_path_of_no_rings_is_empty() -> None:
    assert polygons_svg_path([], 10, 10) == ""
    assert polygons_svg_path([Ring(vertices=(), is_hole=False)], 10, 10) == ""


def test_non_bool_masks_are_refused() -> None:
    with pytest.raises(ValueError, match="bool"):
        mask_area(np.ones((3, 3), dtype=np.uint8))
