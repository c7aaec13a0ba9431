"""SAM 3 (Segment Anything 3) through ``transformers``: every instance of a
concept named in words (a text prompt, with optional exemplar boxes), and
points and boxes as SAM 2 takes them, on one image encoding.

The weights are a local directory in Hugging Face's layout, the
``facebook/sam3`` snapshot (its ``config.json`` is a ``sam3_video`` one,
holding a ``detector_config`` and a ``tracker_config``; one safetensors file
holds both models' tensors). ``Sam3Model`` (the detector: text prompts) and
``Sam3TrackerModel`` (points and boxes) are loaded from it with local files
only: segq never contacts a hub.

One copy of the vision encoder: the snapshot's tracker has no ViT backbone
of its own (transformers maps the detector's onto it), so the tracker here
is given the detector's backbone module, and the copy its loader made is
dropped. Each model keeps its own small FPN neck, as in the snapshot.

What is encoded, cached (both tiers) and batched is the backbone's output
for an image, (1, 1024, 72, 72) for the real model: 21 MiB in float32,
where the detector's three FPN maps would be 111 MiB. Each prompt on the
image then runs the necks it needs (once per held image) and the heads:
a second phrase costs a text encoding and the detector's heads, never an
image encoding. The backbone runs in the configured precision (bf16
autocast on a GPU by default); its output is kept in float32 and the heads
run as transformers ships them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers import (
    Sam3Model,
    Sam3Processor,
    Sam3TrackerModel,
    Sam3TrackerProcessor,
)
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from segq.engine_catalogue import EngineEntry
from segq.worker.engines.base import Candidate, Concept, EngineSetup, Prompt, check_image
from segq.worker.engines.embedding_cache import Embedding, EmbeddingCache, model_id
from segq.worker.engines.encoder_options import EncoderOptions
from segq.worker.engines.held_embeddings import EncodedImages, HeldEmbeddings
from segq.worker.engines.prompt_batching import decode_groups, group_by_shape, present
from segq.worker.engines.torch_support import (
    BatchLimit,
    CheckpointError,
    autocast,
    default_batch_size,
    encode_in_batches,
    resolve_device,
    resolve_precision,
)
from segq.worker.weights import snapshot_digest, snapshot_problem, weight_files

#: Phrases whose text features a worker keeps (they cost a text encoder run).
TEXT_FEATURES_KEPT = 256


@dataclass(frozen=True)
class Sam3Models:
    """The detector and the tracker of one snapshot, sharing one backbone,
    with the processors the snapshot configures."""

    detector: Sam3Model
    tracker: Sam3TrackerModel
    processor: Sam3Processor
    tracker_processor: Sam3TrackerProcessor


def load_sam3(directory: Path, device: str) -> Sam3Models:
    """Load the snapshot in ``directory`` with local files only, the
    tracker given the detector's backbone, on ``device`` (see
    ``resolve_device``) in eval mode.

    Raises CheckpointError naming the file and what is wrong when the
    directory is not a SAM 3 snapshot or its tensors do not fit."""
    resolved = resolve_device(device)
    problem = snapshot_problem(directory)
    if problem is not None:
        raise CheckpointError(problem)
    detector = _load(Sam3Model, directory)
    tracker = _load(Sam3TrackerModel, directory)
    # The snapshot stores one backbone; the tracker's loader made a copy of it.
    tracker.vision_encoder.backbone = detector.vision_encoder.backbone
    try:
        processor = Sam3Processor.from_pretrained(directory, local_files_only=True)
        tracker_processor = Sam3TrackerProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"{directory}: the processor or tokenizer files do not load: {str(exc)[:300]}"
        ) from exc
    return Sam3Models(
        detector=detector.to(resolved).eval(),
        tracker=tracker.to(resolved).eval(),
        processor=processor,
        tracker_processor=tracker_processor,
    )


def _load(model_class: Any, directory: Path) -> Any:
    try:
        model, info = model_class.from_pretrained(
            directory, local_files_only=True, output_loading_info=True
        )
    except Exception as exc:
        # Whatever transformers or safetensors raise for a broken file
        # (SafetensorError among them) stops the worker with the file named.
        raise CheckpointError(
            f"{directory}: {model_class.__name__} does not load from it: {str(exc)[:300]}"
        ) from exc
    wrong = [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())]
    if wrong:
        listed = ", ".join(str(key) for key in list(wrong)[:5])
        raise CheckpointError(
            f"{directory / weight_files(directory)[0].name} does not fit "
            f"{model_class.__name__}: {len(wrong)} tensors missing or of another shape "
            f"({listed}, ...)"
        )
    return model


@dataclass(frozen=True)
class _Encoded:
    """One image as the backbone made it: features (1, C, h, w) float32 on
    the model's device; original_size (H, W)."""

    features: torch.Tensor
    original_size: tuple[int, int]


