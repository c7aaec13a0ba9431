"""A tiny SAM 3 snapshot with random weights, in facebook/sam3's layout
(a ``sam3_video`` config holding the detector's and the tracker's, one
safetensors file with ``detector_model.*``, ``tracker_model.*`` and
``tracker_neck.*`` tensors, a CLIP tokenizer and the processor's config),
written by the test: built in under a second on a CPU, no hub involved.
The sizes follow transformers' own SAM 3 tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPTokenizer,
    Sam3Config,
    Sam3ImageProcessor,
    Sam3Processor,
    Sam3VideoConfig,
    Sam3VideoModel,
)
from transformers.models.sam3.configuration_sam3 import (
    Sam3DETRDecoderConfig,
    Sam3DETREncoderConfig,
    Sam3GeometryEncoderConfig,
    Sam3MaskDecoderConfig,
    Sam3VisionConfig,
    Sam3ViTConfig,
)

#: Words the tiny tokenizer knows whole; others fall apart into letters.
WORDS = ("cat", "dog", "person", "car", "red", "the", "tree", "visual")
IMAGE_SIZE = 224
PATCH_SIZE = 14
HIDDEN = 32


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the letters of WORDS and the
    words themselves, each merged letter by letter."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in sorted(set("".join(WORDS))):
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        joined = word[0]
        for position, letter in enumerate(word[1:], 1):
            piece = letter + ("</w>" if position == len(word) - 1 else "")
            if (joined, piece) not in merges:
                merges.append((joined, piece))
            joined += piece
            vocab.setdefault(joined, len(vocab))
    # The tokenizers library takes merges as pairs; transformers annotates strings.
    return CLIPTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]


def tiny_sam3_config() -> Sam3VideoConfig:
    backbone = Sam3ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        window_size=8,
        global_attn_indexes=[0, 1],
    )
    grid = IMAGE_SIZE // PATCH_SIZE
    vision = Sam3VisionConfig(
        backbone_config=backbone,
        fpn_hidden_size=HIDDEN,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        backbone_feature_sizes=[[grid * 4] * 2, [grid * 2] * 2, [grid] * 2],
    )
    detector = Sam3Config(
        vision_config=vision,
        text_config={
            "vocab_size": 100,
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "projection_dim": HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "hidden_act": "gelu",
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        geometry_encoder_config=Sam3GeometryEncoderConfig(
            hidden_size=HIDDEN, num_layers=1, num_attention_heads=4, intermediate_size=64
        ),
        detr_encoder_config=Sam3DETREncoderConfig(
            hidden_size=HIDDEN, num_layers=1, num_attention_heads=4, intermediate_size=64
        ),
        detr_decoder_config=Sam3DETRDecoderConfig(
            hidden_size=HIDDEN,
            num_layers=1,
            num_queries=12,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        mask_decoder_config=Sam3MaskDecoderConfig(
            hidden_size=HIDDEN, num_upsampling_stages=2, num_attention_heads=4
        ),
    )
    tracker = {
        "image_size": IMAGE_SIZE,
        "vision_config": vision.to_dict(),
        "prompt_encoder_config": {
            "hidden_size": HIDDEN,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "mask_input_channels": 4,
        },
        "mask_decoder_config": {
            "hidden_size": HIDDEN,
            "num_attention_heads": 4,
            "mlp_dim": 64,
            "iou_head_hidden_dim": HIDDEN,
        },
    }
    return Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker)


def save_tiny_sam3(directory: Path, seed: int = 0) -> Path:
    """Write the snapshot into ``directory`` (created) and return it.

    The tensors are the state dict of a ``Sam3VideoModel`` as facebook/sam3
    stores it (``save_pretrained`` would write the tracker's tensors under a
    doubled ``tracker_model.`` prefix)."""
    torch.manual_seed(seed)
    config = tiny_sam3_config()
    model = Sam3VideoModel(config)
    # Random weights put every score near 0.25; a wider spread of the
    # classifier's logits gives instances on both sides of a threshold.
    with torch.no_grad():
        for parameter in model.detector_model.dot_product_scoring.parameters():
            parameter.mul_(8.0)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    processor = Sam3Processor(
        image_processor=Sam3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tiny_tokenizer(),
    )
    processor.save_pretrained(directory)
    return directory


def config_json(directory: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((directory / "config.json").read_text())
    return loaded
