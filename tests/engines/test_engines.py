"""The classical engine on synthetic scenes with a known object, and the parts
of the SAM path that test_sam_engine.py leaves out (device names, a checkpoint
of another size, the kept embedding), and what importing engines costs."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import torch

from segq.engine_catalogue import ENGINE_NAMES
from segq.worker.engines import EngineChoice, EngineConfigError, resolve_engine
from segq.worker.engines.base import Candidate, Prompt
from segq.worker.engines.grabcut import FILLED_BOX_SCORE, GrabCutEngine
from segq.worker.engines.sam import SamEngine, load_sam
from segq.worker.engines.torch_support import CheckpointError, DeviceError, resolve_device
from segq.worker.weights import official_checkpoint_path
from tests.support.tiny_sam import register_tiny_architecture, save_tiny_sam_checkpoint

BoolMask = npt.NDArray[np.bool_]
RgbImage = npt.NDArray[np.uint8]


def textured(
    rng: np.random.Generator, height: int, width: int, colour: tuple[int, int, int], grain: float
) -> npt.NDArray[np.float64]:
    """(height, width, 3) float64 colour with blotchy noise (blurred, so
    neighbouring pixels correlate as in a photograph) plus fine noise."""
    blotches = np.asarray(
        cv2.GaussianBlur(rng.normal(0, 1, (height, width, 3)), (0, 0), grain), dtype=np.float64
    )
    blotches *= 25 / max(float(blotches.std()), 1e-6)
    return np.array(colour, dtype=np.float64) + blotches + rng.normal(0, 8, (height, width, 3))


def ellipse_scene(
    height: int, width: int, centre: tuple[float, float], radii: tuple[float, float], seed: int
) -> tuple[RgbImage, BoolMask]:
    """A textured orange ellipse on a textured green-grey background.
    Returns (image (H, W, 3) uint8 RGB, truth (H, W) bool); centre and radii
    are x, y in pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    truth = ((xx - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 <= 1
    background = textured(rng, height, width, (95, 125, 100), grain=4.0)
    foreground = textured(rng, height, width, (215, 120, 50), grain=2.0)
    pixels = np.where(truth[..., None], foreground, background)
    return np.clip(pixels, 0, 255).astype(np.uint8), truth


def prompt(
    points: Sequence[tuple[float, float]] = (),
    labels: Sequence[int] = (),
    box: tuple[float, float, float, float] | None = None,
) -> Prompt:
    return Prompt(
        points=np.array(points, dtype=np.float64).reshape(-1, 2),
        labels=np.array(labels, dtype=np.int64),
        box=None if box is None else np.array(box, dtype=np.float64),
    )


def iou(a: BoolMask, b: BoolMask) -> float:
    return float(np.count_nonzero(a & b)) / float(np.count_nonzero(a | b))


def filled(height: int, width: int, box: tuple[float, float, float, float]) -> BoolMask:
    mask = np.zeros((height, width), dtype=np.bool_)
    x_min, y_min, x_max, y_max = (round(v) for v in box)
    mask[y_min:y_max, x_min:x_max] = True
    return mask


def assert_well_formed(candidates: list[Candidate], height: int, width: int) -> None:
    assert 1 <= len(candidates) <= 3
    for candidate in candidates:
        assert candidate.mask.shape == (height, width)
        assert candidate.mask.dtype == np.bool_
        assert 0.0 <= candidate.score <= 1.0
    scores = [candidate.score for candidate in candidates]
    assert scores == sorted(scores, reverse=True)


# -- GrabCut -------------------------------------------------------------------


def test_grabcut_box_prompt_finds_the_ellipse_far_better_than_the_box() -> None:
    image, truth = ellipse_scene(150, 200, centre=(95, 80), radii=(55, 40), seed=1)
    box = (32.0, 33.0, 158.0, 127.0)  # the ellipse's box, loosened by ~8 px

    [candidate] = GrabCutEngine().segment(image, prompt(box=box), multimask=False)

    box_iou = iou(filled(150, 200, box), truth)
    assert iou(candidate.mask, truth) >= 0.85
    assert iou(candidate.mask, truth) >= box_iou + 0.15
    assert candidate.score > FILLED_BOX_SCORE


def test_grabcut_finds_a_small_object_in_a_large_image() -> None:
    # 30 x 24 px: at its own size GrabCut's smoothing would erase it.
    image, truth = ellipse_scene(400, 600, centre=(420, 130), radii=(15, 12), seed=2)

    [candidate] = GrabCutEngine().segment(
        image, prompt(box=(402.0, 115.0, 438.0, 145.0)), multimask=False
    )

    assert iou(candidate.mask, truth) >= 0.8
    assert not candidate.mask[:, :380].any()  # nothing far outside the box


def test_grabcut_points_only_prompt() -> None:
    image, truth = ellipse_scene(150, 200, centre=(95, 80), radii=(55, 40), seed=3)
    # Foreground clicks spread over the object, one background click.
    points = prompt([(60.0, 80.0), (130.0, 80.0), (95.0, 55.0), (10.0, 10.0)], [1, 1, 1, 0])

    [candidate] = GrabCutEngine().segment(image, points, multimask=False)

    assert iou(candidate.mask, truth) >= 0.85
    assert candidate.mask[80, 60]
    assert not candidate.mask[10, 10]


def test_grabcut_single_click_gives_part_of_the_object() -> None:
    # One click says nothing of the object's extent: the box guessed around it
    # may cut the object, but what is found must be object.
    image, truth = ellipse_scene(150, 200, centre=(95, 80), radii=(40, 30), seed=4)

    [candidate] = GrabCutEngine().segment(image, prompt([(95.0, 80.0)], [1]), multimask=False)

    assert candidate.mask[80, 95]
    found = np.count_nonzero(candidate.mask)
    assert np.count_nonzero(candidate.mask & truth) >= 0.9 * found
    assert found >= 0.3 * np.count_nonzero(truth)


def test_grabcut_multimask_gives_distinct_ranked_candidates() -> None:
    image, truth = ellipse_scene(150, 200, centre=(95, 80), radii=(55, 40), seed=5)
    # A second blob of the object's colour inside the box makes GrabCut's raw
    # mask and its cleaned (connected to the point) version differ.
    cv2.circle(image, (150, 40), 5, (215, 120, 50), thickness=-1)
    request = prompt([(95.0, 80.0)], [1], box=(30.0, 30.0, 160.0, 130.0))

    candidates = GrabCutEngine().segment(image, request, multimask=True)
    [single] = GrabCutEngine().segment(image, request, multimask=False)

    assert_well_formed(candidates, 150, 200)
    assert len(candidates) == 3
    for index, candidate in enumerate(candidates):
        for other in candidates[index + 1 :]:
            assert not np.array_equal(candidate.mask, other.mask)
    assert np.array_equal(single.mask, candidates[0].mask)
    assert single.score == candidates[0].score
    assert iou(candidates[0].mask, truth) >= 0.85
    # The filled box is offered, and ranks last.
    assert np.array_equal(candidates[-1].mask, filled(150, 200, (30, 30, 160, 130)))


def test_grabcut_is_deterministic() -> None:
    image, _ = ellipse_scene(120, 160, centre=(80, 60), radii=(45, 35), seed=6)
    request = prompt(box=(30.0, 20.0, 130.0, 100.0))

    first = GrabCutEngine().segment(image, request, multimask=True)
    second = GrabCutEngine().segment(image, request, multimask=True)

    assert [c.score for c in first] == [c.score for c in second]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(
    ("label", "request_"),
    [
        ("one-pixel box", prompt(box=(50.0, 40.0, 51.0, 41.0))),
        ("two-pixel box", prompt(box=(50.0, 40.0, 52.0, 42.0))),
        ("zero-area box", prompt(box=(50.0, 40.0, 50.0, 40.0))),
        ("inverted box", prompt(box=(120.0, 90.0, 30.0, 20.0))),
        ("box over the whole image", prompt(box=(0.0, 0.0, 160.0, 120.0))),
        ("box past every border", prompt(box=(-50.0, -50.0, 500.0, 500.0))),
        ("box touching a corner", prompt(box=(100.0, 70.0, 160.0, 120.0))),
        ("box outside the image", prompt(box=(300.0, 300.0, 400.0, 400.0))),
        ("point outside the image", prompt([(500.0, -20.0)], [1])),
        ("point on the border", prompt([(159.0, 119.0)], [1])),
        ("background points only", prompt([(10.0, 10.0), (150.0, 110.0)], [0, 0])),
        ("box and conflicting points", prompt([(80, 60), (80, 60)], [1, 0], (30, 20, 130, 100))),
    ],
)
def test_grabcut_survives_degenerate_prompts(label: str, request_: Prompt) -> None:
    image, _ = ellipse_scene(120, 160, centre=(80, 60), radii=(45, 35), seed=7)

    for multimask in (False, True):
        candidates = GrabCutEngine().segment(image, request_, multimask=multimask)
        assert_well_formed(candidates, 120, 160)
        if not multimask:
            assert len(candidates) == 1, label


def test_grabcut_falls_back_to_the_box_on_a_uniform_image() -> None:
    image = np.full((90, 120, 3), 128, dtype=np.uint8)
    box = (20.0, 15.0, 70.0, 60.0)

    candidates = GrabCutEngine().segment(image, prompt(box=box), multimask=True)

    assert_well_formed(candidates, 90, 120)
    assert candidates[0].mask.any()
    assert candidates[0].mask.sum() <= filled(90, 120, box).sum()
    assert not candidates[0].mask[:, 75:].any()


def test_grabcut_falls_back_to_point_disks_on_a_uniform_image() -> None:
    image = np.zeros((90, 120, 3), dtype=np.uint8)

    [candidate] = GrabCutEngine().segment(image, prompt([(60.0, 45.0)], [1]), multimask=False)

    assert candidate.mask[45, 60]
    assert candidate.mask.sum() < 0.25 * candidate.mask.size


def test_grabcut_refuses_malformed_input() -> None:
    image, _ = ellipse_scene(40, 50, centre=(25, 20), radii=(10, 8), seed=8)
    engine = GrabCutEngine()
    with pytest.raises(ValueError, match="point or a box"):
        engine.segment(image, prompt(), multimask=False)
    with pytest.raises(ValueError, match="uint8"):
        engine.segment(image.astype(np.float32), prompt(box=(1, 1, 9, 9)), False)
    with pytest.raises(ValueError, match="labels"):
        engine.segment(image, prompt([(1.0, 1.0)], [1, 0]), multimask=False)
    with pytest.raises(ValueError, match="finite"):
        engine.segment(image, prompt(box=(1, 1, float("nan"), 9)), multimask=False)
    with pytest.raises(ValueError, match="iterations"):
        GrabCutEngine(iterations=0)


# -- SAM: what test_sam_engine.py does not cover ---------------------------------


@pytest.mark.model
def test_a_checkpoint_of_another_size_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_tiny_architecture(monkeypatch)
    tiny = save_tiny_sam_checkpoint(tmp_path / "tiny.pth")

    with pytest.raises(CheckpointError) as refused:
        load_sam("vit_b", tiny, "cpu")

    message = str(refused.value)
    assert "vit_b" in message
    assert str(tiny) in message


@pytest.mark.model
def test_a_missing_checkpoint_names_file_and_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    architecture = register_tiny_architecture(monkeypatch)
    with pytest.raises(CheckpointError, match=f"{architecture}.*nowhere.pth"):
        load_sam(architecture, tmp_path / "nowhere.pth", "cpu")
    (tmp_path / "list.pth").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_sam(architecture, tmp_path / "list.pth", "cpu")


def test_devices_are_resolved_and_checked() -> None:
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    too_many = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError, match="cuda"):
        resolve_device(too_many)
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("graphics-card")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.model
def test_sam_embeds_an_image_once_for_several_prompts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    architecture = register_tiny_architecture(monkeypatch)
    sam = load_sam(architecture, save_tiny_sam_checkpoint(tmp_path / "tiny.pth"), "cpu")
    engine = SamEngine(sam, "sam_tiny_test")
    embedded: list[tuple[int, ...]] = []
    # The encoder's input: one (1, 3, S, S) batch per image encoded.
    sam.image_encoder.register_forward_hook(
        lambda _module, args, _out: embedded.append(tuple(args[0].shape))
    )
    first, _ = ellipse_scene(90, 130, centre=(60, 45), radii=(30, 20), seed=9)
    second = first.copy()
    second[0, 0] = 255 - second[0, 0]
    box_prompt = prompt(box=(20.0, 20.0, 100.0, 70.0))

    on_first = engine.segment(first, box_prompt, multimask=True)
    engine.segment(first, prompt([(60.0, 45.0)], [1]), multimask=False)
    engine.segment(second, box_prompt, multimask=False)
    again = engine.segment(first, box_prompt, multimask=True)

    assert embedded == [(1, 3, 64, 64)] * 3  # first, second, first again
    assert [c.score for c in again] == [c.score for c in on_first]
    fresh = SamEngine(sam, "sam_tiny_test").segment(first, box_prompt, multimask=True)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(fresh, on_first, strict=True))


