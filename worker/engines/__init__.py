"""Engines behind one interface (``base.SegmentationEngine``), chosen by settings.

Importing this package does not import torch: only a SAM, SAM 2 or SAM 3 engine does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from segq.engine_catalogue import (
    DEFAULT_MODEL_ENGINE,
    ENGINE_NAMES,
    GRABCUT,
    MODEL_ENGINES_BY_NAME,
    MODEL_FREE_ENGINES,
    SNAPSHOT_ENGINES_BY_NAME,
    EngineFamily,
)
from segq.worker.engines.base import SegmentationEngine
from segq.worker.engines.encoder_options import EncoderOptions

if TYPE_CHECKING:
    from segq.worker.engines.embedding_cache import EmbeddingCache


class EngineConfigError(ValueError):
    """The settings name an engine that cannot be run."""


@dataclass(frozen=True)
class EngineChoice:
    name: str
    checkpoint: Path | None


def resolve_engine(model: str | None, checkpoint: str | None, weights_dir: Path) -> EngineChoice:
    """Which engine to run: SAM when a checkpoint is configured or found in
    ``weights_dir`` (where ``segq weights download`` puts it), GrabCut otherwise."""
    from segq.worker.weights import official_checkpoint_path

    if model is None:
        default = MODEL_ENGINES_BY_NAME[DEFAULT_MODEL_ENGINE]
        if checkpoint is not None:
            return EngineChoice(default.name, Path(checkpoint))
        found = official_checkpoint_path(default.checkpoint_name, weights_dir)
        if found.is_file():
            return EngineChoice(default.name, found)
        return EngineChoice(GRABCUT, None)
    if model in MODEL_FREE_ENGINES:
        return EngineChoice(model, None)
    snapshot = SNAPSHOT_ENGINES_BY_NAME.get(model)
    if snapshot is not None:
        # A directory, checked (file by file) when the engine loads.
        directory = Path(checkpoint) if checkpoint else weights_dir / snapshot.directory_name
        if not directory.exists():
            raise EngineConfigError(
                f"SEGQ_MODEL={model} needs the {snapshot.repository} snapshot (a directory): "
                f"none at {directory}; see `segq weights` or set SEGQ_MODEL_CHECKPOINT"
            )
        return EngineChoice(model, directory)
    engine = MODEL_ENGINES_BY_NAME.get(model)
    if engine is None:
        raise EngineConfigError(
            f"unknown SEGQ_MODEL {model!r}; choose one of {', '.join(ENGINE_NAMES)}"
        )
    if checkpoint is not None:
        return EngineChoice(model, Path(checkpoint))
    found = official_checkpoint_path(engine.checkpoint_name, weights_dir)
    if not found.is_file():
        raise EngineConfigError(
            f"SEGQ_MODEL={model} needs a checkpoint: run "
            f"`segq weights download {engine.checkpoint_name}` or set SEGQ_MODEL_CHECKPOINT"
        )
    return EngineChoice(model, found)


def load_engine(
    choice: EngineChoice,
    device: str,
    embeddings: EmbeddingCache | None = None,
    encoder_options: EncoderOptions | None = None,
) -> SegmentationEngine:
    """Build the engine; for SAM and SAM 2 this loads the model (once per
    process), readies its image encoder as ``encoder_options`` say
    (precision, batch, compilation) and keeps its image embeddings in
    ``embeddings`` under the
    checkpoint's digest."""
    if choice.name == GRABCUT:
        from segq.worker.engines.grabcut import GrabCutEngine

        return GrabCutEngine()
    if choice.name == "benchmark_fixed_mask":
        from segq.worker.engines.fixed_mask import BenchmarkFixedMaskEngine

        return BenchmarkFixedMaskEngine()
    from segq.worker.engines.embedding_cache import checkpoint_digest, model_id

    assert choice.checkpoint is not None
    checkpoint = choice.checkpoint

    def cache_key() -> str | None:
        # Called after the model loaded (a bad checkpoint is named by the
        # loader), and only where a cache will key embeddings by it.
        return None if embeddings is None else model_id(choice.name, checkpoint_digest(checkpoint))

    if choice.name in SNAPSHOT_ENGINES_BY_NAME:
        from segq.worker.engines.sam3 import Sam3Engine, load_sam3
        from segq.worker.weights import snapshot_digest

        models = load_sam3(checkpoint, device)
        # Keyed by the snapshot's files, read after they loaded.
        digest = None if embeddings is None else snapshot_digest(checkpoint)
        return Sam3Engine(
            models,
            choice.name,
            embeddings=embeddings,
            model_id=None if digest is None else model_id(choice.name, digest),
            encoder_options=encoder_options,
        )
    # A name outside the catalogue is a SAM architecture registered by its
    # caller (tests register tiny ones); load_sam names an unknown one.
    catalogued = MODEL_ENGINES_BY_NAME.get(choice.name)
    if catalogued is not None and catalogued.family is EngineFamily.SAM2:
        from segq.worker.engines.sam2 import Sam2Engine, load_sam2

        return Sam2Engine(
            load_sam2(choice.name, choice.checkpoint, device),
            choice.name,
            embeddings=embeddings,
            model_id=cache_key(),
            encoder_options=encoder_options,
        )
    from segq.worker.engines.sam import SamEngine, load_sam

    return SamEngine(
        load_sam(
            catalogued.architecture if catalogued else choice.name.removeprefix("sam_"),
            choice.checkpoint,
            device,
        ),
        choice.name,
        embeddings=embeddings,
        model_id=cache_key(),
        encoder_options=encoder_options,
    )
