"""SAM 2 through segq equals sam2 itself: the tiny SAM 2 configuration with
random weights (fixed seed), loaded by segq's loader, against sam2's own
``build_sam2`` loader and ``SAM2ImagePredictor`` (or
``SAM2AutomaticMaskGenerator``) on the same image and prompts, on the CPU.

Tolerances: one prompt through segq is the same computation as sam2's own
call, so masks are equal pixel for pixel and scores within 1e-6. Prompts
batched into one decoder call are compared with each prompt alone: scores
within 1e-5, masks equal except where a batched matrix product rounds a
logit within float32 noise of zero (at most 0.1% of pixels). The shared
cache tier keeps float16: at most 0.1% of pixels and 1e-2 in score.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sqlalchemy.orm import Session, sessionmaker

from segq.mask_logits import decode_logits
from segq.models import JobItem
from segq.storage import S3Storage
from segq.worker.engines import EngineChoice, load_engine
from segq.worker.engines.base import Candidate, EverythingOptions, ImageBatchEngine, Prompt
from segq.worker.engines.embedding_cache import (
    EMBEDDINGS_PREFIX,
    EmbeddingCache,
    EmbeddingSource,
    checkpoint_digest,
    decode_entry,
    model_id,
)
from segq.worker.engines.encoder_options import EncoderOptions, Precision
from segq.worker.engines.item_metrics import recording_item_metrics
from segq.worker.engines.sam2 import Sam2Engine, load_sam2
from segq.worker.engines.torch_support import CheckpointError
from segq.worker.pipeline import ItemOutcome
from tests.support.harness import Tenant, run_job_item, stored_mask
from tests.support.images import png_bytes, scene
from tests.support.tiny_sam import (
    Box,
    PointList,
    as_prompt,
    assert_unreadable_checkpoints_named,
    save_tiny_sam_checkpoint,
)
from tests.support.tiny_sam2 import (
    TINY_SAM2,
    load_with_sam2,
    predictor_for,
    sam2_directly,
    save_random_sam2_checkpoint,
)

#: Each test builds a SAM-family model (make test-fast skips them).
pytestmark = pytest.mark.model

WIDTH, HEIGHT = 130, 90  # not square, so a swapped x and y cannot land where they belong
MB = 1024 * 1024

PROMPTS: list[tuple[PointList, Box, bool]] = [
    ([(97.0, 20.0, 1)], None, False),
    ([(97.0, 20.0, 1), (10.0, 80.0, 0)], None, False),
    ([], (12.0, 30.0, 70.0, 88.0), False),
    ([(40.0, 60.0, 1)], (12.0, 30.0, 70.0, 88.0), False),
    ([(97.0, 20.0, 1)], None, True),
    ([(40.0, 60.0, 1)], (12.0, 30.0, 70.0, 88.0), True),
]
PROMPT_IDS = ["point", "points", "box", "box+point", "multimask point", "multimask box+point"]

#: Several shapes, some shared, so one call makes several decoder batches.
MIXED: list[tuple[PointList, Box]] = [
    ([(97.0, 20.0, 1)], None),
    ([(97.0, 20.0, 1), (10.0, 80.0, 0)], None),
    ([], (12.0, 30.0, 70.0, 88.0)),
    ([(40.0, 60.0, 1)], (12.0, 30.0, 70.0, 88.0)),
    ([], (60.0, 10.0, 125.0, 60.0)),
    ([(30.0, 30.0, 1)], None),
    ([(110.0, 70.0, 1)], None),
]


@pytest.fixture(scope="module")
def image() -> npt.NDArray[np.uint8]:
    return scene(WIDTH, HEIGHT)[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_sam2_checkpoint(tmp_path_factory.mktemp("sam2") / "tiny.pt", seed=3)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> SAM2Base:
    """Loaded by segq."""
    return load_sam2(TINY_SAM2, checkpoint, "cpu")


@pytest.fixture(scope="module")
def encodes(model: SAM2Base) -> Iterator[list[int]]:
    """How many times segq's model has run its image encoder (one entry each)."""
    runs: list[int] = []
    handle = model.image_encoder.register_forward_hook(lambda *_: runs.append(1))
    yield runs
    handle.remove()


