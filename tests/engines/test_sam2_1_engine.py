"""SAM 2.1 through segq equals sam2 itself, as tests/engines/test_sam2_engine.py
shows for SAM 2: the tiny SAM 2.1 configuration the ``sam2`` package ships
(``configs/sam2.1/sam2.1_hiera_t.yaml``) with random weights, chosen by its
SEGQ_MODEL name and loaded by segq's loader, against sam2's own
``build_sam2`` and ``SAM2ImagePredictor`` on the same image and prompts, on
the CPU. One prompt through segq is sam2's own computation: masks equal
pixel for pixel, scores within 1e-6. Few prompts: each SAM 2.1 encoding
costs seconds here, and the prompt handling is SAM 2's, tested there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from sam2.sam2_image_predictor import SAM2ImagePredictor

from segq.worker.engines import load_engine, resolve_engine
from segq.worker.engines.sam2 import Sam2Engine, load_sam2
from segq.worker.engines.torch_support import CheckpointError
from tests.support.images import scene
from tests.support.tiny_sam import Box, PointList, as_prompt
from tests.support.tiny_sam2 import (
    TINY_SAM2,
    TINY_SAM2_1,
    TINY_SAM2_1_CONFIG,
    load_with_sam2,
    predictor_for,
    sam2_directly,
    save_random_sam2_checkpoint,
)

#: Each test builds a SAM-family model (make test-fast skips them).
pytestmark = pytest.mark.model

WIDTH, HEIGHT = 130, 90

PROMPTS: list[tuple[PointList, Box, bool]] = [
    ([(97.0, 20.0, 1), (10.0, 80.0, 0)], None, False),
    ([(40.0, 60.0, 1)], (12.0, 30.0, 70.0, 88.0), True),
]


@pytest.fixture(scope="module")
def image() -> npt.NDArray[np.uint8]:
    return scene(WIDTH, HEIGHT)[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_sam2_checkpoint(
        tmp_path_factory.mktemp("sam2.1") / "sam2.1_tiny.pt", seed=5, config=TINY_SAM2_1_CONFIG
    )


@pytest.fixture(scope="module")
def engine(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Sam2Engine:
    """Chosen and built as a worker does with SEGQ_MODEL=sam2.1_hiera_tiny."""
    choice = resolve_engine(TINY_SAM2_1, str(checkpoint), tmp_path_factory.mktemp("weights"))
    built = load_engine(choice, "cpu")
    assert isinstance(built, Sam2Engine) and built.name == TINY_SAM2_1
    return built


@pytest.fixture(scope="module")
def reference(checkpoint: Path, image: npt.NDArray[np.uint8]) -> SAM2ImagePredictor:
    return predictor_for(load_with_sam2(checkpoint, TINY_SAM2_1_CONFIG), image)


def test_segq_loads_the_sam2_1_weights_sam2_loads(
    engine: Sam2Engine, reference: SAM2ImagePredictor
) -> None:
    mine = engine._predictor.model.state_dict()
    theirs = reference.model.state_dict()
    assert mine.keys() == theirs.keys()
    # SAM 2.1's own tensors are there: the 2.1 config was used, not SAM 2's.
    assert {"no_obj_embed_spatial", "obj_ptr_tpos_proj.weight"} <= mine.keys()
    for name, tensor in mine.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize(
    ("points", "box", "multimask"), PROMPTS, ids=["points", "multimask box+point"]
)
def test_the_sam2_1_engine_answers_as_sam2_does(
    engine: Sam2Engine,
    reference: SAM2ImagePredictor,
    image: npt.NDArray[np.uint8],
    points: PointList,
    box: Box,
    multimask: bool,
) -> None:
    candidates = engine.segment(image, as_prompt(points, box), multimask)
    expected = sam2_directly(reference, points, box, multimask)
    assert len(candidates) == len(expected) == (3 if multimask else 1)
    for candidate, (mask, score, logits) in zip(candidates, expected, strict=True):
        assert candidate.mask.shape == (HEIGHT, WIDTH)
        assert np.array_equal(candidate.mask, mask)
        assert candidate.score == pytest.approx(score, abs=1e-6)
        assert candidate.logits is not None
        np.testing.assert_allclose(candidate.logits, logits, atol=1e-5)


def test_each_release_refuses_the_others_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    """The slip the issue met (a 2.1 file given to SAM 2's name) is named,
    with the name that fits among those offered."""
    with pytest.raises(CheckpointError, match="does not fit sam2_hiera_tiny") as refused:
        load_sam2(TINY_SAM2, checkpoint, "cpu")
    assert TINY_SAM2_1 in str(refused.value)
    sam2 = save_random_sam2_checkpoint(tmp_path / "sam2_tiny.pt")
    with pytest.raises(CheckpointError, match=r"does not fit sam2\.1_hiera_tiny"):
        load_sam2(TINY_SAM2_1, sam2, "cpu")
