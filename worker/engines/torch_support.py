"""What every torch engine needs beside its model, in one place: the
device (checked at worker start), the number format the encoder runs in
(``SEGQ_PRECISION``), reading a checkpoint as data, and running an encoder
over batches that may not fit in GPU memory (halve and retry).

An unsupported device or precision stops the worker at start with a clear
message instead of failing in the first item."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch

from segq.worker.engines.encoder_options import Precision

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """The checkpoint cannot be used for the architecture asked for."""


class DeviceError(ValueError):
    """A device torch cannot parse, or one this machine does not have."""


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


class PrecisionError(ValueError):
    """A precision this device cannot run."""


_AUTOCAST_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def resolve_precision(precision: Precision, device: str) -> Precision:
    """The precision to run on ``device`` (``cpu``, ``cuda``, ``cuda:N``,
    ``mps``): ``auto`` made concrete, an explicit one checked.

    ``auto`` stays fp32 on a CPU: bf16 autocast there is emulated on most
    CPUs and measured slower (bench/engine_throughput.py)."""
    kind = torch.device(device).type
    if precision == Precision.AUTO:
        if kind == "cuda" and torch.cuda.is_bf16_supported():
            return Precision.BF16
        return Precision.FP32
    if precision == Precision.FP32:
        return precision
    if kind == "cuda":
        if precision == Precision.BF16 and not torch.cuda.is_bf16_supported():
            raise PrecisionError(f"SEGQ_PRECISION=bf16: the GPU of {device} does not support bf16")
        return precision
    if kind == "cpu" and precision == Precision.BF16:
        return precision
    raise PrecisionError(
        f"SEGQ_PRECISION={precision} is not supported on {kind}; use fp32"
        + (" or bf16" if kind == "cpu" else "")
    )


def autocast(precision: Precision, device: str) -> contextlib.AbstractContextManager[None]:
    """Run the body in ``precision`` (resolved) on ``device``: autocast for
    bf16 and fp16, nothing for fp32 (the weights stay fp32 either way, so
    one loaded model serves every precision)."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return _as_is()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def _as_is() -> Iterator[None]:
    yield


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


def free_memory(device: str) -> None:
    """After an out-of-memory error: give the allocator's cache back (CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def as_numpy(tensor: torch.Tensor) -> npt.NDArray[np.float32]:
    """A tensor's values on the CPU, float32."""
    array: npt.NDArray[np.float32] = tensor.detach().float().cpu().numpy()
    return array