@pytest.fixture(scope="module")
def engine(model: SAM2Base) -> Sam2Engine:
    """Without a cache; keeps the embedding of the last image between tests."""
    return Sam2Engine(model, TINY_SAM2)


@pytest.fixture(scope="module")
def reference(checkpoint: Path, image: npt.NDArray[np.uint8]) -> SAM2ImagePredictor:
    """sam2 itself: its own loader and predictor, holding ``image``."""
    return predictor_for(load_with_sam2(checkpoint), image)


def test_segq_loads_the_weights_sam2_loads(
    model: SAM2Base, reference: SAM2ImagePredictor, checkpoint: Path
) -> None:
    mine, theirs = model.state_dict(), reference.model.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in mine.items():
        assert torch.equal(tensor, theirs[name]), name
    # The weights really are the saved ones, not a fresh random draw.
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    assert torch.equal(
        mine["sam_mask_decoder.iou_token.weight"], saved["sam_mask_decoder.iou_token.weight"]
    )


def assert_same_answer(
    candidates: list[Candidate],
    expected: list[tuple[npt.NDArray[np.bool_], float, npt.NDArray[np.float32]]],
    *,
    score_tolerance: float,
    pixel_tolerance: float,
) -> None:
    assert len(candidates) == len(expected)
    for candidate, (mask, score, logits) in zip(candidates, expected, strict=True):
        assert candidate.mask.shape == (HEIGHT, WIDTH) and candidate.mask.dtype == np.bool_
        assert candidate.score == pytest.approx(score, abs=score_tolerance)
        assert np.mean(candidate.mask != mask) <= pixel_tolerance
        assert candidate.logits is not None and candidate.logits.shape == (256, 256)
        np.testing.assert_allclose(candidate.logits, logits, atol=max(score_tolerance, 1e-5) * 10)


@pytest.mark.parametrize(("points", "box", "multimask"), PROMPTS, ids=PROMPT_IDS)
def test_the_engine_answers_as_sam2_does(
    engine: Sam2Engine,
    reference: SAM2ImagePredictor,
    image: npt.NDArray[np.uint8],
    points: PointList,
    box: Box,
    multimask: bool,
) -> None:
    candidates = engine.segment(image, as_prompt(points, box), multimask)
    expected = sam2_directly(reference, points, box, multimask)
    assert len(candidates) == (3 if multimask else 1)
    assert_same_answer(candidates, expected, score_tolerance=1e-6, pixel_tolerance=0.0)


@pytest.mark.parametrize("multimask", [False, True], ids=["one mask", "multimask"])
def test_many_prompts_in_one_call_answer_as_each_alone(
    engine: Sam2Engine,
    reference: SAM2ImagePredictor,
    image: npt.NDArray[np.uint8],
    multimask: bool,
) -> None:
    answers = engine.segment_batch(image, [as_prompt(p, b) for p, b in MIXED], multimask)
    assert len(answers) == len(MIXED)
    for (points, box), candidates in zip(MIXED, answers, strict=True):
        expected = sam2_directly(reference, points, box, multimask)
        assert_same_answer(candidates, expected, score_tolerance=1e-5, pixel_tolerance=1e-3)


