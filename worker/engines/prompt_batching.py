"""How a SAM-family engine batches many prompts on one image for its mask
decoder, and how it turns a decoded batch into candidates. SAM and SAM 2
share these rules, so their masks answer the same prompts the same way.

No torch here: the engines hand numpy arrays in and out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from worker.engines.base import Candidate, Prompt

#: What one mask-decoder call may hold in upscaled mask logits.
DECODE_BATCH_BYTES = 256 * 2**20

#: Prompts decoded together share these: point count, box or not,
#: mask_input or not, three masks or one.
PromptShape = tuple[int, bool, bool, bool]


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
