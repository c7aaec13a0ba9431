"""Segment Anything through ``segment_anything.SamPredictor``.

The model is built from segment_anything's own registry and its weights are
loaded here, with ``weights_only=True`` (a checkpoint is data, never code).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import Sam

from segq.worker.engines.base import Candidate, EverythingOptions, Prompt, check_image
from segq.worker.engines.embedding_cache import (
    Embedding,
    EmbeddingCache,
)
from segq.worker.engines.encoder_options import EncoderOptions
from segq.worker.engines.held_embeddings import EncodedImages, HeldEmbeddings
from segq.worker.engines.prompt_batching import (
    decode_groups,
    generated_candidates,
    generator_arguments,
    group_by_shape,
    present,
)
from segq.worker.engines.sam_encoder import EncodedImage, SamImageEncoder


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


def read_checkpoint(checkpoint: Path, model: str) -> object:
    """What ``checkpoint`` holds, loaded on the CPU with ``weights_only=True``
    (a checkpoint is data, never code); CheckpointError, naming the file and
    ``model`` (what it was to be loaded into), when it is missing or unreadable."""
    try:
        loaded: object = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{model} checkpoint {checkpoint} does not exist") from None
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(
            f"{checkpoint} is not a readable checkpoint (for {model}): {exc}"
        ) from exc
    return loaded


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


class SamEngine:
    """One SamPredictor around one loaded model. A predictor holds one image's
    embedding (the expensive part: seconds on a CPU), so it is kept while the
    same image comes back with another prompt, and a lock makes callers on
    other threads take turns (Celery's prefork pool runs one task per process;
    a threaded pool would not).

    With ``embeddings`` (and ``model_id``, naming the model and its checkpoint
    there), an image another item or worker encoded is restored from that
    cache instead of encoded again.

    Images are encoded by a SamImageEncoder (``encoder_options``: precision,
    batch size, attention kernel, compilation); ``encode_images`` encodes
    the images of several items as one batch ahead of their ``segment``
    calls, which then find their embeddings ready."""

    def __init__(
        self,
        sam: Sam,
        name: str,
        *,
        embeddings: EmbeddingCache | None = None,
        model_id: str | None = None,
        encoder_options: EncoderOptions | None = None,
    ) -> None:
        self.name = name
        self._predictor = SamPredictor(sam)
        self._encoder = SamImageEncoder(sam, encoder_options or EncoderOptions())
        images = EncodedImages(
            input_size=self._encoder.input_size,
            encode=self._encoder.encode,
            hold=self._hold,
            to_embedding=_as_embedding,
            from_embedding=self._on_device,
        )
        self._held = HeldEmbeddings(images, embeddings, model_id)
        self._lock = threading.Lock()

    @property
    def batch_size(self) -> int:
        """The most images encoded at once (lowered by an out-of-memory error)."""
        return self._encoder.limit.size

    def encode_images(self, images: Sequence[npt.NDArray[np.uint8]]) -> None:
        """Get the embeddings of ``images`` ((H, W, 3) uint8 RGB each) ready
        for their segment calls: found in the embedding cache, or encoded
        together in batches of at most ``batch_size``. What an earlier
        call readied and no segment call took is dropped."""
        with self._lock:
            self._held.ready_batch(images)

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        """image: (H, W, 3) uint8 RGB; prompt in its pixel frame (SamPredictor
        rescales points and box with the image). Candidates are (H, W) bool
        masks sorted by SAM's predicted IoU, best first: one, or three when
        ``multimask`` is true."""
        return self.segment_batch(image, [prompt], multimask)[0]

    def segment_batch(
        self, image: npt.NDArray[np.uint8], prompts: Sequence[Prompt], multimask: bool
    ) -> list[list[Candidate]]:
        """``segment``'s answer for each prompt, in prompt order, from one
        embedding of ``image`` and batched calls of the mask decoder.

        Prompts are batched with prompts of the same shape only (see
        ``prompt_batching.group_by_shape``)."""
        check_image(image)
        groups = group_by_shape(prompts, multimask)
        height, width = image.shape[:2]
        with self._lock, torch.inference_mode():
            self._held.hold_for(image)
            return decode_groups(prompts, groups, multimask, height, width, self._decode)

    def segment_everything(
        self, image: npt.NDArray[np.uint8], options: EverythingOptions
    ) -> list[Candidate]:
        """segment-anything's SamAutomaticMaskGenerator on ``image`` (one
        crop: the whole image), on the embedding this engine holds or makes
        for it. Candidates sorted by predicted IoU, best first, at most
        ``options.max_segments``; no logits (the generator keeps none)."""
        check_image(image)
        generator = SamAutomaticMaskGenerator(self._predictor.model, **generator_arguments(options))
        generator.predictor = _HeldEmbedding(self)
        with self._lock, torch.inference_mode():
            found = generator.generate(image)
        return generated_candidates(found, options.max_segments)

    def _decode(
        self, prompts: Sequence[Prompt], ask_three: bool
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """One mask-decoder call for prompts of one shape, on the embedding
        held. Returns masks (B, C, H, W) bool, scores (B, C) and low-res
        logits (B, C, 256, 256) float32, C being 3 or 1. The prompts are
        transformed exactly as ``SamPredictor.predict`` does, stacked."""
        predictor = self._predictor
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
            coords, labels, boxes, mask_input, multimask_output=ask_three
        )
        return (
            masks.detach().cpu().numpy(),
            scores.detach().cpu().numpy(),
            low_res.detach().cpu().numpy(),
        )

    def _on_device(self, embedding: Embedding) -> EncodedImage:
        return EncodedImage(
            features=torch.from_numpy(embedding.features).to(self._predictor.device),
            original_size=embedding.original_size,
            input_size=embedding.input_size,
        )

    def _hold(self, encoded: EncodedImage) -> None:
        """What ``SamPredictor.set_image`` leaves behind, without running the encoder."""
        predictor = self._predictor
        predictor.reset_image()
        predictor.original_size = encoded.original_size
        predictor.input_size = encoded.input_size
        predictor.features = encoded.features
        predictor.is_image_set = True


def _as_embedding(encoded: EncodedImage) -> Embedding:
    return Embedding(
        features=encoded.features.detach().float().cpu().numpy(),
        original_size=encoded.original_size,
        input_size=encoded.input_size,
    )


class _HeldEmbedding:
    """The engine's predictor as SamAutomaticMaskGenerator uses it, except
    that setting an image goes through the engine (which keeps the
    embedding it already holds) and resetting keeps the embedding for the
    next job on the same image."""

    def __init__(self, engine: SamEngine) -> None:
        self._engine = engine

    def set_image(self, image: npt.NDArray[np.uint8], image_format: str = "RGB") -> None:
        if image_format != "RGB":
            raise ValueError("segq's images are RGB")
        self._engine._held.hold_for(np.ascontiguousarray(image))

    def reset_image(self) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine._predictor, name)
