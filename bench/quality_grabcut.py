"""How well the classical engine segments real objects, given their true box.

Every non-crowd object of at least 32x32 pixels' area in the COCO panoptic
sample is prompted with its ground-truth box; the mean IoU of GrabCut's mask
with the true mask is compared with that of the filled box (the baseline any
engine must beat).

    python bench/quality_grabcut.py [--dataset DIR] [--workers 2] [--limit N]
                                    [--upscale F] [--max-side N]

``--upscale F`` enlarges each photograph and its masks F times (bilinear,
nearest) to stand in for the large photographs the sample lacks;
``--max-side N`` sets the engine's working bound (0: none, the engine works
on the image at full size).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Run as a script, only bench/ is on the path; the engine lives in the repo.
    sys.path.insert(0, str(REPO_ROOT))

from segq.worker.engines.base import Prompt  # noqa: E402
from segq.worker.engines.grabcut import DEFAULT_MAX_SIDE, GrabCutEngine  # noqa: E402

DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "datasets" / "coco-val2017-panoptic100"
MIN_OBJECT_AREA = 32 * 32


@dataclass(frozen=True)
class ObjectTask:
    """One object to segment: paths are absolute, box is x, y, w, h in pixels."""

    image_path: Path
    mask_path: Path
    box_xywh: tuple[float, float, float, float]


@dataclass(frozen=True)
class ObjectScore:
    grabcut_iou: float
    filled_box_iou: float


def iou(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    """Intersection over union of two (H, W) bool masks; 1 when both are empty."""
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def objects_to_segment(dataset: Path, limit: int | None) -> list[list[ObjectTask]]:
    """The manifest's non-crowd objects with area >= 32*32, grouped by image
    (so a worker decodes each photograph once); at most ``limit`` objects."""
    manifest: dict[str, Any] = json.loads((dataset / "manifest.json").read_text())
    groups: list[list[ObjectTask]] = []
    taken = 0
    for entry in manifest["entries"]:
        group: list[ObjectTask] = []
        for obj in entry["objects"]:
            if obj["iscrowd"] or obj["area"] < MIN_OBJECT_AREA:
                continue
            if limit is not None and taken >= limit:
                break
            x, y, w, h = (float(v) for v in obj["bbox_xywh"])
            group.append(ObjectTask(dataset / entry["image"], dataset / obj["mask"], (x, y, w, h)))
            taken += 1
        if group:
            groups.append(group)
    return groups


def score_image(tasks: list[ObjectTask], upscale: float, max_side: int) -> list[ObjectScore]:
    """Segments every object of one image (they share its ``image_path``)."""
    engine = GrabCutEngine(max_side=max_side) if max_side else GrabCutEngine(max_side=2**31)
    image = np.asarray(Image.open(tasks[0].image_path).convert("RGB"), dtype=np.uint8)
    size = (round(image.shape[1] * upscale), round(image.shape[0] * upscale))
    if upscale != 1:
        image = np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_LINEAR))
    scores: list[ObjectScore] = []
    for task in tasks:
        truth = np.asarray(Image.open(task.mask_path).convert("L")) > 127
        if upscale != 1:
            truth = cv2.resize(truth.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        x, y, w, h = (v * upscale for v in task.box_xywh)
        prompt = Prompt(
            points=np.zeros((0, 2), dtype=np.float64),
            labels=np.zeros((0,), dtype=np.int64),
            box=np.array([x, y, x + w, y + h], dtype=np.float64),
        )
        (candidate,) = engine.segment(image, prompt, multimask=False)
        filled_box = np.zeros_like(truth)
        filled_box[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
        scores.append(ObjectScore(iou(candidate.mask, truth), iou(filled_box, truth)))
    return scores


def single_threaded_opencv() -> None:
    # One process per core already; OpenCV's own threads would only contend.
    cv2.setNumThreads(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--limit", type=int, default=None, help="segment only the first N objects")
    parser.add_argument("--upscale", type=float, default=1.0, help="enlarge images F times")
    parser.add_argument(
        "--max-side", type=int, default=DEFAULT_MAX_SIDE, help="engine's bound (0: none)"
    )
    args = parser.parse_args(argv)
    dataset: Path = args.dataset
    if not (dataset / "manifest.json").is_file():
        parser.error(f"no manifest.json in {dataset}")

    groups = objects_to_segment(dataset, args.limit)
    started = time.perf_counter()
    with Pool(processes=args.workers, initializer=single_threaded_opencv) as pool:
        score = functools.partial(score_image, upscale=args.upscale, max_side=args.max_side)
        per_image = pool.map(score, groups, chunksize=1)
    seconds = time.perf_counter() - started

    scores = [score for image_scores in per_image for score in image_scores]
    if not scores:
        print("no objects matched")
        return 1
    grabcut = np.array([s.grabcut_iou for s in scores])
    filled_box = np.array([s.filled_box_iou for s in scores])
    print(f"dataset          {dataset}")
    print(f"objects          {len(scores)} (non-crowd, area >= {MIN_OBJECT_AREA} px)")
    print(f"images           {len(groups)} (upscaled {args.upscale}x)")
    print(f"engine max_side  {args.max_side or 'none'}")
    print(f"mean IoU grabcut {grabcut.mean():.4f} (median {np.median(grabcut):.4f})")
    print(f"mean IoU box     {filled_box.mean():.4f} (median {np.median(filled_box):.4f})")
    print(f"ratio            {grabcut.mean() / filled_box.mean():.3f}")
    print(f"grabcut beats box on {np.mean(grabcut > filled_box):.1%} of objects")
    print(f"seconds          {seconds:.1f} ({args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
