"""The one engine body of the SAM family (SAM, SAM 2, and whatever comes
next with a promptable mask decoder): the lock, the held embedding and
the embedding cache, batched image encoding, batched prompts and segment
everything. A family gives what differs as a ``SamFamily`` adapter: how
it encodes an image and makes its predictor hold one, how one call of its
mask decoder runs, and its automatic mask generator."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, Self, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from segq.engine_catalogue import EngineEntry
from segq.worker.engines.base import (
    Candidate,
    EngineSetup,
    EverythingOptions,
    Prompt,
    check_image,
)
from segq.worker.engines.embedding_cache import (
    Embedding,
    EmbeddingCache,
    checkpoint_digest,
    model_id,
)
from segq.worker.engines.encoder_options import EncoderOptions
from segq.worker.engines.held_embeddings import EncodedImages, HeldEmbeddings
from segq.worker.engines.prompt_batching import decode_groups, generated_candidates, group_by_shape
from segq.worker.engines.torch_support import BatchLimit, CheckpointError

#: One encoded image, as the family keeps it (on its device).
E = TypeVar("E")
#: The family's loaded model (segment_anything's Sam, sam2's SAM2Base).
M = TypeVar("M")

#: masks (B, C, H, W) bool, scores (B, C) and low-res logits (B, C, 256, 256)
#: float32, C being 3 or 1.
Decoded = tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.float32]]


class MaskGenerator(Protocol):
    """segment-anything's and sam2's automatic mask generators, as used here."""

    predictor: Any

    def generate(self, image: npt.NDArray[np.uint8]) -> list[dict[str, Any]]: ...


class SamFamily(Protocol[E]):
    """What one member of the SAM family does its own way."""

    #: The family's predictor around the loaded model (SamPredictor,
    #: SAM2ImagePredictor), which holds one image's embedding at a time.
    predictor: Any
    #: The most images encoded at once (lowered by an out-of-memory error).
    limit: BatchLimit

    def input_size(self, image: npt.NDArray[np.uint8]) -> tuple[int, int]:
        """(H, W) of ``image`` as the encoder takes it."""
        ...

    def encode(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[E]:
        """One encoded image per (H, W, 3) uint8 RGB image, in order."""
        ...

    def hold(self, encoded: E) -> None:
        """What the predictor's ``set_image`` leaves behind, without running the encoder."""
        ...

    def to_embedding(self, encoded: E) -> Embedding: ...

    def from_embedding(self, embedding: Embedding) -> E: ...

    def decode(self, prompts: Sequence[Prompt], three: bool) -> Decoded:
        """One mask-decoder call for prompts of one shape, on the embedding held."""
        ...

    def mask_generator(self, options: EverythingOptions) -> MaskGenerator:
        """The family's automatic mask generator on its model, for ``options``."""
        ...


