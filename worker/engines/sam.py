"""Segment Anything through ``segment_anything.SamPredictor``.

The model is built from segment_anything's own registry and its weights are
loaded here, with ``weights_only=True`` (a checkpoint is data, never code).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import Sam

from worker.engines.base import Candidate, Prompt


class CheckpointError(RuntimeError):
    """The checkpoint cannot be used for the architecture asked for."""


def _registry_builder(architecture: str) -> Callable[[], Sam]:
    def build() -> Sam:
        model: Sam = sam_model_registry[architecture](checkpoint=None)
        return model

    return build


#: Architecture name -> a builder of that model with random weights.
SAM_ARCHITECTURES: dict[str, Callable[[], Sam]] = {
    name: _registry_builder(name) for name in ("vit_b", "vit_l", "vit_h")
}


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; others pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_sam(architecture: str, checkpoint: Path, device: str) -> Sam:
    """Build ``architecture`` and load ``checkpoint`` (a state dict) into it."""
    if architecture not in SAM_ARCHITECTURES:
        raise CheckpointError(
            f"unknown SAM architecture {architecture!r}; known: {sorted(SAM_ARCHITECTURES)}"
        )
    try:
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"SAM checkpoint {checkpoint} does not exist") from None
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{checkpoint} is not a readable checkpoint: {exc}") from exc
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{checkpoint} does not hold a state dict")
    model = SAM_ARCHITECTURES[architecture]()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint} does not fit SAM {architecture}: {str(exc)[:300]}"
        ) from exc
    return model.to(resolve_device(device)).eval()


class SamEngine:
    """One SamPredictor around one loaded model. A predictor keeps the last
    image's embedding, so an engine serves one task at a time (one per
    worker process, which is how Celery's pool runs it)."""

    def __init__(self, sam: Sam, name: str) -> None:
        self.name = name
        self._predictor = SamPredictor(sam)

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        """image: (H, W, 3) uint8 RGB; prompt in its pixel frame."""
        has_points = prompt.points.shape[0] > 0
        # The SAM authors' advice: a single point is ambiguous, so ask for
        # three masks and keep the best even when one is wanted.
        ask_three = multimask or (prompt.points.shape[0] == 1 and prompt.box is None)
        with torch.inference_mode():
            self._predictor.set_image(image, image_format="RGB")
            masks, scores, _logits = self._predictor.predict(
                point_coords=prompt.points.astype(np.float32) if has_points else None,
                point_labels=prompt.labels.astype(np.int32) if has_points else None,
                box=prompt.box.astype(np.float32) if prompt.box is not None else None,
                multimask_output=ask_three,
            )
        # masks: (C, H, W) bool; scores: (C,) predicted IoU.
        order = np.argsort(-scores, kind="stable")
        candidates = [
            Candidate(mask=np.ascontiguousarray(masks[i], dtype=np.bool_), score=float(scores[i]))
            for i in order
        ]
        return candidates if multimask else candidates[:1]
