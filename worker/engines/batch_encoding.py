"""Running an encoder over a batch of inputs when the batch may not fit
in GPU memory: halve it and run the halves, remember the size that fit,
and never fail an input for it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

#: Images per encoder batch on a CUDA GPU unless SEGQ_ENGINE_BATCH says:
#: segment-anything-fast's measurements (A100, ViT-H, bf16) gain little
#: past 8-16 images, and 8 ViT-H images in bf16 fit a 24 GB card; a smaller
#: card halves it on its first out-of-memory error. On a CPU batching gains
#: nothing (the cores are busy with one image) and delays the first
#: result, so it is 1.
CUDA_DEFAULT_BATCH = 8
CPU_DEFAULT_BATCH = 1


def default_batch_size(device: str) -> int:
    return CUDA_DEFAULT_BATCH if torch.device(device).type == "cuda" else CPU_DEFAULT_BATCH


In = TypeVar("In")
Out = TypeVar("Out")


class BatchLimit:
    """The largest batch this process runs at once: the configured size
    until a batch runs out of memory, then the largest that fit."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a batch holds at least one input, not {size}")
        self.size = size

    def lower_to(self, size: int) -> None:
        if size < self.size:
            log.warning(
                "the encoder ran out of GPU memory at a batch of %s; "
                "batches of at most %s from now on",
                self.size,
                size,
            )
            self.size = size


def encode_in_batches(
    encode: Callable[[Sequence[In]], list[Out]],
    inputs: Sequence[In],
    limit: BatchLimit,
    free_memory: Callable[[], None] = lambda: None,
) -> list[Out]:
    """``encode`` over ``inputs`` in batches of at most ``limit.size``, one
    output per input, in order. A batch that raises torch.OutOfMemoryError
    is halved and its halves run (again halved if need be), and ``limit``
    comes down to the half that fit; a single input that does not fit
    raises (no smaller batch exists). ``free_memory`` runs after each
    out-of-memory error (CUDA: empty the allocator's cache)."""
    outputs: list[Out] = []
    start = 0
    while start < len(inputs):
        batch = inputs[start : start + limit.size]
        try:
            outputs.extend(encode(batch))
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            free_memory()
            limit.lower_to(len(batch) // 2)
            continue
        start += len(batch)
    return outputs
