"""How a model's image encoder is to run, as the settings say; without
torch, so the settings and the engine registry can name it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Precision(StrEnum):
    #: bf16 autocast on a CUDA GPU that supports it, else fp32.
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


@dataclass(frozen=True)
class EncoderOptions:
    """precision: ``SEGQ_PRECISION``. batch_size: images encoded at once
    (``SEGQ_ENGINE_BATCH``); None takes the device's default. compile:
    ``torch.compile`` the encoder at start (``SEGQ_COMPILE``). sdpa: attention
    through ``scaled_dot_product_attention`` (same results within float
    rounding; off only to measure against the reference)."""

    precision: Precision = Precision.AUTO
    batch_size: int | None = None
    compile: bool = False
    sdpa: bool = True