def test_prompts_of_one_shape_share_one_predict_call(
    engine: Sam2Engine, image: npt.NDArray[np.uint8], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = engine._predictor
    batch_sizes: list[int] = []
    original = predictor.predict

    def counted_predict(*args: Any, **kwargs: Any) -> Any:
        batch_sizes.append(1 if kwargs["box"] is None else len(kwargs["box"]))
        if kwargs["point_coords"] is not None:
            batch_sizes[-1] = len(kwargs["point_coords"])
        return original(*args, **kwargs)

    monkeypatch.setattr(predictor, "predict", counted_predict)
    engine.segment_batch(image, [as_prompt(p, b) for p, b in MIXED], multimask=False)
    # Shapes: one point (3 prompts), two points, a box (2), a box with a point.
    assert sorted(batch_sizes) == [1, 1, 2, 3]


def test_the_model_tells_prompts_apart(reference: SAM2ImagePredictor) -> None:
    """What makes the comparisons worth anything: with these random weights,
    moving a prompt (x and y swapped, scaled, a box widened to the whole
    image) changes SAM 2's answer."""
    box = (12.0, 30.0, 70.0, 88.0)

    def scores(points: PointList, box: Box) -> list[float]:
        return [score for _, score, _ in sam2_directly(reference, points, box, True)]

    base = scores([(97.0, 20.0, 1)], box)
    for points, moved_box in (
        ([(20.0, 97.0, 1)], (30.0, 12.0, 88.0, 70.0)),
        ([(9.7, 2.0, 1)], (1.2, 3.0, 7.0, 8.8)),
        ([(97.0, 20.0, 1)], (0.0, 0.0, float(WIDTH), float(HEIGHT))),
    ):
        assert not np.allclose(scores(points, moved_box), base, atol=1e-5), (points, moved_box)


def test_a_mask_input_refines_as_sam2_does(
    engine: Sam2Engine, reference: SAM2ImagePredictor, image: npt.NDArray[np.uint8]
) -> None:
    [earlier] = engine.segment(image, as_prompt([], (12.0, 30.0, 70.0, 88.0)), False)
    assert earlier.logits is not None
    points: PointList = [(40.0, 60.0, 1), (100.0, 15.0, 0)]
    plain = as_prompt(points, None)
    refined = Prompt(plain.points, plain.labels, None, mask_input=earlier.logits[None])
    [candidate] = engine.segment(image, refined, False)
    expected = sam2_directly(reference, points, None, False, mask_input=earlier.logits[None])
    assert_same_answer([candidate], expected, score_tolerance=1e-6, pixel_tolerance=0.0)
    # The mask input matters: without it the answer differs.
    [unrefined] = engine.segment(image, plain, False)
    assert unrefined.score != pytest.approx(candidate.score, abs=1e-5)


def test_segment_everything_equals_sam2s_generator(
    engine: Sam2Engine, reference: SAM2ImagePredictor, image: npt.NDArray[np.uint8]
) -> None:
    options = EverythingOptions(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, max_segments=20
    )
    found = engine.segment_everything(image, options)
    generator = SAM2AutomaticMaskGenerator(
        reference.model,
        points_per_side=8,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        output_mode="binary_mask",
    )
    expected = sorted(generator.generate(image), key=lambda m: -float(m["predicted_iou"]))
    assert len(found) == len(expected) >= 2
    for candidate, mask in zip(found, expected, strict=True):
        assert candidate.score == pytest.approx(float(mask["predicted_iou"]), abs=1e-5)
        assert np.array_equal(candidate.mask, mask["segmentation"])


def segment(engine: Sam2Engine, image: npt.NDArray[np.uint8]) -> tuple[list[Candidate], Any]:
    with recording_item_metrics() as metrics:
        candidates = engine.segment(
            image, as_prompt([(40.0, 60.0, 1)], (12.0, 30.0, 70.0, 88.0)), True
        )
    return candidates, metrics


def test_cache_hits_give_the_masks_of_a_miss_and_encode_nothing(
    model: SAM2Base,
    encodes: list[int],
    engine: Sam2Engine,
    checkpoint: Path,
    storage: S3Storage,
    image: npt.NDArray[np.uint8],
) -> None:
    key_model = model_id(TINY_SAM2, checkpoint_digest(checkpoint))

    def cached_engine(cache: EmbeddingCache) -> Sam2Engine:
        return Sam2Engine(model, TINY_SAM2, embeddings=cache, model_id=key_model)

    def fresh_cache() -> EmbeddingCache:
        return EmbeddingCache(storage, max_bytes=64 * MB, ttl_seconds=3600)

    before = len(encodes)
    cache = fresh_cache()
    computed, metrics = segment(cached_engine(cache), image)
    assert metrics.embedding == EmbeddingSource.COMPUTED and len(encodes) == before + 1
    # SAM 2's whole embedding is kept: the image embedding and both finer maps.
    [stored] = list(storage.list_objects(EMBEDDINGS_PREFIX))
    assert stored.key.startswith(f"{EMBEDDINGS_PREFIX}{key_model}/")
    entry, _ = decode_entry(storage.get(stored.key))
    assert entry.features.shape == (1, 256, 64, 64)
    assert [f.shape for f in entry.high_res_features] == [(1, 32, 256, 256), (1, 64, 128, 128)]
    assert entry.original_size == (HEIGHT, WIDTH) and entry.input_size == (1024, 1024)

    # Another engine in the same process: tier 1, float32 as encoded.
    local, metrics = segment(cached_engine(cache), image)
    assert metrics.embedding == EmbeddingSource.LOCAL and len(encodes) == before + 1
    for a, b in zip(computed, local, strict=True):
        assert np.array_equal(a.mask, b.mask) and a.score == b.score

    # Another process: an empty tier 1, the same storage (float16).
    shared, metrics = segment(cached_engine(fresh_cache()), image)
    assert metrics.embedding == EmbeddingSource.SHARED and len(encodes) == before + 1
    for a, b in zip(computed, shared, strict=True):
        assert np.mean(a.mask != b.mask) <= 1e-3 and abs(a.score - b.score) <= 1e-2

    # And a miss answers as the engine without any cache.
    uncached, _ = segment(engine, image)
    for a, b in zip(computed, uncached, strict=True):
        assert np.array_equal(a.mask, b.mask) and a.score == b.score


def test_a_job_runs_on_sam2_and_refines_with_its_own_logits(
    engine: Sam2Engine,
    reference: SAM2ImagePredictor,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
) -> None:
    png = png_bytes(WIDTH, HEIGHT)  # the pixels of ``image``, so the engine holds them
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), scene(WIDTH, HEIGHT)[0]
    )
    file_id = tenant.upload(png).json["id"]
    first_body = {
        "items": [{"fileId": file_id}],
        "prompts": [{"boundingBox": {"xMin": 0.1, "yMin": 0.2, "xMax": 0.6, "yMax": 0.9}}],
        "outputs": ["mask", "logits"],
    }
    first_id = tenant.post_job(first_body).json["jobId"]
    first = run_item(sessions, storage, engine, first_id)
    assert first.result is not None, first.error_message
    [segment_answer] = first.result["segments"]
    [(mask, score, _)] = sam2_directly(
        reference, [], (0.1 * WIDTH, 0.2 * HEIGHT, 0.6 * WIDTH, 0.9 * HEIGHT), False
    )
    assert segment_answer["score"] == pytest.approx(score, abs=1e-5)
    assert np.array_equal(stored_mask(storage, segment_answer["maskKey"]), mask)
    job = tenant.get_job(first_id).json
    assert job["engine"] == TINY_SAM2 and job["status"] == "Completed"

    stored_logits = decode_logits(storage.get(segment_answer["logitsKey"]))
    refine_body = {
        "items": [{"fileId": file_id}],
        "prompts": [
            {
                "points": [{"x": 0.5, "y": 0.5, "label": 1}],
                "maskInput": {"jobId": first_id, "itemIndex": 0, "segmentIndex": 0},
            }
        ],
    }
    created = tenant.post_job(refine_body)
    assert created.status_code == 200, created.json
    refined = run_item(sessions, storage, engine, created.json["jobId"])
    assert refined.result is not None, refined.error_message
    [refined_segment] = refined.result["segments"]
    [(mask, score, _)] = sam2_directly(
        reference, [(0.5 * WIDTH, 0.5 * HEIGHT, 1)], None, False, stored_logits[None]
    )
    assert refined_segment["score"] == pytest.approx(score, abs=1e-5)
    assert np.array_equal(stored_mask(storage, refined_segment["maskKey"]), mask)