class Sam3Engine:
    """SAM 3 for segq: ``segment_concepts`` answers text prompts (every
    instance, best first), ``segment``/``segment_batch`` points and boxes,
    both on the backbone features of the image held. As ``Sam2Engine``:
    a lock makes callers take turns, the embedding cache (with
    ``model_id``) restores an image encoded before, and ``encode_images``
    encodes several items' images together (``encoder_options``)."""

    def __init__(
        self,
        models: Sam3Models,
        name: str,
        *,
        embeddings: EmbeddingCache | None = None,
        model_id: str | None = None,
        encoder_options: EncoderOptions | None = None,
    ) -> None:
        options = encoder_options or EncoderOptions()
        self.name = name
        self._models = models
        self._device = str(models.detector.device)
        self._precision = resolve_precision(options.precision, self._device)
        self._limit = BatchLimit(options.batch_size or default_batch_size(self._device))
        size = models.processor.image_processor.size
        self._input_size = (int(size["height"]), int(size["width"]))
        vision_config: Any = models.detector.config.vision_config
        self._patch_size = int(vision_config.backbone_config.patch_size)
        self._held_features: _Encoded | None = None
        self._detector_view: Sam3VisionEncoderOutput | None = None
        self._tracker_view: list[torch.Tensor] | None = None
        self._text_features: OrderedDict[str, Any] = OrderedDict()
        images = EncodedImages(
            # SAM 3 stretches every image to its square input.
            input_size=lambda _image: self._input_size,
            encode=self._encode,
            hold=self._hold,
            to_embedding=self._as_embedding,
            from_embedding=self._on_device,
        )
        self._held = HeldEmbeddings(images, embeddings, model_id)
        self._lock = threading.Lock()

    @property
    def batch_size(self) -> int:
        """The most images encoded at once (lowered by an out-of-memory error)."""
        return self._limit.size

    def encode_images(self, images: Sequence[npt.NDArray[np.uint8]]) -> None:
        """Get the features of ``images`` ready for their segment calls:
        found in the embedding cache, or encoded together in batches."""
        with self._lock:
            self._held.ready_batch(images)

    def segment_concepts(
        self, image: npt.NDArray[np.uint8], concepts: Sequence[Concept]
    ) -> list[list[Candidate]]:
        """Each concept's instances in ``image`` ((H, W, 3) uint8 RGB),
        best first, as ``Sam3Processor`` + ``Sam3Model`` +
        ``post_process_instance_segmentation`` find them: scores above the
        concept's threshold, masks at the image's size, the detector's box
        and its low-resolution mask logits; at most ``max_segments``."""
        check_image(image)
        height, width = image.shape[:2]
        with self._lock, torch.inference_mode():
            self._held.hold_for(image)
            return [self._find(concept, height, width) for concept in concepts]

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        """Points and boxes through the tracker: as ``Sam2Engine.segment``."""
        return self.segment_batch(image, [prompt], multimask)[0]

    def segment_batch(
        self, image: npt.NDArray[np.uint8], prompts: Sequence[Prompt], multimask: bool
    ) -> list[list[Candidate]]:
        """``segment``'s answer for each prompt, in prompt order, one
        tracker call per group of prompts of the same shape."""
        check_image(image)
        groups = group_by_shape(prompts, multimask)
        height, width = image.shape[:2]
        with self._lock, torch.inference_mode():
            self._held.hold_for(image)
            return decode_groups(prompts, groups, multimask, height, width, self._decode)

    def _find(self, concept: Concept, height: int, width: int) -> list[Candidate]:
        detector, processor = self._models.detector, self._models.processor
        arguments: dict[str, Any] = {"text_embeds": self._text_embeds(concept.text)}
        if concept.exemplar_boxes.shape[0] > 0:
            exemplars = processor(
                text=concept.text,
                input_boxes=[concept.exemplar_boxes.tolist()],
                input_boxes_labels=[concept.exemplar_labels.tolist()],
                original_sizes=[[height, width]],
                return_tensors="pt",
            ).to(self._device)
            arguments["attention_mask"] = exemplars["attention_mask"]
            arguments["input_boxes"] = exemplars["input_boxes"]
            arguments["input_boxes_labels"] = exemplars["input_boxes_labels"]
        else:
            arguments["attention_mask"] = self._attention_mask(concept.text)
        outputs = detector(vision_embeds=self._detector_features(), **arguments)
        # transformers' post-processing is untyped.
        post_process: Any = processor.post_process_instance_segmentation
        [found] = post_process(
            outputs,
            threshold=concept.score_threshold,
            mask_threshold=concept.mask_threshold,
            target_sizes=[(height, width)],
        )
        scores = found["scores"].float().cpu().numpy()
        boxes = found["boxes"].double().cpu().numpy()
        masks = found["masks"].bool().cpu().numpy()
        kept = (outputs.pred_logits[0].sigmoid() * outputs.presence_logits[0].sigmoid()) > (
            concept.score_threshold
        )
        logits = outputs.pred_masks[0][kept].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")[: concept.max_segments]
        return [
            Candidate(
                mask=np.ascontiguousarray(masks[i]),
                score=float(scores[i]),
                logits=np.ascontiguousarray(logits[i]),
                box=boxes[i],
            )
            for i in order
        ]

    def _text_embeds(self, text: str) -> Any:
        """The text encoder's output for ``text`` (kept for the next image)."""
        kept = self._text_features.get(text)
        if kept is not None:
            self._text_features.move_to_end(text)
            return kept[0]
        tokens = self._models.processor(text=text, return_tensors="pt").to(self._device)
        features = self._models.detector.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        self._text_features[text] = (features, tokens["attention_mask"])
        if len(self._text_features) > TEXT_FEATURES_KEPT:
            self._text_features.popitem(last=False)
        return features

    def _attention_mask(self, text: str) -> torch.Tensor:
        mask: torch.Tensor = self._text_features[text][1]
        return mask

    def _detector_features(self) -> Sam3VisionEncoderOutput:
        """What ``Sam3Model.get_vision_features`` gives for the held image,
        from its backbone features (the detector's neck run once per image)."""
        if self._detector_view is None:
            held = present(self._held_features)
            fpn, positions = self._models.detector.vision_encoder.neck(held.features)
            self._detector_view = Sam3VisionEncoderOutput(
                last_hidden_state=held.features.flatten(2).transpose(1, 2),
                fpn_hidden_states=fpn,
                fpn_position_encoding=positions,
            )
        return self._detector_view

    def _tracker_features(self) -> list[torch.Tensor]:
        """What ``Sam3TrackerModel.get_image_embeddings`` gives for the held
        image, from its backbone features (the tracker's neck, once)."""
        if self._tracker_view is None:
            tracker = self._models.tracker
            held = present(self._held_features)
            fpn, _ = tracker.vision_encoder.neck(held.features)
            maps = list(fpn)
            maps[0] = tracker.mask_decoder.conv_s0(maps[0])
            maps[1] = tracker.mask_decoder.conv_s1(maps[1])
            flat = [feature_map.flatten(2).permute(2, 0, 1) for feature_map in maps]
            flat[-1] = flat[-1] + tracker.no_memory_embedding
            self._tracker_view = [
                feature.permute(1, 2, 0).view(1, -1, *size)
                for feature, size in zip(flat, tracker.backbone_feature_sizes, strict=False)
            ]
        return self._tracker_view

    def _decode(
        self, prompts: Sequence[Prompt], three: bool
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """One tracker call for prompts of one shape on the held image, as
        ``Sam3TrackerProcessor`` + ``Sam3TrackerModel`` +
        ``post_process_masks`` run it: masks (B, C, H, W) bool, scores
        (B, C) and low-res logits (B, C, h, w) float32, C being 3 or 1."""
        held = present(self._held_features)
        original = [list(held.original_size)]
        first = prompts[0]
        arguments: dict[str, Any] = {}
        if first.points.shape[0] > 0:
            arguments["input_points"] = [[p.points.tolist() for p in prompts]]
            arguments["input_labels"] = [[p.labels.tolist() for p in prompts]]
        if first.box is not None:
            arguments["input_boxes"] = [[present(p.box).tolist() for p in prompts]]
        inputs = self._models.tracker_processor(
            original_sizes=original, return_tensors="pt", **arguments
        ).to(self._device)
        inputs.pop("original_sizes", None)
        if first.mask_input is not None:
            inputs["input_masks"] = torch.from_numpy(
                np.stack([present(p.mask_input) for p in prompts])
            ).to(self._device)
        outputs = self._models.tracker(
            image_embeddings=self._tracker_features(), multimask_output=three, **inputs
        )
        logits = outputs.pred_masks[0]  # (B, C, h, w)
        post_process: Any = self._models.tracker_processor.post_process_masks
        [masks] = post_process(logits[None], original)
        return (
            masks.bool().cpu().numpy(),
            outputs.iou_scores[0].float().cpu().numpy(),
            logits.float().cpu().numpy(),
        )

    def _encode(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[_Encoded]:
        return encode_in_batches(self._encode_batch, images, self._limit, self._free_memory)

    def _encode_batch(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[_Encoded]:
        """``Sam3Model.get_vision_features``' backbone on the stack of
        ``images``, each resized and normalized by the snapshot's processor."""
        backbone = self._models.detector.vision_encoder.backbone
        with torch.inference_mode():
            # The processor hands each array to torch.from_numpy, which warns
            # of (and must not write to) a decoded image that is read-only.
            writable = [image if image.flags.writeable else image.copy() for image in images]
            pixels = self._models.processor(images=writable, return_tensors="pt")[
                "pixel_values"
            ].to(self._device)
            with autocast(self._precision, self._device):
                hidden = backbone(pixels).last_hidden_state
            count, rows, columns = (
                pixels.shape[0],
                pixels.shape[-2] // self._patch_size,
                pixels.shape[-1] // self._patch_size,
            )
            features = hidden.float().view(count, rows, columns, -1).permute(0, 3, 1, 2)
        return [
            _Encoded(
                features=features[i : i + 1],
                original_size=(int(image.shape[0]), int(image.shape[1])),
            )
            for i, image in enumerate(images)
        ]

    def _free_memory(self) -> None:
        if torch.device(self._device).type == "cuda":
            torch.cuda.empty_cache()

    def _hold(self, features: _Encoded) -> None:
        self._held_features = features
        self._detector_view = None
        self._tracker_view = None

    def _on_device(self, embedding: Embedding) -> _Encoded:
        return _Encoded(
            features=torch.from_numpy(embedding.features).to(self._device),
            original_size=embedding.original_size,
        )

    def _as_embedding(self, features: _Encoded) -> Embedding:
        array: npt.NDArray[np.float32] = features.features.detach().float().cpu().numpy()
        return Embedding(
            features=np.ascontiguousarray(array),
            original_size=features.original_size,
            input_size=self._input_size,
        )


def build_engine(entry: EngineEntry, weights: Path | None, setup: EngineSetup) -> Sam3Engine:
    """The family's loader (segq.worker.engines.load_engine calls it): the
    snapshot folder ``weights``, checked file by file as it loads."""
    if weights is None:
        raise CheckpointError(f"SEGQ_MODEL={entry.name} needs its snapshot folder")
    models = load_sam3(weights, setup.device)
    # Keyed by the snapshot's files, read after they loaded.
    digest = None if setup.embeddings is None else snapshot_digest(weights)
    return Sam3Engine(
        models,
        entry.name,
        embeddings=setup.embeddings,
        model_id=None if digest is None else model_id(entry.name, digest),
        encoder_options=setup.encoder_options,
    )
