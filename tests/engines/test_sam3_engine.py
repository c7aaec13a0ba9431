"""SAM 3 through segq equals transformers' SAM 3 itself: a tiny random
snapshot in facebook/sam3's layout (tests/support/tiny_sam3.py), loaded by
segq's loader, against ``Sam3Processor`` + ``Sam3Model`` +
``post_process_instance_segmentation`` (text prompts) and
``Sam3TrackerProcessor`` + ``Sam3TrackerModel`` + ``post_process_masks``
(points and boxes), each loaded on its own from the same directory, on the
same image, on the CPU.

Tolerances: one prompt through segq is the same computation as the direct
call (segq runs the backbone once and the necks and heads on its output,
as ``get_vision_features`` and ``forward(vision_embeds=...)`` do), so
masks are equal pixel for pixel, scores equal and boxes within 1e-4 px.
Images encoded as one batch: masks within 0.1% of pixels, scores 1e-5
(a batched matrix product rounds differently). The shared cache tier
keeps float16: masks within 1% of pixels, scores within 1e-2.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from transformers import Sam3Model, Sam3Processor, Sam3TrackerModel, Sam3TrackerProcessor

from segq.storage import S3Storage
from segq.worker.engines import EngineChoice, EngineConfigError, load_engine, resolve_engine
from segq.worker.engines.base import (
    Candidate,
    Concept,
    ConceptUnsupported,
    ImageBatchEngine,
    Prompt,
    segment_prompts,
)
from segq.worker.engines.embedding_cache import (
    EMBEDDINGS_PREFIX,
    EmbeddingCache,
    EmbeddingSource,
    decode_entry,
    model_id,
)
from segq.worker.engines.encoder_options import EncoderOptions
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.engines.item_metrics import recording_item_metrics
from segq.worker.engines.sam3 import Sam3Engine, Sam3Models, load_sam3
from segq.worker.engines.torch_support import CheckpointError
from segq.worker.weights import snapshot_digest
from tests.support.images import scene
from tests.support.tiny_sam3 import IMAGE_SIZE, config_json, save_tiny_sam3

WIDTH, HEIGHT = 130, 90  # not square, so a swapped x and y cannot land where they belong
MB = 1024 * 1024
SCORE_THRESHOLD, MASK_THRESHOLD = 0.3, 0.5
EXEMPLARS = [[10.0, 10.0, 60.0, 50.0], [70.0, 40.0, 120.0, 80.0]]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sam3(tmp_path_factory.mktemp("sam3") / "sam3")


@pytest.fixture(scope="module")
def models(snapshot: Path) -> Sam3Models:
    return load_sam3(snapshot, "cpu")


@pytest.fixture(scope="module")
def encodes(models: Sam3Models) -> list[int]:
    """One entry per image the shared backbone encodes (its batch size)."""
    seen: list[int] = []
    models.detector.vision_encoder.backbone.register_forward_hook(
        lambda _module, inputs, _output: seen.append(int(inputs[0].shape[0]))
    )
    return seen


@pytest.fixture(scope="module")
def engine(models: Sam3Models, encodes: list[int]) -> Sam3Engine:
    return Sam3Engine(models, "sam3")


@pytest.fixture(scope="module")
def detector(snapshot: Path) -> tuple[Sam3Model, Sam3Processor]:
    # from_pretrained leaves a model in eval mode.
    model = Sam3Model.from_pretrained(snapshot, local_files_only=True)
    return model, Sam3Processor.from_pretrained(snapshot, local_files_only=True)


@pytest.fixture(scope="module")
def tracker(snapshot: Path) -> tuple[Sam3TrackerModel, Sam3TrackerProcessor]:
    model = Sam3TrackerModel.from_pretrained(snapshot, local_files_only=True)
    return model, Sam3TrackerProcessor.from_pretrained(snapshot, local_files_only=True)


@pytest.fixture(scope="module")
def image() -> npt.NDArray[np.uint8]:
    return scene(WIDTH, HEIGHT)[0]


def concept(
    text: str,
    boxes: list[list[float]] | None = None,
    labels: list[int] | None = None,
    *,
    score_threshold: float = SCORE_THRESHOLD,
    max_segments: int = 256,
) -> Concept:
    return Concept(
        text=text,
        exemplar_boxes=np.array(boxes or [], dtype=np.float64).reshape(-1, 4),
        exemplar_labels=np.array(labels or [], dtype=np.int64),
        score_threshold=score_threshold,
        mask_threshold=MASK_THRESHOLD,
        max_segments=max_segments,
    )


def sam3_directly(
    detector: tuple[Sam3Model, Sam3Processor],
    image: npt.NDArray[np.uint8],
    text: str,
    boxes: list[list[float]] | None = None,
    labels: list[int] | None = None,
) -> list[tuple[npt.NDArray[np.bool_], float, npt.NDArray[np.float64]]]:
    """transformers' own SAM 3 text prompt, instances sorted by score."""
    model, processor = detector
    extra: dict[str, Any] = {}
    if boxes:
        extra = {"input_boxes": [boxes], "input_boxes_labels": [labels]}
    with torch.inference_mode():
        inputs = processor(images=image, text=text, return_tensors="pt", **extra)
        outputs = model(**inputs)
        post_process: Any = processor.post_process_instance_segmentation
        [found] = post_process(
            outputs,
            threshold=SCORE_THRESHOLD,
            mask_threshold=MASK_THRESHOLD,
            target_sizes=inputs["original_sizes"].tolist(),
        )
    order = torch.argsort(-found["scores"], stable=True).tolist()
    return [
        (
            found["masks"][i].bool().numpy(),
            float(found["scores"][i]),
            found["boxes"][i].double().numpy(),
        )
        for i in order
    ]


