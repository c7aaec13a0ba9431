"""Segment Anything through ``segment_anything.SamPredictor``.

The model is built from segment_anything's own registry and its weights are
loaded here, with ``weights_only=True`` (a checkpoint is data, never code).
The engine is the SAM family's one body (sam_body.py) with SAM's adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import Sam

from segq.engine_catalogue import ENGINES, EngineEntry, EngineFamily
from segq.worker.engines.base import EngineSetup, EverythingOptions, Prompt
from segq.worker.engines.embedding_cache import Embedding
from segq.worker.engines.encoder_options import EncoderOptions
from segq.worker.engines.prompt_batching import generator_arguments, present
from segq.worker.engines.sam_body import Decoded, SamEngineBody, required_weights
from segq.worker.engines.sam_encoder import EncodedImage, SamImageEncoder
from segq.worker.engines.torch_support import (
    BatchLimit,
    CheckpointError,
    read_checkpoint,
    resolve_device,
)


def _registry_builder(architecture: str) -> Callable[[], Sam]:
    def build() -> Sam:
        model: Sam = sam_model_registry[architecture](checkpoint=None)
        return model

    return build


#: Architecture name -> a builder of that model with random weights (the
#: catalogue's SAM entries; tests add tiny ones).
SAM_ARCHITECTURES: dict[str, Callable[[], Sam]] = {
    entry.architecture: _registry_builder(entry.architecture)
    for entry in ENGINES
    if entry.family is EngineFamily.SAM
}


def load_sam(architecture: str, checkpoint: Path, device: str) -> Sam:
    """Build ``architecture`` (a key of ``SAM_ARCHITECTURES``), load ``checkpoint``
    (a state dict saved by ``torch.save``, e.g. Meta's ``sam_vit_b_01ec64.pth``)
    into it, move it to ``device`` (see ``resolve_device``) and set eval mode.

    Raises CheckpointError, naming the file and the architecture, when the
    architecture is unknown or the file is missing, unreadable, not a state
    dict, or has tensors that do not fit the architecture (``strict=True``).
    """
    if architecture not in SAM_ARCHITECTURES:
        raise CheckpointError(
            f"unknown SAM architecture {architecture!r}; known: {sorted(SAM_ARCHITECTURES)}"
        )
    state_dict = read_checkpoint(checkpoint, f"SAM {architecture}")
    if not isinstance(state_dict, dict):
        raise CheckpointError(
            f"{checkpoint} does not hold a state dict (for SAM {architecture}) "
            f"but a {type(state_dict).__name__}"
        )
    model = SAM_ARCHITECTURES[architecture]()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint} does not fit SAM {architecture}: {str(exc)[:300]}"
        ) from exc
    return model.to(resolve_device(device)).eval()


class _Sam:
    """SAM's side of the engine body: SamPredictor holds the embedding, a
    SamImageEncoder makes it (precision, batch, attention kernel,
    compilation: ``encoder_options``)."""

    def __init__(self, sam: Sam, options: EncoderOptions) -> None:
        self.predictor = SamPredictor(sam)
        self._encoder = SamImageEncoder(sam, options)
        self.limit: BatchLimit = self._encoder.limit
        self.input_size = self._encoder.input_size
        self.encode = self._encoder.encode

    def mask_generator(self, options: EverythingOptions) -> SamAutomaticMaskGenerator:
        return SamAutomaticMaskGenerator(self.predictor.model, **generator_arguments(options))

    def decode(self, prompts: Sequence[Prompt], three: bool) -> Decoded:
        """The prompts transformed exactly as ``SamPredictor.predict`` does, stacked."""
        predictor = self.predictor
        device = predictor.device
        original_size = predictor.original_size
        first = prompts[0]
        coords = labels = boxes = mask_input = None
        if first.points.shape[0] > 0:
            points = np.stack([p.points.astype(np.float32) for p in prompts])  # (B, N, 2)
            coords = torch.as_tensor(
                predictor.transform.apply_coords(points, original_size),
                dtype=torch.float,
                device=device,
            )
            labels = torch.as_tensor(
                np.stack([p.labels.astype(np.int32) for p in prompts]),
                dtype=torch.int,
                device=device,
            )
        if first.box is not None:
            box_array = np.stack([present(p.box).astype(np.float32) for p in prompts])  # (B, 4)
            boxes = torch.as_tensor(
                predictor.transform.apply_boxes(box_array, original_size),
                dtype=torch.float,
                device=device,
            )
        if first.mask_input is not None:
            mask_input = torch.as_tensor(
                np.stack([present(p.mask_input) for p in prompts]),  # (B, 1, 256, 256)
                dtype=torch.float,
                device=device,
            )
        masks, scores, low_res = predictor.predict_torch(
            coords, labels, boxes, mask_input, multimask_output=three
        )
        return (
            masks.detach().cpu().numpy(),
            scores.detach().cpu().numpy(),
            low_res.detach().cpu().numpy(),
        )

    def from_embedding(self, embedding: Embedding) -> EncodedImage:
        return EncodedImage(
            features=torch.from_numpy(embedding.features).to(self.predictor.device),
            original_size=embedding.original_size,
            input_size=embedding.input_size,
        )

    def hold(self, encoded: EncodedImage) -> None:
        """What ``SamPredictor.set_image`` leaves behind, without running the encoder."""
        predictor = self.predictor
        predictor.reset_image()
        predictor.original_size = encoded.original_size
        predictor.input_size = encoded.input_size
        predictor.features = encoded.features
        predictor.is_image_set = True

    def to_embedding(self, encoded: EncodedImage) -> Embedding:
        return Embedding(
            features=encoded.features.detach().float().cpu().numpy(),
            original_size=encoded.original_size,
            input_size=encoded.input_size,
        )


class SamEngine(SamEngineBody[Sam, EncodedImage]):
    """The SAM family's engine body around one loaded SAM model (see
    ``SamEngineBody``); images are encoded by a SamImageEncoder
    (``encoder_options``: precision, batch size, attention kernel,
    compilation)."""

    def _family_of(self, model: Sam, options: EncoderOptions) -> _Sam:
        return _Sam(model, options)


def build_engine(entry: EngineEntry, weights: Path | None, setup: EngineSetup) -> SamEngine:
    """The family's loader (segq.worker.engines.load_engine calls it)."""
    checkpoint = required_weights(entry, weights)
    return SamEngine.built(
        load_sam(entry.architecture, checkpoint, setup.device), entry, checkpoint, setup
    )
