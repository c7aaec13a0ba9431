"""The classical engine: OpenCV GrabCut seeded by the prompt's box and points.

It needs no model weights and no torch, so segq can segment out of the box;
SAM is far better on real photographs (see ``bench/quality_grabcut.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

from segq.engine_catalogue import GRABCUT
from segq.worker.engines.base import Candidate, EngineSetup, Prompt, check_image

if TYPE_CHECKING:
    from segq.engine_catalogue import EngineEntry

BoolMask = npt.NDArray[np.bool_]

# The score given to the filled box: a filled box is a poor but never absurd
# answer (on COCO objects it overlaps the true mask at IoU ~0.55), so it ranks
# below any GrabCut result that fits the prompt reasonably well.
FILLED_BOX_SCORE = 0.3

# GrabCut models each side with a 5-component colour GMM, whose k-means needs
# at least that many samples.
_MIN_SAMPLES_PER_SIDE = 5
# An object under 5% of the pixels it could have taken has collapsed.
_COLLAPSED_FRACTION = 0.05
# Padding of a box guessed around points, as fractions of the image's short
# side, tried in turn while GrabCut's object outgrows the box.
_POINT_BOX_PADDINGS = (0.15, 0.3, 0.6)
# Rounds stop once fewer than 0.1% of the crop's pixels change label.
_CONVERGED_FRACTION = 0.001
# The longest side of the image the engine works on: larger images are
# shrunk to it and their masks scaled back, so a call's cost is bounded
# whatever the image's size (see ``GrabCutEngine``).
DEFAULT_MAX_SIDE = 1024


@dataclass(frozen=True)
class PixelBox:
    """A box of whole pixels in the image frame: columns left..right-1, rows top..bottom-1."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def fill(self, mask: BoolMask) -> None:
        mask[self.top : self.bottom, self.left : self.right] = True