def assert_same_instances(
    got: list[Candidate],
    expected: list[tuple[npt.NDArray[np.bool_], float, npt.NDArray[np.float64]]],
) -> None:
    assert len(got) == len(expected)
    for candidate, (mask, score, box) in zip(got, expected, strict=True):
        assert np.array_equal(candidate.mask, mask)
        assert candidate.score == pytest.approx(score, abs=1e-6)
        assert candidate.box is not None and np.allclose(candidate.box, box, atol=1e-4)
    assert [c.score for c in got] == sorted((c.score for c in got), reverse=True)


def test_a_phrase_finds_what_sam3_finds(
    engine: Sam3Engine,
    detector: tuple[Sam3Model, Sam3Processor],
    image: npt.NDArray[np.uint8],
) -> None:
    [found] = engine.segment_concepts(image, [concept("cat")])
    expected = sam3_directly(detector, image, "cat")
    # The tiny model's instances fall on both sides of the threshold.
    assert 0 < len(expected) < 12
    assert_same_instances(found, expected)
    for candidate in found:
        assert candidate.mask.shape == (HEIGHT, WIDTH)
        assert candidate.logits is not None and candidate.logits.shape == (
            IMAGE_SIZE // 14 * 4,
            IMAGE_SIZE // 14 * 4,
        )


def test_positive_and_negative_exemplars_answer_as_sam3(
    engine: Sam3Engine,
    detector: tuple[Sam3Model, Sam3Processor],
    image: npt.NDArray[np.uint8],
) -> None:
    [found] = engine.segment_concepts(image, [concept("red car", EXEMPLARS, [1, 0])])
    expected = sam3_directly(detector, image, "red car", EXEMPLARS, [1, 0])
    assert_same_instances(found, expected)
    # The exemplars change the answer: the same phrase without them differs.
    without = sam3_directly(detector, image, "red car")
    assert [s for _, s, _ in without] != [s for _, s, _ in expected]


def test_several_phrases_share_one_encoding(
    engine: Sam3Engine,
    encodes: list[int],
    detector: tuple[Sam3Model, Sam3Processor],
    image: npt.NDArray[np.uint8],
) -> None:
    phrases = ["cat", "dog", "person"]
    # Another image held first, so this image is encoded here: once.
    engine.segment_concepts(scene(WIDTH, HEIGHT, seed=5)[0], [concept("tree")])
    before = len(encodes)
    with recording_item_metrics() as metrics:
        answers = engine.segment_concepts(image, [concept(p) for p in phrases])
    assert encodes[before:] == [1]
    assert metrics.embedding == EmbeddingSource.COMPUTED
    for phrase, found in zip(phrases, answers, strict=True):
        assert_same_instances(found, sam3_directly(detector, image, phrase))
    # The phrases are told apart.
    assert len({tuple(c.score for c in found) for found in answers}) == len(phrases)
    # A later phrase on the held image encodes nothing.
    before = len(encodes)
    [again] = engine.segment_concepts(image, [concept("dog")])
    assert len(encodes) == before
    assert_same_instances(again, sam3_directly(detector, image, "dog"))


def test_thresholds_and_max_segments_bound_the_instances(
    engine: Sam3Engine, image: npt.NDArray[np.uint8]
) -> None:
    [everything, capped, none] = engine.segment_concepts(
        image,
        [
            concept("cat", score_threshold=0.0),
            concept("cat", score_threshold=0.0, max_segments=3),
            concept("cat", score_threshold=0.999),
        ],
    )
    assert len(everything) == 12  # every query of the tiny detector
    assert [c.score for c in capped] == [c.score for c in everything[:3]]
    assert none == []


