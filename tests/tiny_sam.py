"""A tiny Segment Anything, built from segment_anything's own classes with
random weights: the real model code at a size a 2-core CI runs in seconds."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from worker.engines import sam as sam_engine

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
