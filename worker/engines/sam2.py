"""SAM 2 (Segment Anything 2) on still images through ``sam2``'s own
``SAM2ImagePredictor``.

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

import threading
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

from segq.engine_catalogue import MODEL_ENGINES, EngineFamily
from segq.worker.engines.base import Candidate, EverythingOptions, Prompt, check_image
from segq.worker.engines.batch_encoding import BatchLimit, default_batch_size, encode_in_batches
from segq.worker.engines.embedding_cache import (
    Embedding,
    EmbeddingCache,
)
from segq.worker.engines.encoder_options import EncoderOptions
from segq.worker.engines.held_embeddings import EncodedImages, HeldEmbeddings
from segq.worker.engines.precision import autocast, resolve_precision
from segq.worker.engines.prompt_batching import (
    decode_groups,
    generated_candidates,
    generator_arguments,
    group_by_shape,
    present,
)
from segq.worker.engines.sam import CheckpointError, read_checkpoint, resolve_device

#: Engine name -> the config ``sam2`` ships for that size and release (SAM 2
#: or SAM 2.1), from segq/engine_catalogue.py.
SAM2_CONFIGS = {
    engine.name: engine.architecture
    for engine in MODEL_ENGINES
    if engine.family is EngineFamily.SAM2
}


def build_sam2_model(name: str) -> SAM2Base:
    """The SAM 2 model of size ``name`` (a key of SAM2_CONFIGS) on the CPU,
    in eval mode, with the random weights its modules start with. Built as
    ``build_sam2`` builds it, with sam2's post-processing overrides (a
    single mask falls back to the best of three when it is unstable)."""
    if name not in SAM2_CONFIGS:
        raise CheckpointError(f"unknown SAM 2 model {name!r}; known: {sorted(SAM2_CONFIGS)}")
    model: SAM2Base = build_sam2(SAM2_CONFIGS[name], ckpt_path=None, device="cpu", mode="eval")
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
    if name not in SAM2_CONFIGS:
        raise CheckpointError(f"unknown SAM 2 model {name!r}; known: {sorted(SAM2_CONFIGS)}")
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
        others = ", ".join(other for other in SAM2_CONFIGS if other != name)
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


class Sam2Engine:
    """One SAM2ImagePredictor around one loaded SAM 2 model, used as
    ``SamEngine`` uses SamPredictor: the embedding of the last image is kept
    while it comes back with another prompt, a lock makes callers on other
    threads take turns, and with ``embeddings`` (and ``model_id``, naming
    the model and its checkpoint there) an image another item or worker
    encoded is restored from that cache instead of encoded again.

    SAM 2 resizes every image to a 1024x1024 square (not keeping its aspect
    ratio, unlike SAM), so its embedding does not depend on the image's
    size beyond that; it is the image embedding and two finer feature maps
    (16 MiB in float32).

    ``encode_images`` encodes the images of several items as one batch
    ahead of their ``segment`` calls (``encoder_options``: precision and
    batch size; SAM 2 has no ``compile`` or attention option here)."""

    def __init__(
        self,
        model: SAM2Base,
        name: str,
        *,
        embeddings: EmbeddingCache | None = None,
        model_id: str | None = None,
        encoder_options: EncoderOptions | None = None,
    ) -> None:
        options = encoder_options or EncoderOptions()
        self.name = name
        self._predictor = SAM2ImagePredictor(model)
        self._device = str(self._predictor.device)
        self._precision = resolve_precision(options.precision, self._device)
        self._limit = BatchLimit(options.batch_size or default_batch_size(self._device))
        self._input_size = (int(model.image_size), int(model.image_size))
        images = EncodedImages(
            # SAM 2 stretches every image to its square input.
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
        """Get the features of ``images`` ((H, W, 3) uint8 RGB each) ready
        for their segment calls: found in the embedding cache, or encoded
        together in batches of at most ``batch_size``. What an earlier call
        readied and no segment call took is dropped."""
        with self._lock:
            self._held.ready_batch(images)

    def segment(
        self, image: npt.NDArray[np.uint8], prompt: Prompt, multimask: bool
    ) -> list[Candidate]:
        """image: (H, W, 3) uint8 RGB; prompt in its pixel frame. Candidates
        are (H, W) bool masks sorted by SAM 2's predicted IoU, best first:
        one, or three when ``multimask`` is true."""
        return self.segment_batch(image, [prompt], multimask)[0]

    def segment_batch(
        self, image: npt.NDArray[np.uint8], prompts: Sequence[Prompt], multimask: bool
    ) -> list[list[Candidate]]:
        """``segment``'s answer for each prompt, in prompt order, from one
        embedding of ``image`` and one ``predict`` call per group of prompts
        of the same shape (SAM2ImagePredictor takes a batch of prompts as
        (B, N, 2) points, (B, 4) boxes and (B, 1, 256, 256) mask inputs)."""
        check_image(image)
        groups = group_by_shape(prompts, multimask)
        height, width = image.shape[:2]
        with self._lock, torch.inference_mode():
            self._held.hold_for(image)
            return decode_groups(prompts, groups, multimask, height, width, self._decode)

    def segment_everything(
        self, image: npt.NDArray[np.uint8], options: EverythingOptions
    ) -> list[Candidate]:
        """sam2's SAM2AutomaticMaskGenerator on ``image`` (one crop: the
        whole image), on the embedding this engine holds or makes for it.
        Candidates sorted by predicted IoU, best first, at most
        ``options.max_segments``; no logits (the generator keeps none)."""
        check_image(image)
        generator = SAM2AutomaticMaskGenerator(
            self._predictor.model, **generator_arguments(options)
        )
        # The generator's own predictor would encode the image again and, with
        # min_area, ask for the CUDA extension's hole filling; this one is the
        # engine's (no hole filling: min_area is applied with OpenCV after).
        generator.predictor = _HeldEmbedding(self)
        with self._lock, torch.inference_mode():
            found = generator.generate(image)
        return generated_candidates(found, options.max_segments)

    def _decode(
        self, prompts: Sequence[Prompt], three: bool
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """One ``predict`` call for prompts of one shape, on the embedding
        held. Returns masks (B, C, H, W) bool, scores (B, C) and low-res
        logits (B, C, 256, 256) float32, C being 3 or 1."""
        first = prompts[0]
        coords = labels = boxes = mask_input = None
        if first.points.shape[0] > 0:
            coords = np.stack([p.points.astype(np.float32) for p in prompts])  # (B, N, 2)
            labels = np.stack([p.labels.astype(np.int32) for p in prompts])  # (B, N)
        if first.box is not None:
            boxes = np.stack([present(p.box).astype(np.float32) for p in prompts])  # (B, 4)
        if first.mask_input is not None:
            mask_input = np.stack([present(p.mask_input) for p in prompts])  # (B, 1, 256, 256)
        masks, scores, logits = self._predictor.predict(
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

    def _encode(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[_Encoded]:
        return encode_in_batches(self._encode_batch, images, self._limit, self._free_memory)

    def _encode_batch(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[_Encoded]:
        """``SAM2ImagePredictor.set_image_batch``'s steps (sam2 1.1.0; for
        one image, ``set_image``'s), without touching the predictor's state:
        each image transformed alone, the encoder run on the stack."""
        predictor, model = self._predictor, self._predictor.model
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

    def _free_memory(self) -> None:
        if torch.device(self._device).type == "cuda":
            torch.cuda.empty_cache()

    def _hold(self, features: _Encoded) -> None:
        """What ``set_image`` leaves behind, without running the encoder."""
        predictor = self._predictor
        predictor.reset_predictor()
        predictor._orig_hw = [features.original_size]
        predictor._features = {
            "image_embed": features.image_embed,
            "high_res_feats": list(features.high_res_feats),
        }
        predictor._is_image_set = True

    def _on_device(self, embedding: Embedding) -> _Encoded:
        device = self._predictor.device
        return _Encoded(
            image_embed=torch.from_numpy(embedding.features).to(device),
            high_res_feats=tuple(
                torch.from_numpy(f).to(device) for f in embedding.high_res_features
            ),
            original_size=embedding.original_size,
        )

    def _as_embedding(self, features: _Encoded) -> Embedding:
        return Embedding(
            features=_numpy(features.image_embed),
            high_res_features=tuple(_numpy(f) for f in features.high_res_feats),
            original_size=features.original_size,
            input_size=self._input_size,
        )


class _HeldEmbedding:
    """The engine's predictor as SAM2AutomaticMaskGenerator uses it, except
    that setting an image goes through the engine (which keeps the
    embedding it already holds) and resetting keeps the embedding for the
    next job on the same image."""

    def __init__(self, engine: Sam2Engine) -> None:
        self._engine = engine

    def set_image(self, image: npt.NDArray[np.uint8]) -> None:
        self._engine._held.hold_for(np.ascontiguousarray(image))

    def reset_predictor(self) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine._predictor, name)


def _numpy(tensor: torch.Tensor) -> npt.NDArray[np.float32]:
    array: npt.NDArray[np.float32] = tensor.detach().float().cpu().numpy()
    return array
