"""SAM's image encoder as segq runs it (worker/engines/sam_encoder.py): a
batch of images, bf16, SDPA attention and compilation against the plain
fp32 encoder one image at a time, on a tiny SAM with random weights; and the
halving of a batch that runs out of GPU memory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from segq.worker.engines.base import Candidate
from segq.worker.engines.encoder_options import EncoderOptions, Precision
from segq.worker.engines.sam import SamEngine
from segq.worker.engines.sam_encoder import SdpaAttention
from segq.worker.engines.torch_support import (
    BatchLimit,
    PrecisionError,
    encode_in_batches,
    resolve_precision,
)
from tests.support.images import scene
from tests.support.tiny_sam import as_prompt, load_tiny_sam

#: Differently sized images (none square, none the model's size).
IMAGES = [scene(130 + 10 * i, 90 + 5 * i)[0] for i in range(4)]
PROMPT = as_prompt([(40.0, 30.0, 1)], (10.0, 10.0, 100.0, 80.0))
#: fp32 batched or not, SDPA or not: the same sums in another order.
FP32_LOGIT_TOLERANCE = 1e-5
#: bf16 autocast in the encoder against fp32 (the decoder runs fp32 in both).
BF16_MIN_IOU = 0.98


def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **options: object) -> SamEngine:
    sam = load_tiny_sam(tmp_path, monkeypatch)
    # segment_anything starts relative positions at zero, which would hide
    # an attention that drops them; trained weights have them, so do these.
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return SamEngine(sam, "sam_tiny_test", encoder_options=EncoderOptions(**options))  # type: ignore[arg-type]


def masks_of(
    sam_engine: SamEngine, images: Sequence[npt.NDArray[np.uint8]], batched: bool
) -> list[Candidate]:
    if batched:
        sam_engine.encode_images(images)
    return [sam_engine.segment(image, PROMPT, multimask=False)[0] for image in images]


def iou(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture
def reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Candidate]:
    """segment_anything's own attention, fp32, one image at a time."""
    alone = masks_of(
        engine(tmp_path, monkeypatch, precision=Precision.FP32, sdpa=False), IMAGES, False
    )
    # Random weights still make masks with both sides: the comparisons below can fail.
    assert all(0.05 < candidate.mask.mean() < 0.95 for candidate in alone)
    return alone


def assert_same_masks(expected: list[Candidate], found: list[Candidate], tolerance: float) -> None:
    for one, other in zip(expected, found, strict=True):
        assert one.logits is not None and other.logits is not None
        assert np.abs(one.logits - other.logits).max() <= tolerance
        assert iou(one.mask, other.mask) >= 0.999
        assert one.score == pytest.approx(other.score, abs=1e-5)


@pytest.mark.model
def test_a_batch_gives_each_image_the_masks_it_gets_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: list[Candidate]
) -> None:
    batching = engine(tmp_path, monkeypatch, precision=Precision.FP32, batch_size=4)
    calls: list[int] = []
    encoder = batching._predictor.model.image_encoder
    encoder.register_forward_hook(lambda _module, args, _out: calls.append(args[0].shape[0]))
    found = masks_of(batching, IMAGES, batched=True)
    assert calls == [4]  # one encoder call for the four images, none after
    assert_same_masks(reference, found, FP32_LOGIT_TOLERANCE)


@pytest.mark.model
def test_sdpa_attention_matches_segment_anythings_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: list[Candidate]
) -> None:
    fused = engine(tmp_path, monkeypatch, precision=Precision.FP32, sdpa=True)
    attention = [
        type(m)
        for m in fused._predictor.model.image_encoder.modules()
        if "Attention" in type(m).__name__
    ]
    assert attention and set(attention) == {SdpaAttention}
    assert_same_masks(reference, masks_of(fused, IMAGES, False), FP32_LOGIT_TOLERANCE)


@pytest.mark.model
def test_bf16_masks_agree_with_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: list[Candidate]
) -> None:
    bf16 = engine(tmp_path, monkeypatch, precision=Precision.BF16, batch_size=4)
    seen: list[torch.dtype] = []
    bf16._predictor.model.image_encoder.blocks[0].attn.qkv.register_forward_hook(
        lambda _module, _args, out: seen.append(out.dtype)
    )
    found = masks_of(bf16, IMAGES, batched=True)
    assert seen == [torch.bfloat16]  # autocast did run the encoder in bf16
    for one, other in zip(reference, found, strict=True):
        assert iou(one.mask, other.mask) >= BF16_MIN_IOU
        assert one.logits is not None and other.logits is not None
        assert not np.array_equal(one.logits, other.logits)


