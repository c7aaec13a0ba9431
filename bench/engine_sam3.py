"""What SAM 3 costs per item, and what one image encoding saves for every
later phrase: SAM 3 of facebook/sam3's own sizes (transformers' config
defaults: a 32-layer ViT at 1008x1008, a 24-layer CLIP text encoder, 200
detector queries) with random weights (speed does not depend on the
weights), built in memory as segq's loader leaves it (the tracker on the
detector's backbone), then

- the first text prompt on an image (vision encoding included) and the
  encoding's share of it;
- ms per additional phrase on the encoded image (each a new phrase, so its
  text encoding is counted), and the second phrase against the first;
- a click (tracker) on the encoded image;
- the same image's phrase from tier 1 (another engine, same process) and
  from tier 2 alone (an empty tier 1 over the same storage), against the
  first;
- on CUDA: ``encode_images`` at several batch sizes in fp32 and bf16, with
  peak memory.

    python bench/engine_sam3.py [--device cpu] [--phrases 3]
    python bench/engine_sam3.py --device cuda --batches 1 4 8 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from transformers import (  # noqa: E402
    Sam3ImageProcessor,
    Sam3Model,
    Sam3Processor,
    Sam3TrackerModel,
    Sam3TrackerProcessor,
    Sam3VideoConfig,
)

from bench.encoder_batches import encoder_batch_rows, photograph_like, synchronize  # noqa: E402
from segq.storage import LocalStorage  # noqa: E402
from segq.worker.engines.base import Concept, Prompt  # noqa: E402
from segq.worker.engines.embedding_cache import EmbeddingCache  # noqa: E402
from segq.worker.engines.item_metrics import ItemMetrics, recording_item_metrics  # noqa: E402
from segq.worker.engines.sam3 import Sam3Engine, Sam3Models  # noqa: E402
from tests.support.tiny_sam3 import tiny_tokenizer  # noqa: E402

MB = 1024 * 1024
PHRASES = ("person", "car", "tree", "dog", "cat", "red car", "the tree")


def real_size_models(device: str) -> Sam3Models:
    """facebook/sam3's architecture at its config defaults, random weights,
    one backbone shared as ``load_sam3`` shares it. The tokenizer is a tiny
    one (tokenizing costs microseconds; the text encoder is full size)."""
    # transformers types sub-configs loosely; these are the classes' own.
    config: Any = Sam3VideoConfig()
    torch.manual_seed(0)
    detector: Any = Sam3Model(config.detector_config)
    tracker: Any = Sam3TrackerModel(config.tracker_config)
    tracker.vision_encoder.backbone = detector.vision_encoder.backbone
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=tiny_tokenizer())
    tracker_processor = Sam3TrackerProcessor(image_processor=Sam3ImageProcessor())
    return Sam3Models(
        detector=detector.to(device).eval(),
        tracker=tracker.to(device).eval(),
        processor=processor,
        tracker_processor=tracker_processor,
    )


def unique_parameters(models: Sam3Models) -> list[torch.nn.Parameter]:
    """Every tensor held once: the shared backbone counts once."""
    kept = {id(p): p for m in (models.detector, models.tracker) for p in m.parameters()}
    return list(kept.values())


def phrase(text: str) -> Concept:
    return Concept(text, np.zeros((0, 4)), np.zeros(0, dtype=np.int64), 0.3, 0.5, 256)


def timed_phrase(engine: Sam3Engine, image: npt.NDArray[np.uint8], text: str) -> ItemMetrics:
    with recording_item_metrics() as metrics:
        engine.segment_concepts(image, [phrase(text)])
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--phrases", type=int, default=3, help="later phrases timed")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--batches", type=int, nargs="*", default=[], help="encoder batches")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per batch size")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    models = real_size_models(args.device)
    results: dict[str, Any] = {
        "model": "sam3 (facebook/sam3 sizes, random weights)",
        "device": args.device,
        "build_s": round(time.perf_counter() - started, 1),
        "parameters_m": round(sum(p.numel() for p in unique_parameters(models)) / 1e6, 1),
    }
    image = photograph_like(args.width, args.height)
    with tempfile.TemporaryDirectory() as scratch:
        storage = LocalStorage(Path(scratch) / "objects", secret_key="bench")

        def cache() -> EmbeddingCache:
            return EmbeddingCache(storage, max_bytes=512 * MB, ttl_seconds=3600)

        first_cache = cache()
        key = "sam3-bench"
        engine = Sam3Engine(models, "sam3", embeddings=first_cache, model_id=key)
        first = timed_phrase(engine, image, PHRASES[0])
        later = [
            timed_phrase(engine, image, PHRASES[1 + i % (len(PHRASES) - 1)]).engine_ms
            for i in range(args.phrases)
        ]
        click = Prompt(np.array([[args.width * 0.4, args.height * 0.5]]), np.array([1]), None)
        click_ms = []
        for _ in range(3):
            synchronize(args.device)
            t = time.perf_counter()
            engine.segment(image, click, multimask=False)
            synchronize(args.device)
            click_ms.append((time.perf_counter() - t) * 1000)
        local = timed_phrase(
            Sam3Engine(models, "sam3", embeddings=first_cache, model_id=key), image, PHRASES[0]
        )
        shared = timed_phrase(
            Sam3Engine(models, "sam3", embeddings=cache(), model_id=key), image, PHRASES[0]
        )
        per_phrase = statistics.median(later)
        results["items"] = {
            "first_phrase_ms": round(first.engine_ms, 1),
            "vision_encode_ms": round(first.encode_ms, 1),
            "ms_per_additional_phrase": round(per_phrase, 1),
            "second_phrase_speedup": round(first.engine_ms / per_phrase, 1),
            "click_ms": round(statistics.median(click_ms), 1),
            "tier1_item_ms": round(local.engine_ms, 1),
            "tier1_speedup": round(first.engine_ms / local.engine_ms, 1),
            "tier2_item_ms": round(shared.engine_ms, 1),
            "tier2_speedup": round(first.engine_ms / shared.engine_ms, 1),
            "sources": [str(first.embedding), str(local.embedding), str(shared.embedding)],
        }
        print(json.dumps(results["items"]), flush=True)

    rows = encoder_batch_rows(
        lambda options: Sam3Engine(models, "sam3", encoder_options=options),
        args.batches,
        args.width,
        args.height,
        args.device,
        args.repeat,
    )
    results["encoder_batches"] = rows
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