class GrabCutEngine:
    """GrabCut on a crop around the prompt, with seeds from the prompt:

    - inside the box: probably object (GC_PR_FGD); outside: background (GC_BGD);
    - around each foreground point a small disk of certain object (GC_FGD), around
      each background point a disk of certain background (GC_BGD); where the two
      overlap, the foreground point wins;
    - without a box, a box guessed around the foreground points (all points if
      none is foreground): padded by 15% of the image's short side, then 30%,
      then 60% while GrabCut's object runs into the guess's sides or vanishes.

    ``iterations``: at most this many GrabCut rounds (colour models refit,
    graph cut redone); fewer when the labels stop changing. ``working_side``:
    GrabCut runs on the crop resized so that the box's longer side has this
    many pixels. Its smoothness weight is fixed per pixel pair while the colour
    evidence grows with area, so at their own size small objects (under ~100
    px) mostly vanish into the background; and large ones cost time (the graph
    cut is superlinear in pixels) without gaining accuracy. ``max_side``: an
    image whose longer side is longer is shrunk (area-averaged) to that side
    before anything else, the prompt with it, and each mask is scaled back
    to the image's size (bilinear coverage, kept where at least half
    covered): every step but that last resize then works on at most
    ``max_side`` squared pixels, so a huge image costs little more than a
    large one. ``seed`` seeds OpenCV's RNG (GrabCut's k-means) before every
    call, so equal inputs give equal masks.
    """

    def __init__(
        self,
        iterations: int = 5,
        working_side: int = 320,
        seed: int = 0,
        max_side: int = DEFAULT_MAX_SIDE,
    ) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        if working_side < 16:
            raise ValueError(f"working_side must be at least 16, got {working_side}")
        if max_side < working_side:
            raise ValueError(f"max_side must be at least working_side, got {max_side}")
        self.name = GRABCUT
        self.iterations = iterations
        self.working_side = working_side
        self.seed = seed
        self.max_side = max_side

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        """image: (H, W, 3) uint8 (channel order does not matter to GrabCut's
        colour model). Returns the best candidate alone when ``multimask`` is
        false; otherwise up to three distinct candidates, best first:

        - ``grabcut``: GrabCut's object pixels;
        - ``cleaned``: only the connected parts (8-connected) holding a
          foreground point, or the largest part when there is none;
        - ``filled box``: the box (or, without one, the box guessed around the points).

        Score of a GrabCut candidate, in [0, 1]: ``agreement * coherence * fit``.
        ``agreement`` is the fraction of prompt points on the right side of the
        mask (1 without points); ``coherence`` the fraction of the mask in the
        parts ``cleaned`` keeps; ``fit`` measures how well the mask fits a
        user's box: the mean of the fraction of the box's four sides the mask
        reaches (within 3% of the box's size) and min(1, box fill / 0.3), since
        a tight box touches its object on every side and objects rarely fill
        less than a third of their box. Without a user box ``fit`` is 0.8, a
        flat mark-down for not knowing the extent. The filled box scores
        ``FILLED_BOX_SCORE``. When GrabCut cannot run (a box of a few pixels,
        no background left to learn from) or finds nothing (e.g. a uniform
        image), the only candidate is the box or the point disks, scored
        ``FILLED_BOX_SCORE``.
        """
        check_image(image)
        height, width = image.shape[:2]
        points = np.asarray(prompt.points, dtype=np.float64).reshape(-1, 2)
        labels = np.asarray(prompt.labels, dtype=np.int64).reshape(-1)
        if points.shape[0] != labels.shape[0]:
            raise ValueError(f"{points.shape[0]} points but {labels.shape[0]} labels")
        if points.shape[0] == 0 and prompt.box is None:
            raise ValueError("a prompt needs at least one point or a box")
        if not np.isfinite(points).all() or (
            prompt.box is not None and not np.isfinite(prompt.box).all()
        ):
            raise ValueError("prompt coordinates must be finite")
        longest = max(height, width)
        if longest <= self.max_side:
            return self._segment(image, points, labels, prompt.box, multimask)
        scale = self.max_side / longest
        working_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        x_scale, y_scale = working_size[0] / width, working_size[1] / height
        working_image = np.asarray(
            cv2.resize(image, working_size, interpolation=cv2.INTER_AREA), dtype=np.uint8
        )
        working_box = (
            None
            if prompt.box is None
            else np.asarray(prompt.box, dtype=np.float64) * [x_scale, y_scale, x_scale, y_scale]
        )
        candidates = self._segment(
            working_image, points * [x_scale, y_scale], labels, working_box, multimask
        )
        return [
            Candidate(mask=_scaled_mask(candidate.mask, width, height), score=candidate.score)
            for candidate in candidates
        ]

    def _segment(
        self,
        image: npt.NDArray[np.uint8],
        points: npt.NDArray[np.float64],
        labels: npt.NDArray[np.int64],
        prompt_box: npt.NDArray[np.float64] | None,
        multimask: bool,
    ) -> list[Candidate]:
        """``segment`` on a checked (H, W, 3) image no larger than ``max_side``."""
        height, width = image.shape[:2]
        foreground = labels == 1
        user_box = None if prompt_box is None else _box_from_pixels(prompt_box, height, width)
        if user_box is not None:
            box = user_box
            grabcut_mask = self._grabcut(image, box, points, foreground, self.working_side)
        else:
            box, grabcut_mask = self._grabcut_around_points(image, points, foreground)
        if grabcut_mask is None:
            fallback = np.zeros((height, width), dtype=np.bool_)
            if user_box is not None or not foreground.any():
                box.fill(fallback)
            _draw_point_disks(fallback, points, foreground, _disk_radius(box))
            return [Candidate(mask=fallback, score=FILLED_BOX_SCORE)]

        cleaned = _parts_holding_points(grabcut_mask, points[foreground])
        filled_box = np.zeros((height, width), dtype=np.bool_)
        box.fill(filled_box)
        coherence = float(np.count_nonzero(cleaned)) / float(np.count_nonzero(grabcut_mask))
        candidates = [
            Candidate(
                mask=grabcut_mask,
                score=_score(grabcut_mask, user_box, points, foreground) * coherence,
            ),
            Candidate(mask=cleaned, score=_score(cleaned, user_box, points, foreground)),
            Candidate(mask=filled_box, score=FILLED_BOX_SCORE),
        ]
        candidates.sort(key=lambda candidate: candidate.score, reverse=True)
        distinct: list[Candidate] = []
        for candidate in candidates:
            if not any(np.array_equal(candidate.mask, kept.mask) for kept in distinct):
                distinct.append(candidate)
        return distinct if multimask else distinct[:1]

    def _grabcut_around_points(
        self,
        image: npt.NDArray[np.uint8],
        points: npt.NDArray[np.float64],
        foreground: npt.NDArray[np.bool_],
    ) -> tuple[PixelBox, BoolMask | None]:
        """GrabCut in a box guessed around the points (the foreground ones, or
        all when none is), and the box. The guess starts small and grows while
        GrabCut's object fills it (reaches two or more of its sides inside the
        image: the object goes on past them) or vanishes (the box held nothing
        but object, so the background model learnt the object's colours)."""
        height, width = image.shape[:2]
        anchors = points[foreground] if foreground.any() else points
        for padding in _POINT_BOX_PADDINGS:
            box = _box_around_points(anchors, height, width, padding)
            # The guessed box is worked at a lower resolution: clicks are
            # ambiguous anyway, and so a click costs about what a box does.
            grabcut_mask = self._grabcut(image, box, points, foreground, 0.6 * self.working_side)
            covers_image = box == PixelBox(0, 0, width, height)
            if covers_image or (
                grabcut_mask is not None and _inner_sides_reached(grabcut_mask, box) < 2
            ):
                break
        return box, grabcut_mask

    def _grabcut(
        self,
        image: npt.NDArray[np.uint8],
        box: PixelBox,
        points: npt.NDArray[np.float64],
        foreground: npt.NDArray[np.bool_],
        working_side: float,
    ) -> BoolMask | None:
        """GrabCut's (H, W) object mask, or None when it cannot run or finds nothing.
        The crop is resized so that the box's longer side is ``working_side`` pixels."""
        height, width = image.shape[:2]
        disk_radius = _disk_radius(box)
        crop = _crop_around(box, points[foreground], disk_radius, height, width)
        seeds = np.full((height, width), cv2.GC_BGD, dtype=np.uint8)
        seeds[box.top : box.bottom, box.left : box.right] = cv2.GC_PR_FGD
        _draw_disks(seeds, points[~foreground], disk_radius, cv2.GC_BGD)
        _draw_disks(seeds, points[foreground], disk_radius, cv2.GC_FGD)
        crop_seeds = np.ascontiguousarray(seeds[crop.top : crop.bottom, crop.left : crop.right])
        crop_image = np.ascontiguousarray(image[crop.top : crop.bottom, crop.left : crop.right])

        if _count_background(crop_seeds) < _MIN_SAMPLES_PER_SIDE:
            # The box covers the whole crop (it spans the image): let the crop's
            # outer frame stand in as probable background.
            frame = max(1, round(0.02 * max(crop.width, crop.height)))
            border = np.ones(crop_seeds.shape, dtype=np.bool_)
            border[frame:-frame, frame:-frame] = False
            crop_seeds[border & (crop_seeds != cv2.GC_FGD)] = cv2.GC_PR_BGD

        # The crop may outgrow the box (foreground points outside it): cap it
        # too, so the working image stays bounded.
        scale = min(
            working_side / max(box.width, box.height),
            2 * working_side / max(crop.width, crop.height),
        )
        working_size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
        if working_size != (crop.width, crop.height):
            crop_image = np.asarray(
                cv2.resize(
                    crop_image,
                    working_size,
                    interpolation=cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR,
                ),
                dtype=np.uint8,
            )
            crop_seeds = np.asarray(
                cv2.resize(crop_seeds, working_size, interpolation=cv2.INTER_NEAREST),
                dtype=np.uint8,
            )

        background_count = _count_background(crop_seeds)
        if min(background_count, crop_seeds.size - background_count) < _MIN_SAMPLES_PER_SIDE:
            return None
        crop_object = self._iterate(crop_image, crop_seeds)
        if crop_object is None:
            return None
        if working_size != (crop.width, crop.height):
            coverage = cv2.resize(
                crop_object.astype(np.float32),
                (crop.width, crop.height),
                interpolation=cv2.INTER_LINEAR if scale < 1.0 else cv2.INTER_AREA,
            )
            crop_object = np.asarray(coverage, dtype=np.float32) >= 0.5
        result = np.zeros((height, width), dtype=np.bool_)
        result[crop.top : crop.bottom, crop.left : crop.right] = crop_object
        # Certain seeds are certain at full resolution too, whatever the
        # resizing round trip made of them.
        result[seeds == cv2.GC_FGD] = True
        result[seeds == cv2.GC_BGD] = False
        if not result.any():
            return None
        return result

    def _iterate(
        self, image: npt.NDArray[np.uint8], seeds: npt.NDArray[np.uint8]
    ) -> BoolMask | None:
        """Runs GrabCut on a (h, w, 3) uint8 image with (h, w) uint8 GC_* seeds
        (updated in place); returns the (h, w) object pixels, or None when the
        colour models cannot be fit or the object vanishes at the first round."""
        # On flat colour (a blank canvas, a decoder's grey fill) every
        # pixel's evidence ties, and OpenCV's max-flow then runs for minutes
        # on a few hundred thousand pixels; noise of one level breaks the
        # ties and is far below a photograph's own noise.
        image = _dithered(image, self.seed)
        background_model = np.zeros((1, 65), dtype=np.float64)
        foreground_model = np.zeros((1, 65), dtype=np.float64)
        cv2.setRNGSeed(self.seed)
        possible_count = int(np.count_nonzero(_object_labels(seeds)))
        previous: BoolMask | None = None
        for round_index in range(self.iterations):
            try:
                cv2.grabCut(
                    image,
                    seeds,
                    (0, 0, 0, 0),  # the rectangle only matters to GC_INIT_WITH_RECT
                    background_model,
                    foreground_model,
                    1,
                    cv2.GC_INIT_WITH_MASK if round_index == 0 else cv2.GC_EVAL,
                )
            except cv2.error:
                # Degenerate colour statistics (a single colour, say) can make
                # the GMM fit fail.
                return previous
            current = _object_labels(seeds)
            kept = int(np.count_nonzero(current))
            if kept < _COLLAPSED_FRACTION * possible_count:
                # Rounds feed on their own labels: once the object shrinks to
                # almost nothing, later rounds only finish the collapse; the
                # last reasonable labelling is the better answer.
                return previous
            if previous is not None:
                changed = int(np.count_nonzero(current != previous))
                if changed <= _CONVERGED_FRACTION * current.size:
                    return current
            previous = current
        return previous