def tracker_directly(
    tracker: tuple[Sam3TrackerModel, Sam3TrackerProcessor],
    image: npt.NDArray[np.uint8],
    points: list[tuple[float, float, int]],
    box: tuple[float, float, float, float] | None,
    multimask: bool,
) -> list[tuple[npt.NDArray[np.bool_], float]]:
    """Sam3TrackerModel on its own (its own copy of the backbone)."""
    model, processor = tracker
    extra: dict[str, Any] = {}
    if points:
        extra["input_points"] = [[[[x, y] for x, y, _ in points]]]
        extra["input_labels"] = [[[label for _, _, label in points]]]
    if box is not None:
        extra["input_boxes"] = [[list(box)]]
    with torch.inference_mode():
        inputs = processor(images=image, return_tensors="pt", **extra)
        outputs = model(**inputs, multimask_output=multimask)
        post_process: Any = processor.post_process_masks
        [masks] = post_process(outputs.pred_masks, inputs["original_sizes"])
    scores = outputs.iou_scores[0, 0]
    order = torch.argsort(-scores, stable=True).tolist()
    return [(masks[0, i].bool().numpy(), float(scores[i])) for i in order]


TRACKER_PROMPTS: list[tuple[list[tuple[float, float, int]], Any, bool]] = [
    ([(97.0, 20.0, 1), (10.0, 80.0, 0)], None, False),
    ([], (12.0, 30.0, 70.0, 88.0), False),
    ([(40.0, 60.0, 1)], (12.0, 30.0, 70.0, 88.0), True),
    ([(97.0, 20.0, 1), (10.0, 80.0, 0)], None, True),
]


@pytest.mark.parametrize(
    ("points", "box", "multimask"),
    TRACKER_PROMPTS,
    ids=["points", "box", "multimask box+point", "multimask points"],
)
def test_points_and_boxes_answer_as_sam3s_tracker_alone(
    engine: Sam3Engine,
    tracker: tuple[Sam3TrackerModel, Sam3TrackerProcessor],
    image: npt.NDArray[np.uint8],
    points: list[tuple[float, float, int]],
    box: tuple[float, float, float, float] | None,
    multimask: bool,
) -> None:
    prompt = Prompt(
        points=np.array([[x, y] for x, y, _ in points], dtype=np.float64).reshape(-1, 2),
        labels=np.array([label for _, _, label in points], dtype=np.int64),
        box=None if box is None else np.array(box, dtype=np.float64),
    )
    got = engine.segment(image, prompt, multimask)
    expected = tracker_directly(tracker, image, points, box, multimask)
    if not multimask:
        expected = expected[:1]
    assert len(got) == len(expected) == (3 if multimask else 1)
    for candidate, (mask, score) in zip(got, expected, strict=True):
        assert np.array_equal(candidate.mask, mask)
        assert candidate.score == pytest.approx(score, abs=1e-6)


def test_one_backbone_serves_words_and_clicks(
    models: Sam3Models, tracker: tuple[Sam3TrackerModel, Sam3TrackerProcessor]
) -> None:
    shared = models.tracker.vision_encoder.backbone
    assert shared is models.detector.vision_encoder.backbone
    detector_tensors = {id(p) for p in models.detector.parameters()}
    own = [name for name, p in models.tracker.named_parameters() if id(p) not in detector_tensors]
    # What the tracker holds beyond the detector: its neck and heads, no ViT.
    assert own and not any(name.startswith("vision_encoder.backbone.") for name in own)
    assert any(name.startswith("vision_encoder.neck.") for name in own)
    # And the standalone tracker's backbone holds the same weights (the
    # equal masks above prove it answers the same).
    for (name, mine), (_, theirs) in zip(
        shared.state_dict().items(),
        tracker[0].vision_encoder.backbone.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(mine, theirs), name


def test_a_mixed_job_segments_words_and_clicks_in_prompt_order(
    engine: Sam3Engine,
    detector: tuple[Sam3Model, Sam3Processor],
    tracker: tuple[Sam3TrackerModel, Sam3TrackerProcessor],
    image: npt.NDArray[np.uint8],
) -> None:
    click = Prompt(np.array([[97.0, 20.0]]), np.array([1], dtype=np.int64), None)
    words = Prompt(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), None, concept=concept("dog"))
    [clicked, found] = segment_prompts(engine, image, [click, words], multimask=False)
    assert_same_instances(found, sam3_directly(detector, image, "dog"))
    [(mask, score)] = tracker_directly(tracker, image, [(97.0, 20.0, 1)], None, True)[:1]
    assert len(clicked) == 1 and np.array_equal(clicked[0].mask, mask)
    assert clicked[0].score == pytest.approx(score, abs=1e-6)


