"""The one interface every segmentation engine implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from segq.engine_catalogue import concept_unsupported_message
from segq.worker.engines.encoder_options import EncoderOptions

if TYPE_CHECKING:
    from segq.engine_catalogue import EngineEntry
    from segq.worker.engines.embedding_cache import EmbeddingCache


@dataclass(frozen=True)
class Prompt:
    """Prompts in the image's pixel frame (origin top-left, x to the right).

    points: (N, 2) float64, x then y, in pixels; N may be 0.
    labels: (N,) int64, 1 foreground, 0 background.
    box:    (4,) float64 x_min, y_min, x_max, y_max in pixels, or None.
    At least one point or a box is present, unless ``concept`` is.
    mask_input: (1, 256, 256) float32 low-resolution mask logits of an
        earlier answer (SAM's ``mask_input``), or None.
    concept: a text prompt (then no points and no box), or None.
    """

    points: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    box: npt.NDArray[np.float64] | None
    mask_input: npt.NDArray[np.float32] | None = None
    concept: Concept | None = None


@dataclass(frozen=True)
class Concept:
    """A text prompt: every instance of what ``text`` names (SAM 3's
    "promptable concept"), in the image's pixel frame.

    text: the phrase, trimmed, not blank.
    exemplar_boxes: (K, 4) float64 x_min, y_min, x_max, y_max in pixels of
        example instances; K may be 0.
    exemplar_labels: (K,) int64, 1 an instance of the concept, 0 not one.
    score_threshold: instances scoring at or below it are dropped.
    mask_threshold: a pixel is on the mask where its probability is above it.
    max_segments: at most this many instances, best first.
    """

    text: str
    exemplar_boxes: npt.NDArray[np.float64]
    exemplar_labels: npt.NDArray[np.int64]
    score_threshold: float
    mask_threshold: float
    max_segments: int


@dataclass(frozen=True)
class Candidate:
    """One proposed object mask.

    mask:  (H, W) bool at the input image's size, True on the object.
    score: the engine's confidence, higher is better (SAM: predicted IoU).
    logits: (256, 256) float32 low-resolution mask logits in SAM's padded
        square frame (what ``mask_input`` takes back), or None for an
        engine that has none; SAM 3's are (288, 288) in its stretched square.
    box: (4,) float64 x_min, y_min, x_max, y_max in pixels, the box the
        engine found for the object (SAM 3's detector), or None where the
        mask's own bounds are the box.
    """

    mask: npt.NDArray[np.bool_]
    score: float
    logits: npt.NDArray[np.float32] | None = None
    box: npt.NDArray[np.float64] | None = None


def check_image(image: npt.NDArray[np.uint8]) -> None:
    """ValueError unless ``image`` is what every engine takes: (H, W, 3) uint8."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")


class SegmentationEngine(Protocol):
    """Turns an image and a prompt into masks.

    ``name`` is what segq records on the job (e.g. ``sam_vit_b``, ``grabcut``).
    """

    name: str

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        """image: (H, W, 3) uint8 RGB. Returns candidates best first: exactly one
        when ``multimask`` is false, up to three when it is true."""
        ...


@dataclass(frozen=True)
class EverythingOptions:
    """Automatic mask generation ("segment everything") as segment-anything's
    ``SamAutomaticMaskGenerator`` takes it; the defaults are its own.

    points_per_side: a grid of points_per_side**2 single-point prompts.
    pred_iou_thresh, stability_score_thresh: masks below either are dropped.
    min_area: disconnected regions and holes under this many pixels are
        removed (its ``min_mask_region_area``; 0 leaves masks as decoded).
    max_segments: at most this many masks are kept, best predicted IoU first.
    """

    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    min_area: int = 0
    max_segments: int = 256


class EverythingUnsupported(ValueError):
    """The engine has no automatic mask generation."""


@runtime_checkable
class AutomaticMaskEngine(SegmentationEngine, Protocol):
    """An engine that finds every object of an image without a prompt."""

    def segment_everything(
        self, image: npt.NDArray[np.uint8], options: EverythingOptions
    ) -> list[Candidate]:
        """image: (H, W, 3) uint8 RGB. Candidates, best first, at most
        ``options.max_segments``."""
        ...


def segment_everything(
    engine: SegmentationEngine, image: npt.NDArray[np.uint8], options: EverythingOptions
) -> list[Candidate]:
    """Every object the engine finds; EverythingUnsupported if it cannot."""
    if not isinstance(engine, AutomaticMaskEngine):
        raise EverythingUnsupported(
            f"segment everything needs a SAM engine; this server runs {engine.name}"
        )
    return engine.segment_everything(image, options)


class MaskInputUnsupported(ValueError):
    """A prompt carries a mask_input the engine cannot take."""


@runtime_checkable
class BatchSegmentationEngine(SegmentationEngine, Protocol):
    """An engine that answers many prompts on one image together, cheaper
    than one by one (SAM: one image embedding, batched mask decoding), and
    takes a prompt's ``mask_input``."""

    def segment_batch(
        self, image: npt.NDArray[np.uint8], prompts: Sequence[Prompt], multimask: bool
    ) -> list[list[Candidate]]:
        """The answer of ``segment`` for each prompt, in prompt order."""
        ...


class ConceptUnsupported(ValueError):
    """A text prompt on an engine that cannot take one."""


@runtime_checkable
class ConceptSegmentationEngine(SegmentationEngine, Protocol):
    """An engine that finds every instance of a concept named in words."""

    def segment_concepts(
        self, image: npt.NDArray[np.uint8], concepts: Sequence[Concept]
    ) -> list[list[Candidate]]:
        """Each concept's instances, best first (none found: an empty list)."""
        ...


def segment_prompts(
    engine: SegmentationEngine,
    image: npt.NDArray[np.uint8],
    prompts: Sequence[Prompt],
    multimask: bool,
) -> list[list[Candidate]]:
    """Each prompt's candidates, best first, in prompt order: in batches
    where the engine can, else one prompt at a time; text prompts (every
    instance of their concept) where the engine takes them, else
    ConceptUnsupported."""
    concepts = {i: prompt.concept for i, prompt in enumerate(prompts) if prompt.concept is not None}
    if not concepts:
        return _segment_geometric(engine, image, prompts, multimask)
    if not isinstance(engine, ConceptSegmentationEngine):
        raise ConceptUnsupported(concept_unsupported_message(engine.name))
    answers: list[list[Candidate]] = [[] for _ in prompts]
    found = engine.segment_concepts(image, list(concepts.values()))
    for index, instances in zip(concepts, found, strict=True):
        answers[index] = instances
    others = [index for index in range(len(prompts)) if prompts[index].concept is None]
    if others:
        segmented = _segment_geometric(engine, image, [prompts[i] for i in others], multimask)
        for index, candidates in zip(others, segmented, strict=True):
            answers[index] = candidates
    return answers


def _segment_geometric(
    engine: SegmentationEngine,
    image: npt.NDArray[np.uint8],
    prompts: Sequence[Prompt],
    multimask: bool,
) -> list[list[Candidate]]:
    if isinstance(engine, BatchSegmentationEngine):
        return engine.segment_batch(image, prompts, multimask)
    if any(prompt.mask_input is not None for prompt in prompts):
        raise MaskInputUnsupported(f"maskInput needs a SAM engine; this server runs {engine.name}")
    return [engine.segment(image, prompt, multimask) for prompt in prompts]


@runtime_checkable
class ImageBatchEngine(SegmentationEngine, Protocol):
    """An engine whose image encoding is cheaper per image in batches (SAM
    on a GPU): the pipeline hands it the images of several items at once
    before segmenting each."""

    @property
    def batch_size(self) -> int:
        """The most images encoded at once; 1 means no batching."""
        ...

    def encode_images(self, images: Sequence[npt.NDArray[np.uint8]]) -> None:
        """Get the embeddings of ``images`` ((H, W, 3) uint8 RGB each) ready
        for the segment calls that follow."""
        ...


@dataclass(frozen=True)
class EngineSetup:
    """How the worker runs whatever engine it builds."""

    #: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    device: str = "auto"
    #: Where image embeddings are shared, keyed by the model and its weights.
    embeddings: EmbeddingCache | None = None
    encoder_options: EncoderOptions = field(default_factory=EncoderOptions)


class EngineBuilder(Protocol):
    """The ``build_engine`` function each engine family's module defines
    (the catalogue's ``ENGINE_MODULES`` names the module): the engine of
    ``entry``, its model loaded from ``weights`` (None for an engine with
    none), run as ``setup`` says."""

    def __call__(
        self, entry: EngineEntry, weights: Path | None, setup: EngineSetup
    ) -> SegmentationEngine: ...
