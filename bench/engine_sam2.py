"""What SAM 2 costs per item, and what the embedding cache saves: a SAM 2 of
the chosen size with random weights (speed does not depend on the weights),
saved as Meta's files are and loaded through segq's own loader, then

- the first item's engine time (encoding included), the mask decoder's ms
  per prompt on the held embedding, and the same image's second item from
  tier 1 (another engine, same process) and from tier 2 alone (an empty
  tier 1 over the same storage, in this process), against the first;
- segq's engine encoding several items' images as one batch
  (``encode_images``, as a worker with ``SEGQ_ENGINE_BATCH`` does) at
  several batch sizes: images/s against batch 1, in fp32 and, on CUDA,
  bf16 (``SEGQ_PRECISION``).

SAM 2 resizes every image to 1024x1024, so the image's size changes only
the cost of upscaling masks.

    python bench/engine_sam2.py [--device cpu] [--model sam2_hiera_tiny] [--prompts 3]
    python bench/engine_sam2.py --device cuda --model sam2_hiera_large --batches 1 4 8 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


from bench.encoder_batches import encoder_batch_rows, photograph_like  # noqa: E402
from segq.storage import LocalStorage  # noqa: E402
from segq.worker.engines.base import Prompt  # noqa: E402
from segq.worker.engines.embedding_cache import EmbeddingCache, checkpoint_digest, model_id  # noqa: E402
from segq.worker.engines.item_metrics import ItemMetrics, recording_item_metrics  # noqa: E402
from segq.worker.engines.sam2 import SAM2_NAMES, Sam2Engine, build_sam2_model, load_sam2  # noqa: E402

MB = 1024 * 1024


def prompt_at(index: int, width: int, height: int) -> Prompt:
    x = width * (0.2 + 0.06 * ((index * 37) % 10))
    y = height * (0.3 + 0.04 * (index % 10))
    return Prompt(
        points=np.array([[x, y]]),
        labels=np.array([1]),
        box=np.array([x - width * 0.15, y - height * 0.15, x + width * 0.15, y + height * 0.15]),
    )


def timed_item(engine: Sam2Engine, image: npt.NDArray[np.uint8], prompt: Prompt) -> ItemMetrics:
    with recording_item_metrics() as metrics:
        engine.segment(image, prompt, multimask=False)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="sam2_hiera_tiny", choices=sorted(SAM2_NAMES))
    parser.add_argument("--prompts", type=int, default=3, help="prompts timed on one embedding")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 2], help="encoder batches")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per batch size")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"model": args.model, "device": args.device}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / f"{args.model}.pt"
        torch.manual_seed(0)
        torch.save({"model": build_sam2_model(args.model).state_dict()}, checkpoint)
        model = load_sam2(args.model, checkpoint, args.device)
        key = model_id(args.model, checkpoint_digest(checkpoint))
        storage = LocalStorage(Path(scratch) / "objects", secret_key="bench")

        def cache() -> EmbeddingCache:
            return EmbeddingCache(storage, max_bytes=512 * MB, ttl_seconds=3600)

        image = photograph_like(args.width, args.height)
        prompt = prompt_at(0, args.width, args.height)
        first_cache = cache()
        engine = Sam2Engine(model, args.model, embeddings=first_cache, model_id=key)
        first = timed_item(engine, image, prompt)
        decode_ms = [
            timed_item(engine, image, prompt_at(i, args.width, args.height)).engine_ms
            for i in range(1, args.prompts + 1)
        ]
        local = timed_item(
            Sam2Engine(model, args.model, embeddings=first_cache, model_id=key), image, prompt
        )
        shared = timed_item(
            Sam2Engine(model, args.model, embeddings=cache(), model_id=key), image, prompt
        )
        results["items"] = {
            "first_item_ms": round(first.engine_ms, 1),
            "first_item_encode_ms": round(first.encode_ms, 1),
            "decode_ms_per_prompt": round(statistics.median(decode_ms), 1),
            "tier1_item_ms": round(local.engine_ms, 1),
            "tier1_speedup": round(first.engine_ms / local.engine_ms, 1),
            "tier2_item_ms": round(shared.engine_ms, 1),
            "tier2_speedup": round(first.engine_ms / shared.engine_ms, 1),
            "sources": [str(first.embedding), str(local.embedding), str(shared.embedding)],
        }

        rows = encoder_batch_rows(
            lambda options: Sam2Engine(model, args.model, encoder_options=options),
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