def _dithered(image: npt.NDArray[np.uint8], seed: int) -> npt.NDArray[np.uint8]:
    """The (h, w, 3) image with seeded noise of -1, 0 or +1 added to each value."""
    noise = np.random.default_rng(seed).integers(-1, 2, size=image.shape, dtype=np.int16)
    return np.asarray(np.clip(image.astype(np.int16) + noise, 0, 255), dtype=np.uint8)


def _scaled_mask(mask: BoolMask, width: int, height: int) -> BoolMask:
    """An (h, w) mask scaled to (height, width): bilinear coverage, kept where >= 1/2."""
    coverage = cv2.resize(
        mask.astype(np.uint8) * np.uint8(255), (width, height), interpolation=cv2.INTER_LINEAR
    )
    return np.asarray(coverage, dtype=np.uint8) >= 128


def _box_from_pixels(box: npt.NDArray[np.float64], height: int, width: int) -> PixelBox:
    """The whole pixels a (4,) x_min, y_min, x_max, y_max box touches, clipped to
    the image and at least one pixel wide and tall."""
    x_min, y_min, x_max, y_max = (float(v) for v in np.asarray(box, dtype=np.float64))
    x_min, x_max = sorted((x_min, x_max))
    y_min, y_max = sorted((y_min, y_max))
    left = min(max(math.floor(x_min), 0), width - 1)
    top = min(max(math.floor(y_min), 0), height - 1)
    right = max(min(math.ceil(x_max), width), left + 1)
    bottom = max(min(math.ceil(y_max), height), top + 1)
    return PixelBox(left, top, right, bottom)


