"""A tiny Segment Anything, built from segment_anything's own classes with
random weights: the real model code at a size a 2-core CI runs in seconds."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from segq.worker.engines import sam as sam_engine
from segq.worker.engines.base import Prompt
from segq.worker.engines.torch_support import CheckpointError

TINY_ARCHITECTURE = "tiny_test"
IMAGE_SIZE = 64  # SAM's is 1024
PATCH = 16
DIM = 32  # SAM's prompt/transformer width is 256


def build_tiny_sam() -> Sam:
    embedding = IMAGE_SIZE // PATCH
    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=IMAGE_SIZE,
            patch_size=PATCH,
            embed_dim=DIM,
            depth=2,
            num_heads=2,
            mlp_ratio=2,
            out_chans=DIM,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=2,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=DIM,
            image_embedding_size=(embedding, embedding),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=DIM, mlp_dim=64, num_heads=2),
            transformer_dim=DIM,
            iou_head_depth=2,
            iou_head_hidden_dim=16,
        ),
    )
    return model.eval()


def save_tiny_sam_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(build_tiny_sam().state_dict(), path)
    return path


def register_tiny_architecture(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make ``tiny_test`` loadable through load_sam, like vit_b/l/h."""
    monkeypatch.setitem(sam_engine.SAM_ARCHITECTURES, TINY_ARCHITECTURE, build_tiny_sam)
    return TINY_ARCHITECTURE


def load_tiny_sam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int = 5) -> Sam:
    """A tiny SAM saved with ``seed`` and loaded through segq's own loader."""
    architecture = register_tiny_architecture(monkeypatch)
    checkpoint = save_tiny_sam_checkpoint(tmp_path / f"tiny-{seed}.pth", seed=seed)
    return sam_engine.load_sam(architecture, checkpoint, "cpu")


def assert_unreadable_checkpoints_named(
    load: Callable[[Path], object], folder: Path, suffix: str
) -> None:
    """``load`` (a checkpoint's path to a loaded model) refuses a missing file
    and a file that is no checkpoint, saying which (``read_checkpoint``)."""
    with pytest.raises(CheckpointError, match="does not exist"):
        load(folder / f"missing{suffix}")
    garbage = folder / f"garbage{suffix}"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load(garbage)


#: Prompts as the SAM tests write them: (x, y, label) points and an
#: (x_min, y_min, x_max, y_max) box, in pixels.
PointList = list[tuple[float, float, int]]
Box = tuple[float, float, float, float] | None


def segment_anything_directly(
    sam: Sam,
    image: npt.NDArray[np.uint8],
    points: PointList,
    box: Box,
    multimask: bool,
    mask_input: npt.NDArray[np.float32] | None = None,
) -> list[tuple[npt.NDArray[np.bool_], float, npt.NDArray[np.float32]]]:
    """segment_anything itself, one prompt: (mask, score, low-res logits),
    best first. A lone point asks for three masks and keeps the best, as
    segq documents (SAM's authors' advice for an ambiguous prompt)."""
    predictor = SamPredictor(sam)
    predictor.set_image(image, image_format="RGB")
    return predicted_directly(predictor, points, box, multimask, mask_input)


def predicted_directly(
    predictor: Any,
    points: PointList,
    box: Box,
    multimask: bool,
    mask_input: npt.NDArray[np.float32] | None,
) -> list[tuple[npt.NDArray[Any], float, npt.NDArray[np.float32]]]:
    """One prompt through ``predictor.predict`` (segment_anything's
    SamPredictor or sam2's SAM2ImagePredictor, which take the same
    arguments) on the image it holds: (mask as predicted, score, low-res
    logits), best first. A lone point asks for three masks and keeps the
    best, as segq documents (SAM's authors' advice for an ambiguous prompt)."""
    ask_three = multimask or (len(points) == 1 and box is None and mask_input is None)
    masks, scores, logits = predictor.predict(
        point_coords=np.array([[x, y] for x, y, _ in points], dtype=np.float32) if points else None,
        point_labels=np.array([label for _, _, label in points], dtype=np.int32)
        if points
        else None,
        box=None if box is None else np.array(box, dtype=np.float32),
        mask_input=mask_input,
        multimask_output=ask_three,
    )
    order = np.argsort(-scores, kind="stable")
    answers = [(masks[i], float(scores[i]), logits[i]) for i in order]
    return answers if multimask else answers[:1]


def as_prompt(points: PointList, box: Box) -> Prompt:
    return Prompt(
        points=np.array([[x, y] for x, y, _ in points], dtype=np.float64).reshape(-1, 2),
        labels=np.array([label for _, _, label in points], dtype=np.int64),
        box=None if box is None else np.array(box, dtype=np.float64),
    )