def run_item(
    sessions: sessionmaker[Session], storage: S3Storage, engine: Sam2Engine, job_id: int
) -> JobItem:
    outcome, item = run_job_item(sessions, storage, engine, job_id)
    assert outcome == ItemOutcome.COMPLETED
    return item


def test_load_engine_builds_sam2_keyed_by_its_checkpoint(
    checkpoint: Path, storage: S3Storage
) -> None:
    cache = EmbeddingCache(storage, max_bytes=64 * MB, ttl_seconds=3600)
    built = load_engine(EngineChoice(TINY_SAM2, checkpoint), "cpu", cache)
    assert isinstance(built, Sam2Engine) and built.name == TINY_SAM2
    assert built._held.model_id == model_id(TINY_SAM2, checkpoint_digest(checkpoint))


def test_bad_checkpoints_are_named_clearly(checkpoint: Path, tmp_path: Path) -> None:
    assert_unreadable_checkpoints_named(
        lambda path: load_sam2(TINY_SAM2, path, "cpu"), tmp_path, ".pt"
    )
    # A SAM (1) checkpoint is a bare state dict, not SAM 2's {"model": ...}.
    sam1 = save_tiny_sam_checkpoint(tmp_path / "sam1.pth")
    with pytest.raises(CheckpointError, match="not a SAM 2 checkpoint"):
        load_sam2(TINY_SAM2, sam1, "cpu")
    # The tiny model's weights do not fit the small one.
    with pytest.raises(CheckpointError, match="does not fit sam2_hiera_small"):
        load_sam2("sam2_hiera_small", checkpoint, "cpu")
    with pytest.raises(CheckpointError, match="unknown SAM 2 model"):
        load_sam2("sam2_hiera_huge", checkpoint, "cpu")