@pytest.mark.model
def test_sam_refuses_malformed_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    architecture = register_tiny_architecture(monkeypatch)
    engine = SamEngine(
        load_sam(architecture, save_tiny_sam_checkpoint(tmp_path / "tiny.pth"), "cpu"), "t"
    )
    grey = np.zeros((30, 40), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        engine.segment(grey, prompt(box=(1, 1, 9, 9)), multimask=False)
    with pytest.raises(ValueError, match="point or a box"):
        engine.segment(np.zeros((30, 40, 3), dtype=np.uint8), prompt(), multimask=False)


# -- choosing and importing engines ---------------------------------------------


def test_unknown_models_are_refused_with_the_list_of_engines(tmp_path: Path) -> None:
    with pytest.raises(EngineConfigError) as refused:
        resolve_engine("sam_vit_x", None, tmp_path)
    for name in ENGINE_NAMES:
        assert name in str(refused.value)


def test_every_engine_name_fits_where_jobs_record_it() -> None:
    from sqlalchemy import String

    from segq.models import Job, JobItem

    for column in (Job.__table__.c.engine, JobItem.__table__.c.engine):
        assert isinstance(column.type, String) and column.type.length is not None
        assert all(len(name) <= column.type.length for name in ENGINE_NAMES), column


def test_a_downloaded_official_checkpoint_serves_its_own_model(tmp_path: Path) -> None:
    official_checkpoint_path("vit_l", tmp_path).write_bytes(b"x")

    assert resolve_engine("sam_vit_l", None, tmp_path) == EngineChoice(
        "sam_vit_l", tmp_path / "sam_vit_l_0b3195.pth"
    )
    # Without a model named, only ViT-B is picked up by itself.
    assert resolve_engine(None, None, tmp_path) == EngineChoice("grabcut", None)
    with pytest.raises(EngineConfigError, match="SEGQ_MODEL_CHECKPOINT"):
        resolve_engine("sam_vit_b", None, tmp_path)


def test_choosing_and_running_grabcut_never_imports_torch() -> None:
    # The API and a weights-free worker must not pay for torch (seconds, GBs).
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "import segq.worker.masks\n"
        "from segq.worker.engines import load_engine, resolve_engine\n"
        "from segq.worker.engines.base import Prompt\n"
        "engine = load_engine(resolve_engine(None, None, Path('/nonexistent')), 'auto')\n"
        "image = np.zeros((20, 20, 3), dtype=np.uint8)\n"
        "box = np.array([2.0, 2.0, 10.0, 10.0])\n"
        "engine.segment(image, Prompt(np.zeros((0, 2)), np.zeros(0, np.int64), box), False)\n"
        "print(engine.name, 'torch' in sys.modules)\n"
    )
    repo_root = Path(__file__).resolve().parents[2]

    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=repo_root,
        env={"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert result.stdout.split() == ["grabcut", "False"]


def _segment_flat_image(height: int, width: int, speckles: int) -> None:
    """GrabCut, boxed, on one flat colour with a few black pixels: the
    content that stalls OpenCV's max-flow (a decoder's grey fill looks so)."""
    image = np.full((height, width, 3), (120, 80, 60), dtype=np.uint8)
    rng = np.random.default_rng(0)
    image[rng.integers(0, height, speckles), rng.integers(0, width, speckles)] = 0
    box = (0.1 * width, 0.1 * height, 0.9 * width, 0.9 * height)
    GrabCutEngine().segment(image, prompt(box=box), multimask=True)


def _seconds_in_child(target: Callable[[], None], limit: float) -> float | None:
    """Seconds ``target`` took in a child process, or None when it ran past
    ``limit`` (then the child is killed: OpenCV's C loop cannot be interrupted)."""
    context = multiprocessing.get_context("fork")
    started = time.perf_counter()
    child = context.Process(target=target)
    child.start()
    child.join(limit)
    if child.is_alive():
        child.kill()
        child.join()
        return None
    assert child.exitcode == 0
    return time.perf_counter() - started


@pytest.mark.parametrize(
    ("height", "width", "speckles"),
    [(1100, 1000, 0), (1000, 1200, 20), (2000, 2000, 20)],
    ids=["flat", "speckled", "speckled-at-the-test-pixel-limit"],
)
def test_grabcut_serves_flat_images_at_the_pixel_limit_in_bounded_time(
    height: int, width: int, speckles: int
) -> None:
    # The bound is relative to a small image measured here and now, so a
    # busy machine slows both: 40 small runs' time, and never under 10 s.
    small = _seconds_in_child(lambda: _segment_flat_image(240, 320, 20), 60)
    assert small is not None
    bound = max(10.0, 40 * small)
    took = _seconds_in_child(lambda: _segment_flat_image(height, width, speckles), bound)
    assert took is not None, f"still running after {bound:.1f} s (small image: {small:.2f} s)"