def _box_around_points(
    points: npt.NDArray[np.float64], height: int, width: int, padding: float
) -> PixelBox:
    """A box around (N, 2) pixel xy points, padded by half their spread plus
    ``padding`` times the image's short side, clipped to the image."""
    spread = float(np.ptp(points, axis=0).max())
    pad = 0.5 * spread + padding * min(height, width)
    x_min, y_min = points.min(axis=0) - pad
    x_max, y_max = points.max(axis=0) + pad
    return _box_from_pixels(np.array([x_min, y_min, x_max, y_max]), height, width)


def _disk_radius(box: PixelBox) -> int:
    """Seed disks scale with the box (2% of its longer side), within 2..10 px."""
    return int(np.clip(round(0.02 * max(box.width, box.height)), 2, 10))


def _inner_sides_reached(mask: BoolMask, box: PixelBox) -> int:
    """How many of the box's sides that lie inside the image (not on its
    border) the (H, W) mask touches."""
    height, width = mask.shape
    inside = mask[box.top : box.bottom, box.left : box.right]
    return (
        int(box.left > 0 and bool(inside[:, 0].any()))
        + int(box.right < width and bool(inside[:, -1].any()))
        + int(box.top > 0 and bool(inside[0, :].any()))
        + int(box.bottom < height and bool(inside[-1, :].any()))
    )