def test_livepeers_full_size_logits_are_sam2s_own(reference: SAM2ImagePredictor) -> None:
    """Livepeer's return_logits on SAM 2: the stored low-resolution logits
    brought to the image's size as SAM2ImagePredictor's return_logits does
    (SAM 2 stretched the image to its square, so no crop)."""
    from segq.api.peers.livepeer import full_size_logits

    full, _, low_res = reference.predict(
        point_coords=np.array([[60.0, 40.0]], dtype=np.float32),
        point_labels=np.array([1]),
        multimask_output=True,
        return_logits=True,
    )
    for index in range(full.shape[0]):
        made = full_size_logits(low_res[index], WIDTH, HEIGHT, stretched=True)
        spread = float(np.abs(full[index]).max())
        np.testing.assert_allclose(made, full[index], atol=0.01 * spread)
        # SAM's padded-square reconstruction is not SAM 2's.
        padded = full_size_logits(low_res[index], WIDTH, HEIGHT)
        assert np.abs(padded - full[index]).max() > 0.05 * spread


def test_images_encoded_as_one_batch_answer_as_each_alone(
    model: SAM2Base, encodes: list[int], engine: Sam2Engine, image: npt.NDArray[np.uint8]
) -> None:
    """encode_images runs the encoder once for the batch; each image's
    segment call then finds its features ready and answers as the image
    encoded alone (the engine fixture) does."""
    other = scene(WIDTH, HEIGHT, seed=5)[0]
    batching = Sam2Engine(model, TINY_SAM2, encoder_options=EncoderOptions(batch_size=4))
    assert isinstance(batching, ImageBatchEngine) and batching.batch_size == 4
    before = len(encodes)
    batching.encode_images([image, other, image])
    assert len(encodes) == before + 1  # two distinct images, one encoder run
    points, box, multimask = PROMPTS[3]
    prompt = as_prompt(points, box)
    for each in (image, other):
        runs = len(encodes)
        batched = batching.segment(each, prompt, multimask)
        assert len(encodes) == runs  # its features were ready
        alone = engine.segment(each, prompt, multimask)
        for a, b in zip(batched, alone, strict=True):
            assert np.mean(a.mask != b.mask) <= 1e-4 and abs(a.score - b.score) <= 1e-4
            assert a.logits is not None and b.logits is not None
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-3)


def test_bf16_masks_agree_with_fp32(model: SAM2Base, image: npt.NDArray[np.uint8]) -> None:
    """SEGQ_PRECISION=bf16 (autocast on the encoder; here on the CPU, where
    it is allowed though slower) against fp32, on random weights."""
    bf16 = Sam2Engine(model, TINY_SAM2, encoder_options=EncoderOptions(Precision.BF16))
    fp32 = Sam2Engine(model, TINY_SAM2, encoder_options=EncoderOptions(Precision.FP32))
    for points, box, multimask in PROMPTS[:4]:
        prompt = as_prompt(points, box)
        for a, b in zip(
            bf16.segment(image, prompt, multimask),
            fp32.segment(image, prompt, multimask),
            strict=True,
        ):
            union = np.logical_or(a.mask, b.mask).sum()
            iou = np.logical_and(a.mask, b.mask).sum() / union if union else 1.0
            assert iou >= 0.97  # measured: 0.983 at the least, 0.989 on average
