"""SAM 2 (Segment Anything 2) on still images through ``sam2``'s own
``SAM2ImagePredictor``: the SAM family's one engine body (sam_body.py)
with SAM 2's adapter.

The model is built by ``sam2.build_sam.build_sam2`` from the config the
``sam2`` package ships for each size, and its weights are loaded as sam2's
own loader does (the ``"model"`` entry of the checkpoint, strictly), here
with errors that name the file and the size. ``sam2`` is installed without
its CUDA extension, which only fills small holes and removes specks in
low-resolution masks when asked to; segq never asks (``minArea`` of "segment
everything" removes them afterwards with OpenCV, as for SAM).

The image encoder runs as ``SAM2ImagePredictor.set_image_batch`` runs it,
several images at once (``SEGQ_ENGINE_BATCH``, halved on a GPU's
out-of-memory error), in the configured precision (bf16 autocast on a GPU
by default, as sam2's own examples run it); the features are kept in
float32, so the mask decoder runs as sam2 ships it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor

from segq.engine_catalogue import ENGINES, ENGINES_BY_NAME, EngineEntry, EngineFamily
from segq.worker.engines.base import EngineSetup, EverythingOptions, Prompt
from segq.worker.engines.embedding_cache import Embedding
from segq.worker.engines.encoder_options import EncoderOptions
from segq.worker.engines.prompt_batching import generator_arguments, present
from segq.worker.engines.sam_body import Decoded, SamEngineBody, required_weights
from segq.worker.engines.torch_support import (
    BatchLimit,
    CheckpointError,
    as_numpy,
    autocast,
    default_batch_size,
    encode_in_batches,
    free_memory,
    read_checkpoint,
    resolve_device,
    resolve_precision,
)

#: The SAM 2 and SAM 2.1 engines' names (segq/engine_catalogue.py).
SAM2_NAMES = tuple(entry.name for entry in ENGINES if entry.family is EngineFamily.SAM2)


def _config(name: str) -> str:
    """The config ``sam2`` ships for the size and release ``name``; CheckpointError for another."""
    entry = ENGINES_BY_NAME.get(name)
    if entry is None or entry.family is not EngineFamily.SAM2:
        raise CheckpointError(f"unknown SAM 2 model {name!r}; known: {sorted(SAM2_NAMES)}")
    return entry.architecture


def build_sam2_model(name: str) -> SAM2Base:
    """The SAM 2 model of size ``name`` (one of SAM2_NAMES) on the CPU,
    in eval mode, with the random weights its modules start with. Built as
    ``build_sam2`` builds it, with sam2's post-processing overrides (a
    single mask falls back to the best of three when it is unstable)."""
    model: SAM2Base = build_sam2(_config(name), ckpt_path=None, device="cpu", mode="eval")
    return model


def load_sam2(name: str, checkpoint: Path, device: str) -> SAM2Base:
    """Build SAM 2 (or 2.1) of size ``name``, load ``checkpoint`` (a file
    holding ``{"model": state dict}``, e.g. Meta's ``sam2_hiera_tiny.pt`` or
    ``sam2.1_hiera_tiny.pt``) into it, move it to ``device`` (see
    ``resolve_device``) and set eval mode.

    Raises CheckpointError, naming the file and the size, when the size is
    unknown or the file is missing, unreadable, not SAM 2's layout (a SAM
    checkpoint, say), or has tensors that do not fit the size."""
    resolved = resolve_device(device)
    _config(name)
    # With weights_only, as sam2 loads it too.
    loaded = read_checkpoint(checkpoint, name)
    state_dict = loaded.get("model") if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict):
        raise CheckpointError(
            f"{checkpoint} is not a SAM 2 checkpoint (for {name}): it holds no "
            '{"model": state dict}, as Meta\'s SAM 2 files do'
        )
    model = build_sam2_model(name)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        # SAM 2 and SAM 2.1 files of one size differ by a few tensors only:
        # the likeliest slip is the other release's name.
        others = ", ".join(other for other in SAM2_NAMES if other != name)
        raise CheckpointError(
            f"{checkpoint} does not fit {name} (is it another size or release? "
            f"SEGQ_MODEL takes {others}): {str(exc)[:300]}"
        ) from exc
    moved: SAM2Base = model.to(resolved).eval()
    return moved


@dataclass(frozen=True)
class _Encoded:
    """One image's features on the model's device, float32, as
    ``SAM2ImagePredictor.set_image`` leaves them in its ``_features``."""

    image_embed: torch.Tensor  # (1, C, h, w)
    high_res_feats: tuple[torch.Tensor, ...]  # finest first
    original_size: tuple[int, int]


class _Sam2:
    """SAM 2's side of the engine body. SAM 2 resizes every image to a
    1024x1024 square (not keeping its aspect ratio, unlike SAM), so its
    embedding does not depend on the image's size beyond that; it is the
    image embedding and two finer feature maps (16 MiB in float32). The
    encoder runs as ``SAM2ImagePredictor.set_image_batch`` runs it, in the
    configured precision and batch size (SAM 2 has no ``compile`` or
    attention option here)."""

    def __init__(self, model: SAM2Base, options: EncoderOptions) -> None:
        self.predictor = SAM2ImagePredictor(model)
        self._device = str(self.predictor.device)
        self._precision = resolve_precision(options.precision, self._device)
        self.limit = BatchLimit(options.batch_size or default_batch_size(self._device))
        self._input_size = (int(model.image_size), int(model.image_size))

    def input_size(self, _image: npt.NDArray[np.uint8]) -> tuple[int, int]:
        # SAM 2 stretches every image to its square input.
        return self._input_size

    def mask_generator(self, options: EverythingOptions) -> SAM2AutomaticMaskGenerator:
        return SAM2AutomaticMaskGenerator(self.predictor.model, **generator_arguments(options))

    def decode(self, prompts: Sequence[Prompt], three: bool) -> Decoded:
        """One ``predict`` call (SAM2ImagePredictor takes a batch of prompts
        as (B, N, 2) points, (B, 4) boxes and (B, 1, 256, 256) mask inputs)."""
        first = prompts[0]
        coords = labels = boxes = mask_input = None
        if first.points.shape[0] > 0:
            coords = np.stack([p.points.astype(np.float32) for p in prompts])  # (B, N, 2)
            labels = np.stack([p.labels.astype(np.int32) for p in prompts])  # (B, N)
        if first.box is not None:
            boxes = np.stack([present(p.box).astype(np.float32) for p in prompts])  # (B, 4)
        if first.mask_input is not None:
            mask_input = np.stack([present(p.mask_input) for p in prompts])  # (B, 1, 256, 256)
        masks, scores, logits = self.predictor.predict(
            point_coords=coords,
            point_labels=labels,
            box=boxes,
            mask_input=mask_input,
            multimask_output=three,
        )
        # predict squeezes a batch of one away; put it back.
        count, candidates = len(prompts), 3 if three else 1
        return (
            masks.reshape(count, candidates, *masks.shape[-2:]) > 0.5,
            scores.reshape(count, candidates).astype(np.float32),
            logits.reshape(count, candidates, *logits.shape[-2:]).astype(np.float32),
        )

    def encode(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[_Encoded]:
        return encode_in_batches(
            self._encode_batch, images, self.limit, lambda: free_memory(self._device)
        )

    def _encode_batch(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[_Encoded]:
        """``SAM2ImagePredictor.set_image_batch``'s steps (sam2 1.1.0; for
        one image, ``set_image``'s), without touching the predictor's state:
        each image transformed alone, the encoder run on the stack."""
        predictor, model = self.predictor, self.predictor.model
        with torch.inference_mode():
            batch = predictor._transforms.forward_batch(list(images)).to(predictor.device)
            with autocast(self._precision, self._device):
                backbone_out = model.forward_image(batch)
                _, vision_feats, _, _ = model._prepare_backbone_features(backbone_out)
                if model.directly_add_no_mem_embed:
                    vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
            count = batch.shape[0]
            feats = [
                feat.permute(1, 2, 0).reshape(count, -1, *size).float()
                for feat, size in zip(
                    vision_feats[::-1], predictor._bb_feat_sizes[::-1], strict=True
                )
            ][::-1]
        return [
            _Encoded(
                image_embed=feats[-1][i : i + 1],
                high_res_feats=tuple(f[i : i + 1] for f in feats[:-1]),
                original_size=(int(image.shape[0]), int(image.shape[1])),
            )
            for i, image in enumerate(images)
        ]

    def hold(self, features: _Encoded) -> None:
        """What ``set_image`` leaves behind, without running the encoder."""
        predictor = self.predictor
        predictor.reset_predictor()
        predictor._orig_hw = [features.original_size]
        predictor._features = {
            "image_embed": features.image_embed,
            "high_res_feats": list(features.high_res_feats),
        }
        predictor._is_image_set = True

    def from_embedding(self, embedding: Embedding) -> _Encoded:
        device = self.predictor.device
        return _Encoded(
            image_embed=torch.from_numpy(embedding.features).to(device),
            high_res_feats=tuple(
                torch.from_numpy(f).to(device) for f in embedding.high_res_features
            ),
            original_size=embedding.original_size,
        )

    def to_embedding(self, features: _Encoded) -> Embedding:
        return Embedding(
            features=as_numpy(features.image_embed),
            high_res_features=tuple(as_numpy(f) for f in features.high_res_feats),
            original_size=features.original_size,
            input_size=self._input_size,
        )


class Sam2Engine(SamEngineBody[SAM2Base, _Encoded]):
    """The SAM family's engine body (see ``SamEngineBody``) around one
    loaded SAM 2 model."""

    def _family_of(self, model: SAM2Base, options: EncoderOptions) -> _Sam2:
        return _Sam2(model, options)


def build_engine(entry: EngineEntry, weights: Path | None, setup: EngineSetup) -> Sam2Engine:
    """The family's loader (segq.worker.engines.load_engine calls it)."""
    checkpoint = required_weights(entry, weights)
    return Sam2Engine.built(
        load_sam2(entry.name, checkpoint, setup.device), entry, checkpoint, setup
    )
