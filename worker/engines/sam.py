"""Segment Anything through ``segment_anything.SamPredictor``.

The model is built from segment_anything's own registry and its weights are
loaded here, with ``weights_only=True`` (a checkpoint is data, never code).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import Sam

from worker.engines.base import Candidate, Prompt
from worker.engines.embedding_cache import (
    Embedding,
    EmbeddingCache,
    EmbeddingKey,
    EmbeddingSource,
    image_digest,
)
from worker.engines.item_metrics import record_embedding


class CheckpointError(RuntimeError):
    """The checkpoint cannot be used for the architecture asked for."""


class DeviceError(ValueError):
    """A device torch cannot parse, or one this machine does not have."""


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
    """``auto`` is CUDA when torch sees a GPU, else the CPU. An explicit device
    (``cpu``, ``cuda``, ``cuda:1``, ``mps``) is kept, but checked here: a
    worker configured for a GPU it lacks should say so at start, not fail
    inside the first task or quietly run 50x slower on the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} asked for, but torch sees no CUDA GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r} asked for, but torch sees only "
                f"{torch.cuda.device_count()} CUDA GPU(s)"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r} asked for, but MPS is not available")
    elif parsed.type not in ("cpu", "mps"):
        raise DeviceError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


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
    try:
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(
            f"SAM {architecture} checkpoint {checkpoint} does not exist"
        ) from None
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(
            f"{checkpoint} is not a readable checkpoint (for SAM {architecture}): {exc}"
        ) from exc
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


class SamEngine:
    """One SamPredictor around one loaded model. A predictor holds one image's
    embedding (the expensive part: seconds on a CPU), so it is kept while the
    same image comes back with another prompt, and a lock makes callers on
    other threads take turns (Celery's prefork pool runs one task per process;
    a threaded pool would not).

    With ``embeddings`` (and ``model_id``, naming the model and its checkpoint
    there), an image another item or worker encoded is restored from that
    cache instead of encoded again."""

    def __init__(
        self,
        sam: Sam,
        name: str,
        *,
        embeddings: EmbeddingCache | None = None,
        model_id: str | None = None,
    ) -> None:
        if (embeddings is None) != (model_id is None):
            raise ValueError("an embedding cache needs the model's id, and only it")
        self.name = name
        self._predictor = SamPredictor(sam)
        self._embeddings = embeddings
        self._model_id = model_id
        self._embedded_image: str | None = None
        self._lock = threading.Lock()

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        """image: (H, W, 3) uint8 RGB; prompt in its pixel frame (SamPredictor
        rescales points and box with the image). Candidates are (H, W) bool
        masks sorted by SAM's predicted IoU, best first: one, or three when
        ``multimask`` is true."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
        if prompt.points.shape[0] == 0 and prompt.box is None:
            raise ValueError("a prompt needs at least one point or a box")
        has_points = prompt.points.shape[0] > 0
        # The SAM authors' advice: a single point is ambiguous, so ask for
        # three masks and keep the best even when one is wanted.
        ask_three = multimask or (prompt.points.shape[0] == 1 and prompt.box is None)
        with self._lock, torch.inference_mode():
            self._embed(image)
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

    def _embed(self, image: npt.NDArray[np.uint8]) -> None:
        """Make the predictor hold ``image``'s embedding: kept from the last
        image, restored from the cache, or encoded (and then cached)."""
        started = time.perf_counter()
        predictor = self._predictor
        input_size = predictor.transform.get_preprocess_shape(
            image.shape[0], image.shape[1], predictor.transform.target_length
        )
        digest = image_digest(image, input_size)
        if digest == self._embedded_image:
            source = EmbeddingSource.LOCAL
        else:
            self._embedded_image = None  # stays None if encoding fails halfway
            source = self._set_embedding(image, digest)
            self._embedded_image = digest
        record_embedding(source, (time.perf_counter() - started) * 1000)

    def _set_embedding(self, image: npt.NDArray[np.uint8], digest: str) -> EmbeddingSource:
        predictor = self._predictor
        if self._embeddings is None or self._model_id is None:
            predictor.set_image(image, image_format="RGB")
            return EmbeddingSource.COMPUTED

        def encode() -> Embedding:
            predictor.set_image(image, image_format="RGB")
            assert predictor.features is not None
            return Embedding(
                features=predictor.features.detach().float().cpu().numpy(),
                original_size=(int(predictor.original_size[0]), int(predictor.original_size[1])),
                input_size=(int(predictor.input_size[0]), int(predictor.input_size[1])),
            )

        embedding, source = self._embeddings.get_or_compute(
            EmbeddingKey(self._model_id, digest), encode
        )
        if source != EmbeddingSource.COMPUTED:
            # What set_image leaves behind, without running the encoder.
            predictor.reset_image()
            predictor.original_size = embedding.original_size
            predictor.input_size = embedding.input_size
            predictor.features = torch.from_numpy(embedding.features).to(predictor.device)
            predictor.is_image_set = True
        return source