class SamEngineBody(Generic[M, E]):
    """One predictor around one loaded model. A predictor holds one image's
    embedding (the expensive part: seconds on a CPU), so it is kept while
    the same image comes back with another prompt, and a lock makes callers
    on other threads take turns (Celery's prefork pool runs one task per
    process; a threaded pool would not).

    With ``embeddings`` (and ``model_id``, naming the model and its
    checkpoint there), an image another item or worker encoded is restored
    from that cache instead of encoded again. ``encode_images`` encodes the
    images of several items as one batch ahead of their ``segment`` calls,
    which then find their embeddings ready; ``encoder_options`` say how
    images are encoded (precision, batch size, and what else the family
    takes). A family's engine is this class with its ``_family_of``."""

    def __init__(
        self,
        model: M,
        name: str,
        *,
        embeddings: EmbeddingCache | None = None,
        model_id: str | None = None,
        encoder_options: EncoderOptions | None = None,
    ) -> None:
        self.name = name
        family = self._family_of(model, encoder_options or EncoderOptions())
        self._family = family
        self._predictor = family.predictor
        images = EncodedImages(
            input_size=family.input_size,
            encode=family.encode,
            hold=family.hold,
            to_embedding=family.to_embedding,
            from_embedding=family.from_embedding,
        )
        self._held = HeldEmbeddings(images, embeddings, model_id)
        self._lock = threading.Lock()

    def _family_of(self, model: M, options: EncoderOptions) -> SamFamily[E]:
        """The family's adapter around ``model``."""
        raise NotImplementedError

    @classmethod
    def built(cls, model: M, entry: EngineEntry, weights: Path, setup: EngineSetup) -> Self:
        """The engine of catalogue ``entry`` around ``model``, loaded from
        ``weights``, run as ``setup`` says (what a family's build_engine returns)."""
        return cls(
            model,
            entry.name,
            embeddings=setup.embeddings,
            model_id=_cache_model_id(setup, entry.name, weights),
            encoder_options=setup.encoder_options,
        )

    @property
    def batch_size(self) -> int:
        """The most images encoded at once (lowered by an out-of-memory error)."""
        return self._family.limit.size

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
        """image: (H, W, 3) uint8 RGB; prompt in its pixel frame. Candidates
        are (H, W) bool masks sorted by the model's predicted IoU, best
        first: one, or three when ``multimask`` is true."""
        return self.segment_batch(image, [prompt], multimask)[0]

    def segment_batch(
        self, image: npt.NDArray[np.uint8], prompts: Sequence[Prompt], multimask: bool
    ) -> list[list[Candidate]]:
        """``segment``'s answer for each prompt, in prompt order, from one
        embedding of ``image`` and one mask-decoder call per group of
        prompts of the same shape (``prompt_batching.group_by_shape``)."""
        check_image(image)
        groups = group_by_shape(prompts, multimask)
        height, width = image.shape[:2]
        with self._lock, torch.inference_mode():
            self._held.hold_for(image)
            return decode_groups(prompts, groups, multimask, height, width, self._family.decode)

    def segment_everything(
        self, image: npt.NDArray[np.uint8], options: EverythingOptions
    ) -> list[Candidate]:
        """The family's automatic mask generator on ``image`` (one crop: the
        whole image), on the embedding this engine holds or makes for it.
        Candidates sorted by predicted IoU, best first, at most
        ``options.max_segments``; no logits (the generators keep none)."""
        check_image(image)
        generator = self._family.mask_generator(options)
        # The generator's own predictor would encode the image again (and
        # SAM 2's, with min_area, ask for its CUDA extension's hole filling:
        # min_area is applied with OpenCV after).
        generator.predictor = _HeldEmbedding(self)
        with self._lock, torch.inference_mode():
            found = generator.generate(image)
        return generated_candidates(found, options.max_segments)


class _HeldEmbedding:
    """The engine's predictor as an automatic mask generator uses it, except
    that setting an image goes through the engine (which keeps the
    embedding it already holds) and resetting keeps the embedding for the
    next job on the same image."""

    def __init__(self, engine: SamEngineBody[Any, Any]) -> None:
        self._engine = engine

    def set_image(self, image: npt.NDArray[np.uint8], image_format: str = "RGB") -> None:
        if image_format != "RGB":
            raise ValueError("segq's images are RGB")
        self._engine._held.hold_for(np.ascontiguousarray(image))

    def reset_image(self) -> None:
        """segment_anything's SamPredictor's reset."""

    def reset_predictor(self) -> None:
        """sam2's SAM2ImagePredictor's reset."""

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine._predictor, name)


def required_weights(entry: EngineEntry, weights: Path | None) -> Path:
    if weights is None:
        raise CheckpointError(f"{entry.name} needs a checkpoint")
    return weights


def _cache_model_id(setup: EngineSetup, name: str, weights: Path) -> str | None:
    """The model's id in the embedding cache: its name and its weights'
    digest; None without a cache. Called after the model loaded, so a bad
    checkpoint is named by the loader first."""
    if setup.embeddings is None:
        return None
    return model_id(name, checkpoint_digest(weights))
