"""The number format the encoder runs in (``SEGQ_PRECISION``), checked
against the device at worker start so an unsupported choice stops the
worker with a clear message instead of failing in the first item."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from segq.worker.engines.encoder_options import Precision


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