@pytest.mark.model
def test_precision_is_checked_against_the_device_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_precision(Precision.AUTO, "cpu") == Precision.FP32
    assert resolve_precision(Precision.BF16, "cpu") == Precision.BF16
    with pytest.raises(PrecisionError, match="fp16 is not supported on cpu"):
        resolve_precision(Precision.FP16, "cpu")
    with pytest.raises(PrecisionError, match="fp16"):
        engine(tmp_path, monkeypatch, precision=Precision.FP16)


@pytest.mark.model
def test_compiled_encoder_is_warmed_up_for_each_batch_size_before_use(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reference: list[Candidate],
) -> None:
    # Inductor's code generation takes minutes on two cores (178 s for this
    # tiny model here); Dynamo's capture with the eager backend is what segq
    # sets up, at test speed.
    compiled_with: list[object] = []
    real_compile = torch.compile

    def compile_eagerly(model: torch.nn.Module) -> object:
        compiled_with.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    caplog.set_level(logging.INFO, logger="segq.worker.engines.sam_encoder")
    compiled = engine(tmp_path, monkeypatch, precision=Precision.FP32, batch_size=4, compile=True)
    assert compiled_with == [compiled._predictor.model.image_encoder]
    assert "compiled the image encoder for batches up to 4 in" in caplog.text
    assert_same_masks(reference, masks_of(compiled, IMAGES, batched=True), FP32_LOGIT_TOLERANCE)


@pytest.mark.model
def test_an_image_encoded_in_a_batch_is_not_encoded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batching = engine(tmp_path, monkeypatch, precision=Precision.FP32, batch_size=2)
    calls: list[int] = []
    batching._predictor.model.image_encoder.register_forward_hook(
        lambda _module, args, _out: calls.append(args[0].shape[0])
    )
    # Five images with two the same, two at a time: batches of 2 and 2.
    masks_of(batching, [*IMAGES, IMAGES[0]], batched=True)
    assert calls == [2, 2]


def out_of_memory_above(limit: int, calls: list[int]):  # type: ignore[no-untyped-def]
    def encode(batch: Sequence[int]) -> list[int]:
        calls.append(len(batch))
        if len(batch) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return [value * 10 for value in batch]

    return encode


def test_a_batch_that_runs_out_of_memory_is_halved_and_the_size_remembered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An in-process Celery worker of an earlier test may have raised the
    # root logger's level; this logger's own level decides.
    caplog.set_level(logging.WARNING, logger="segq.worker.engines.torch_support")
    calls: list[int] = []
    limit = BatchLimit(8)
    freed: list[bool] = []
    out = encode_in_batches(
        out_of_memory_above(3, calls), list(range(11)), limit, lambda: freed.append(True)
    )
    assert out == [value * 10 for value in range(11)]  # every input, in order, once
    assert calls == [8, 4, 2, 2, 2, 2, 2, 1]
    assert limit.size == 2 and len(freed) == 2
    assert "ran out of GPU memory at a batch of 8" in caplog.text
    calls.clear()
    encode_in_batches(out_of_memory_above(3, calls), list(range(4)), limit)
    assert calls == [2, 2]  # the smaller size holds for later batches


def test_a_single_image_that_does_not_fit_raises() -> None:
    with pytest.raises(torch.OutOfMemoryError):
        encode_in_batches(out_of_memory_above(0, []), [1, 2], BatchLimit(2))


@pytest.mark.model
def test_the_engine_halves_its_batch_on_out_of_memory_and_keeps_every_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: list[Candidate]
) -> None:
    batching = engine(tmp_path, monkeypatch, precision=Precision.FP32, batch_size=4)

    def no_room_above_two(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")

    batching._predictor.model.image_encoder.register_forward_pre_hook(no_room_above_two)
    found = masks_of(batching, IMAGES, batched=True)
    assert batching.batch_size == 2
    assert_same_masks(reference, found, FP32_LOGIT_TOLERANCE)
