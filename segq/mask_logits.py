"""SAM's low-resolution mask logits as bytes: float16 ``.npy``, which
numpy (``np.load``) and every array library read. The worker stores a
segment's logits so; a later prompt feeds them back to SAM as
``mask_input``, from storage or (Livepeer's route) inline in the job."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt

NPY_MEDIA_TYPE = "application/x-npy"


class LogitsUnreadable(ValueError):
    """Bytes that are not one (H, W) float array as ``encode_logits`` writes."""


def encode_logits(logits: npt.NDArray[np.float32]) -> bytes:
    """logits: (H, W) float32 (SAM's: 256 x 256, in its padded square frame).
    float16 halves the object; SAM's logits are far inside its range, and a
    mask thresholded from them changes nowhere SAM was not within about a
    thousandth of undecided."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (H, W), got {logits.shape}")
    buffer = io.BytesIO()
    np.save(buffer, logits.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def decode_logits(data: bytes) -> npt.NDArray[np.float32]:
    """What ``encode_logits`` wrote, as (H, W) float32; never unpickles."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise LogitsUnreadable(f"not an .npy array: {exc}") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.dtype.kind != "f":
        raise LogitsUnreadable("not an (H, W) float array")
    return np.asarray(array, dtype=np.float32)