def _crop_around(
    box: PixelBox,
    foreground_points: npt.NDArray[np.float64],
    disk_radius: int,
    height: int,
    width: int,
) -> PixelBox:
    """The box grown by a margin of background (a quarter of its longer side,
    at least 16 px) and by any foreground disk outside it, clipped to the image."""
    margin = max(16, round(0.25 * max(box.width, box.height)))
    left, top = box.left - margin, box.top - margin
    right, bottom = box.right + margin, box.bottom + margin
    if foreground_points.shape[0]:
        left = min(left, math.floor(foreground_points[:, 0].min()) - disk_radius)
        top = min(top, math.floor(foreground_points[:, 1].min()) - disk_radius)
        right = max(right, math.ceil(foreground_points[:, 0].max()) + disk_radius + 1)
        bottom = max(bottom, math.ceil(foreground_points[:, 1].max()) + disk_radius + 1)
    return PixelBox(max(left, 0), max(top, 0), min(right, width), min(bottom, height))


def _draw_disks(
    canvas: npt.NDArray[np.uint8], points: npt.NDArray[np.float64], radius: int, value: int
) -> None:
    for x, y in points:
        cv2.circle(canvas, (round(float(x)), round(float(y))), radius, value, thickness=-1)


def _draw_point_disks(
    mask: BoolMask, points: npt.NDArray[np.float64], foreground: npt.NDArray[np.bool_], radius: int
) -> None:
    """Background disks cleared, then foreground disks set, on an (H, W) bool mask."""
    canvas = mask.astype(np.uint8)
    _draw_disks(canvas, points[~foreground], radius, 0)
    _draw_disks(canvas, points[foreground], radius, 1)
    mask[...] = canvas.astype(np.bool_)


def _object_labels(seeds: npt.NDArray[np.uint8]) -> BoolMask:
    """Where (h, w) GC_* labels say object, certain or probable."""
    return np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD))


def _count_background(seeds: npt.NDArray[np.uint8]) -> int:
    return int(np.count_nonzero((seeds == cv2.GC_BGD) | (seeds == cv2.GC_PR_BGD)))


def _parts_holding_points(mask: BoolMask, foreground_points: npt.NDArray[np.float64]) -> BoolMask:
    """The 8-connected parts of a non-empty (H, W) mask that hold a foreground
    point, or its largest part when none does."""
    count, part_of_pixel, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    height, width = mask.shape
    kept = {
        int(part_of_pixel[min(round(float(y)), height - 1), min(round(float(x)), width - 1)])
        for x, y in np.clip(foreground_points, 0, None)
    } - {0}
    if not kept:
        kept = {1 + int(np.argmax(stats[1:count, cv2.CC_STAT_AREA]))}
    return np.isin(part_of_pixel, sorted(kept))


def _score(
    mask: BoolMask,
    user_box: PixelBox | None,
    points: npt.NDArray[np.float64],
    foreground: npt.NDArray[np.bool_],
) -> float:
    """``agreement * fit`` as ``GrabCutEngine.segment`` documents it, in [0, 1]."""
    height, width = mask.shape
    if points.shape[0]:
        columns = np.clip(np.rint(points[:, 0]).astype(np.int64), 0, width - 1)
        rows = np.clip(np.rint(points[:, 1]).astype(np.int64), 0, height - 1)
        agreement = float(np.mean(mask[rows, columns] == foreground))
    else:
        agreement = 1.0
    if user_box is None:
        return 0.8 * agreement
    inside = mask[user_box.top : user_box.bottom, user_box.left : user_box.right]
    if not inside.any():
        return 0.0
    columns_hit = np.flatnonzero(inside.any(axis=0))
    rows_hit = np.flatnonzero(inside.any(axis=1))
    x_slack = max(1, round(0.03 * user_box.width))
    y_slack = max(1, round(0.03 * user_box.height))
    sides_reached = (
        int(columns_hit[0] < x_slack)
        + int(columns_hit[-1] >= user_box.width - x_slack)
        + int(rows_hit[0] < y_slack)
        + int(rows_hit[-1] >= user_box.height - y_slack)
    )
    fill = float(np.count_nonzero(inside)) / float(inside.size)
    fit = 0.5 * sides_reached / 4 + 0.5 * min(1.0, fill / 0.3)
    return agreement * fit


def build_engine(entry: EngineEntry, weights: Path | None, setup: EngineSetup) -> GrabCutEngine:
    """The family's loader (segq.worker.engines.load_engine calls it): no
    model, no weights, the CPU whatever the device."""
    return GrabCutEngine()