def test_text_prompts_on_another_engine_name_sam3(image: npt.NDArray[np.uint8]) -> None:
    words = Prompt(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), None, concept=concept("dog"))
    with pytest.raises(ConceptUnsupported, match=r"text prompts need SEGQ_MODEL=sam3.*grabcut"):
        segment_prompts(GrabCutEngine(), image, [words], multimask=False)


def segment_text(engine: Sam3Engine, image: npt.NDArray[np.uint8]) -> tuple[list[Candidate], Any]:
    with recording_item_metrics() as metrics:
        [found] = engine.segment_concepts(image, [concept("cat", score_threshold=0.0)])
    return found, metrics


def test_cache_hits_give_the_instances_of_a_miss_and_encode_nothing(
    models: Sam3Models,
    encodes: list[int],
    engine: Sam3Engine,
    snapshot: Path,
    storage: S3Storage,
    image: npt.NDArray[np.uint8],
) -> None:
    key_model = model_id("sam3", snapshot_digest(snapshot))

    def cached_engine(cache: EmbeddingCache) -> Sam3Engine:
        return Sam3Engine(models, "sam3", embeddings=cache, model_id=key_model)

    def fresh_cache() -> EmbeddingCache:
        return EmbeddingCache(storage, max_bytes=64 * MB, ttl_seconds=3600)

    before = len(encodes)
    cache = fresh_cache()
    computed, metrics = segment_text(cached_engine(cache), image)
    assert metrics.embedding == EmbeddingSource.COMPUTED and len(encodes) == before + 1
    # What is kept is the backbone's output, keyed by the snapshot's identity.
    [stored] = list(storage.list_objects(EMBEDDINGS_PREFIX))
    assert stored.key.startswith(f"{EMBEDDINGS_PREFIX}{key_model}/")
    entry, _ = decode_entry(storage.get(stored.key))
    grid = IMAGE_SIZE // 14
    assert entry.features.shape == (1, 32, grid, grid) and entry.high_res_features == ()
    assert entry.original_size == (HEIGHT, WIDTH) and entry.input_size == (IMAGE_SIZE,) * 2

    # Another engine in the same process: tier 1, float32 as encoded.
    local, metrics = segment_text(cached_engine(cache), image)
    assert metrics.embedding == EmbeddingSource.LOCAL and len(encodes) == before + 1
    for a, b in zip(computed, local, strict=True):
        assert np.array_equal(a.mask, b.mask) and a.score == b.score

    # Another process: an empty tier 1, the same storage (float16).
    shared, metrics = segment_text(cached_engine(fresh_cache()), image)
    assert metrics.embedding == EmbeddingSource.SHARED and len(encodes) == before + 1
    assert len(shared) == len(computed)
    for a, b in zip(computed, shared, strict=True):
        assert np.mean(a.mask != b.mask) <= 1e-2 and abs(a.score - b.score) <= 1e-2

    # And a miss answers as the engine without any cache.
    uncached, _ = segment_text(engine, image)
    for a, b in zip(computed, uncached, strict=True):
        assert np.array_equal(a.mask, b.mask) and a.score == b.score


def test_images_encoded_as_one_batch_answer_as_each_alone(
    models: Sam3Models, engine: Sam3Engine, encodes: list[int]
) -> None:
    images = [scene(WIDTH, HEIGHT)[0], np.ascontiguousarray(scene(WIDTH, HEIGHT)[0][::-1])]
    batched = Sam3Engine(models, "sam3", encoder_options=EncoderOptions(batch_size=4))
    assert isinstance(batched, ImageBatchEngine) and batched.batch_size == 4
    before = len(encodes)
    batched.encode_images(images)
    assert encodes[before:] == [2]  # one backbone call for both
    click = Prompt(np.array([[40.0, 60.0]]), np.array([1], dtype=np.int64), None)
    cat = concept("cat", score_threshold=0.0)
    answers = [
        (batched.segment_concepts(picture, [cat])[0], batched.segment(picture, click, False)[0])
        for picture in images
    ]
    assert encodes[before:] == [2]  # and no encoding after
    for picture, (found, clicked) in zip(images, answers, strict=True):
        [alone] = engine.segment_concepts(picture, [cat])
        assert len(found) == len(alone)
        for a, b in zip(found, alone, strict=True):
            assert np.mean(a.mask != b.mask) <= 1e-3 and abs(a.score - b.score) <= 1e-5
        [clicked_alone] = engine.segment(picture, click, False)
        assert np.mean(clicked.mask != clicked_alone.mask) <= 1e-3


