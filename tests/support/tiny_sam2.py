"""SAM 2 for tests: the real tiny configuration (Hiera-T, 39M parameters,
1024x1024 input) with the random weights its modules start with, saved as
Meta's files are (``{"model": state dict}``), and sam2's own predictor as
the reference segq's engine is compared with.

SAM 2 resizes every image to 1024x1024, so a test image's size does not
make the encoder cheaper: one encoding costs seconds on a 2-core CPU, and
the tests share what they can (module-scoped models and embeddings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor

from tests.support.tiny_sam import Box, PointList, predicted_directly

TINY_SAM2 = "sam2_hiera_tiny"
TINY_SAM2_CONFIG = "configs/sam2/sam2_hiera_t.yaml"
#: SAM 2.1's tiny model, from the config of its own release in the package.
TINY_SAM2_1 = "sam2.1_hiera_tiny"
TINY_SAM2_1_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def save_random_sam2_checkpoint(path: Path, seed: int = 0, config: str = TINY_SAM2_CONFIG) -> Path:
    """sam2's tiny model (of the release ``config`` is for) as ``build_sam2``
    makes it without a checkpoint (random weights, drawn after
    ``torch.manual_seed(seed)``), saved the way Meta's SAM 2 and 2.1
    checkpoints are laid out."""
    torch.manual_seed(seed)
    model = build_sam2(config, ckpt_path=None, device="cpu")
    torch.save({"model": model.state_dict()}, path)
    return path


def load_with_sam2(checkpoint: Path, config: str = TINY_SAM2_CONFIG) -> SAM2Base:
    """The checkpoint loaded by sam2's own ``build_sam2``, not by segq."""
    model: SAM2Base = build_sam2(config, ckpt_path=str(checkpoint), device="cpu")
    return model


def predictor_for(model: SAM2Base, image: npt.NDArray[np.uint8]) -> SAM2ImagePredictor:
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)
    return predictor


def sam2_directly(
    predictor: SAM2ImagePredictor,
    points: PointList,
    box: Box,
    multimask: bool,
    mask_input: npt.NDArray[np.float32] | None = None,
) -> list[tuple[npt.NDArray[np.bool_], float, npt.NDArray[np.float32]]]:
    """sam2 itself, one prompt on the image ``predictor`` holds: (mask,
    score, low-res logits), best first. A lone point asks for three masks
    and keeps the best, as segq documents."""
    return [
        (mask > 0.5, score, logits)
        for mask, score, logits in predicted_directly(predictor, points, box, multimask, mask_input)
    ]
