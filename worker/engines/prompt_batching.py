"""How a SAM-family engine batches many prompts on one image for its mask
decoder, and how it turns a decoded batch, or its automatic mask
generator's output, into candidates. SAM and SAM 2 share these rules, so
their masks answer the same prompts the same way.

No torch here: the engines hand numpy arrays in and out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from segq.worker.engines.base import Candidate, EverythingOptions, Prompt

T = TypeVar("T")

#: What one mask-decoder call may hold in upscaled mask logits.
DECODE_BATCH_BYTES = 256 * 2**20

#: Prompts decoded together share these: point count, box or not,
#: mask_input or not, three masks or one.
PromptShape = tuple[int, bool, bool, bool]

#: One mask-decoder call for prompts of one shape, on the embedding the
#: engine holds, asking three masks or one: masks (B, C, H, W) bool,
#: scores (B, C) and low-res logits (B, C, 256, 256) float32.
DecodeBatch = Callable[
    [Sequence[Prompt], bool],
    tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.float32]],
]


def asks_three(prompt: Prompt, multimask: bool) -> bool:
    """The SAM authors' advice: a single point is ambiguous, so ask for
    three masks and keep the best even when one is wanted (unless an earlier
    mask says which object is meant)."""
    return multimask or (
        prompt.points.shape[0] == 1 and prompt.box is None and prompt.mask_input is None
    )


def group_by_shape(prompts: Sequence[Prompt], multimask: bool) -> dict[PromptShape, list[int]]:
    """Prompt indexes grouped by shape, in prompt order within a group.

    Shapes are not padded into one batch: padding a shorter point set with
    "not a point" tokens, as the models do between a prompt's points and no
    box, adds tokens the decoder attends to and so changes its answer."""
    groups: dict[PromptShape, list[int]] = {}
    for index, prompt in enumerate(prompts):
        if prompt.points.shape[0] == 0 and prompt.box is None:
            raise ValueError("a prompt needs at least one point or a box")
        shape = (
            prompt.points.shape[0],
            prompt.box is not None,
            prompt.mask_input is not None,
            asks_three(prompt, multimask),
        )
        groups.setdefault(shape, []).append(index)
    return groups


def decode_chunks(indexes: list[int], three: bool, height: int, width: int) -> Iterator[list[int]]:
    """``indexes`` in chunks whose upscaled logits, (B, C, H, W) float32 at
    the image's size, fit DECODE_BATCH_BYTES (at least one prompt each)."""
    per_prompt_bytes = (3 if three else 1) * height * width * 4
    step = max(1, DECODE_BATCH_BYTES // per_prompt_bytes)
    for first in range(0, len(indexes), step):
        yield indexes[first : first + step]


def best_first(
    masks: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float32],
    logits: npt.NDArray[np.float32],
    multimask: bool,
) -> list[Candidate]:
    """One prompt's decoded masks (C, H, W), scores (C,) and logits
    (C, 256, 256) as candidates sorted by predicted IoU: all, or the best."""
    order = np.argsort(-scores, kind="stable")
    candidates = [
        Candidate(
            mask=np.ascontiguousarray(masks[i], dtype=np.bool_),
            score=float(scores[i]),
            logits=np.ascontiguousarray(logits[i], dtype=np.float32),
        )
        for i in order
    ]
    return candidates if multimask else candidates[:1]


def decode_groups(
    prompts: Sequence[Prompt],
    groups: dict[PromptShape, list[int]],
    multimask: bool,
    height: int,
    width: int,
    decode: DecodeBatch,
) -> list[list[Candidate]]:
    """Each prompt's candidates, best first, in prompt order: ``groups``
    (``group_by_shape``'s) decoded chunk by chunk (``decode_chunks``) for
    an image of ``height`` x ``width``. The caller holds the embedding."""
    answers: list[list[Candidate]] = [[] for _ in prompts]
    for (_, _, _, three), indexes in groups.items():
        for chunk in decode_chunks(indexes, three, height, width):
            masks, scores, logits = decode([prompts[i] for i in chunk], three)
            for row, index in enumerate(chunk):
                answers[index] = best_first(masks[row], scores[row], logits[row], multimask)
    return answers


def generator_arguments(options: EverythingOptions) -> dict[str, Any]:
    """The keyword arguments of segment_anything's SamAutomaticMaskGenerator
    and sam2's SAM2AutomaticMaskGenerator (the same in both) for ``options``,
    one crop (the whole image), masks as arrays; ``max_segments`` is applied
    afterwards by ``generated_candidates``."""
    return {
        "points_per_side": options.points_per_side,
        "pred_iou_thresh": options.pred_iou_thresh,
        "stability_score_thresh": options.stability_score_thresh,
        "min_mask_region_area": options.min_area,
        "output_mode": "binary_mask",
    }


def generated_candidates(found: Sequence[Mapping[str, Any]], max_segments: int) -> list[Candidate]:
    """An automatic mask generator's output (``binary_mask`` records) as
    candidates sorted by predicted IoU, best first, at most ``max_segments``;
    no logits (the generators keep none)."""
    ordered = sorted(found, key=lambda mask: -float(mask["predicted_iou"]))
    return [
        Candidate(
            mask=np.ascontiguousarray(mask["segmentation"], dtype=np.bool_),
            score=float(mask["predicted_iou"]),
        )
        for mask in ordered[:max_segments]
    ]


def present(value: T | None) -> T:
    """A field every prompt of a batch has, since batches share a shape."""
    assert value is not None
    return value