def test_load_engine_builds_sam3_keyed_by_its_snapshot(snapshot: Path, storage: S3Storage) -> None:
    cache = EmbeddingCache(storage, max_bytes=64 * MB, ttl_seconds=3600)
    built = load_engine(EngineChoice("sam3", snapshot), "cpu", cache)
    assert isinstance(built, Sam3Engine) and built.name == "sam3"
    assert built._held.model_id == model_id("sam3", snapshot_digest(snapshot))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every connection and name lookup is refused, and recorded."""
    attempts: list[str] = []

    def refused(*args: object, **_kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise OSError("segq's tests allow no network here")

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(socket.socket, "connect", refused)
    monkeypatch.setattr(socket.socket, "connect_ex", refused)
    monkeypatch.setattr(socket, "getaddrinfo", refused)
    monkeypatch.setattr(socket, "create_connection", refused)
    return attempts


def test_loading_the_snapshot_makes_no_network_call(
    snapshot: Path, no_network: list[str], image: npt.NDArray[np.uint8]
) -> None:
    built = load_engine(EngineChoice("sam3", snapshot), "cpu")
    assert isinstance(built, Sam3Engine)
    built.segment_concepts(image, [concept("cat")])
    assert no_network == []


def test_sam3_is_chosen_by_name_with_its_snapshot_directory(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    with pytest.raises(EngineConfigError, match=r"weights/sam3 \(a snapshot of facebook/sam3\)"):
        resolve_engine("sam3", None, weights)
    (weights / "sam3").mkdir(parents=True)
    assert resolve_engine("sam3", None, weights) == EngineChoice("sam3", weights / "sam3")
    given = tmp_path / "elsewhere"
    given.mkdir()
    assert resolve_engine("sam3", str(given), weights) == EngineChoice("sam3", given)


def _copy_snapshot(snapshot: Path, into: Path) -> Path:
    into.mkdir()
    for path in snapshot.iterdir():
        (into / path.name).write_bytes(path.read_bytes())
    return into


def test_a_directory_that_is_not_a_sam3_snapshot_is_named_with_its_fault(
    snapshot: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_sam3(tmp_path / "missing", "cpu")

    no_config = _copy_snapshot(snapshot, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no-config/config\.json is missing"):
        load_sam3(no_config, "cpu")

    sam2 = _copy_snapshot(snapshot, tmp_path / "sam2")
    (sam2 / "config.json").write_text('{"model_type": "sam2"}')
    with pytest.raises(CheckpointError, match=r"config\.json has model_type 'sam2'"):
        load_sam3(sam2, "cpu")

    garbled = _copy_snapshot(snapshot, tmp_path / "garbled")
    (garbled / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not readable JSON"):
        load_sam3(garbled, "cpu")

    no_weights = _copy_snapshot(snapshot, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors file"):
        load_sam3(no_weights, "cpu")

    no_tokenizer = _copy_snapshot(snapshot, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing"):
        load_sam3(no_tokenizer, "cpu")

    truncated = _copy_snapshot(snapshot, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=r"truncated.*does not load"):
        load_sam3(truncated, "cpu")

    # Weights of another size: the config says a wider backbone.
    other = _copy_snapshot(snapshot, tmp_path / "other-size")
    config: Any = config_json(other)
    for part in ("detector_config", "tracker_config"):
        config[part]["vision_config"]["backbone_config"]["hidden_size"] = 64
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"other-size.*(does not fit|does not load)"):
        load_sam3(other, "cpu")


def test_segq_weights_explains_the_gated_snapshot_and_checks_a_directory(
    snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from segq.cli.main import main

    monkeypatch.setenv("SEGQ_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    missing = runner.invoke(main, ["weights", "sam3"])
    assert missing.exit_code != 0
    default = tmp_path / "data" / "weights" / "sam3"
    assert f"{default} is not a directory" in missing.output
    assert "gated" in missing.output and f"--local-dir {default}" in missing.output

    found = runner.invoke(main, ["weights", "sam3", "--dir", str(snapshot)])
    assert found.exit_code == 0, found.output
    assert f"SEGQ_MODEL=sam3 SEGQ_MODEL_CHECKPOINT={snapshot}" in found.output
