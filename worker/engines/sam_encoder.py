"""SAM's image encoder as segq runs it: many images in one batch, in the
configured precision, with attention through PyTorch's fused kernel, and
optionally compiled; the mask decoder stays as segment_anything runs it.

Preprocessing is ``SamPredictor.set_image``'s, image by image (resize the
longest side to the model's input, normalize, pad to a square); only the
encoder call is batched, so an image's features do not depend on its
company beyond float rounding."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from segment_anything.utils.transforms import ResizeLongestSide

from segq.worker.engines.encoder_options import EncoderOptions
from segq.worker.engines.torch_support import (
    BatchLimit,
    autocast,
    default_batch_size,
    encode_in_batches,
    free_memory,
    resolve_precision,
)

log = logging.getLogger(__name__)


# segment_anything ships no type information, so its classes are Any.
class SdpaAttention(Attention):  # type: ignore[misc]
    """segment_anything's windowed/global attention with its decomposed
    relative positions, computed by ``scaled_dot_product_attention``: the
    relative-position terms become the additive mask (as
    segment-anything-fast does), so fused kernels replace the hand-written
    softmax(QK^T)V. Same parameters, so a loaded model is converted in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        # (3, B * heads, H * W, head_dim), as the reference computes them
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, batch * self.num_heads, height * width, -1)
        bias = None
        if self.use_rel_pos:
            bias = _relative_position_bias(q, self.rel_pos_h, self.rel_pos_w, (height, width))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=self.scale
        )
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        projected: torch.Tensor = self.proj(out.reshape(batch, height, width, -1))
        return projected


def _relative_position_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """segment_anything's ``add_decomposed_rel_pos`` without the attention
    map: (B * heads, H * W, H * W), what it would add to it, in q's dtype."""
    height, width = size
    rel_h_table = get_rel_pos(height, height, rel_pos_h)
    rel_w_table = get_rel_pos(width, width, rel_pos_w)
    rows, _, dim = q.shape
    r_q = q.reshape(rows, height, width, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h_table)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w_table)
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(rows, height * width, height * width).to(q.dtype)


def use_sdpa_attention(sam: Sam) -> None:
    """Switch every attention block of ``sam``'s image encoder to SdpaAttention."""
    for module in sam.image_encoder.modules():
        if type(module) is Attention:
            module.__class__ = SdpaAttention


@dataclass(frozen=True)
class EncodedImage:
    """features: (1, C, h, w) on the model's device, float32; original_size
    and input_size: (H, W) of the image and of it resized for the encoder."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


class SamImageEncoder:
    """Encodes images with ``sam``'s image encoder as ``options`` say; the
    batch shrinks (for the rest of the process) when one runs out of GPU memory."""

    def __init__(self, sam: Sam, options: EncoderOptions) -> None:
        self.device = str(sam.device)
        self.precision = resolve_precision(options.precision, self.device)
        self.limit = BatchLimit(options.batch_size or default_batch_size(self.device))
        self._sam = sam
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        if options.sdpa:
            use_sdpa_attention(sam)
        self._encoder: torch.nn.Module = sam.image_encoder
        if options.compile:
            self._encoder = torch.compile(sam.image_encoder)  # type: ignore[assignment]
            self._warm_up()

    def input_size(self, image: npt.NDArray[np.uint8]) -> tuple[int, int]:
        """(H, W) of ``image`` resized for the encoder."""
        height, width = self.transform.get_preprocess_shape(
            image.shape[0], image.shape[1], self.transform.target_length
        )
        return (height, width)

    def encode(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[EncodedImage]:
        """One EncodedImage per (H, W, 3) uint8 RGB image, in order."""
        return encode_in_batches(
            self._encode_batch, images, self.limit, lambda: free_memory(self.device)
        )

    def _encode_batch(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[EncodedImage]:
        with torch.inference_mode():
            inputs = torch.cat([self._preprocess(image) for image in images])
            with autocast(self.precision, self.device):
                features = self._encoder(inputs)
            features = features.float()
        return [
            EncodedImage(
                features=features[i : i + 1],
                original_size=(int(image.shape[0]), int(image.shape[1])),
                input_size=self.input_size(image),
            )
            for i, image in enumerate(images)
        ]

    def _preprocess(self, image: npt.NDArray[np.uint8]) -> torch.Tensor:
        """``SamPredictor.set_image``'s steps: (1, 3, S, S) normalized and padded."""
        resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
        chw = resized.permute(2, 0, 1).contiguous()[None, :, :, :]
        prepared: torch.Tensor = self._sam.preprocess(chw)
        return prepared

    def _warm_up(self) -> None:
        """Compile for each batch size the worker will run (the configured
        one and each halving), before the first item, so no item waits for
        the compiler."""
        started = time.perf_counter()
        size = self.limit.size
        side = self.transform.target_length
        blank = np.zeros((side, side, 3), dtype=np.uint8)
        while size >= 1:
            self._encode_batch([blank] * size)
            size //= 2
        log.info(
            "compiled the image encoder for batches up to %s in %.1f s",
            self.limit.size,
            time.perf_counter() - started,
        )
