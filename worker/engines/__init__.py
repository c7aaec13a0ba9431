"""Engines behind one interface (``base.SegmentationEngine``), chosen by
settings from the catalogue (segq/engine_catalogue.py).

Each family's module (``ENGINE_MODULES``) defines ``build_engine``; it is
imported only when its engine is built, so importing this package does not
import torch: only a SAM or SAM 2 engine does.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from segq.engine_catalogue import (
    DEFAULT_MODEL_ENGINE,
    ENGINE_MODULES,
    ENGINE_NAMES,
    ENGINES_BY_NAME,
    FALLBACK_ENGINE,
    EngineEntry,
    EngineFamily,
    WeightsLayout,
)
from segq.worker.engines.base import EngineBuilder, EngineSetup, SegmentationEngine
from segq.worker.engines.encoder_options import EncoderOptions

if TYPE_CHECKING:
    from segq.worker.engines.embedding_cache import EmbeddingCache


class EngineConfigError(ValueError):
    """The settings name an engine that cannot be run."""


@dataclass(frozen=True)
class EngineChoice:
    name: str
    #: The checkpoint file (or weights folder); None for an engine without one.
    checkpoint: Path | None


def resolve_engine(model: str | None, checkpoint: str | None, weights_dir: Path) -> EngineChoice:
    """Which engine to run: ``model`` with its weights (``checkpoint``, or
    found in ``weights_dir``, where ``segq weights download`` puts them);
    with ``model`` unset, the default model where its weights are given or
    found, the fallback engine otherwise."""
    if model is None:
        default = ENGINES_BY_NAME[DEFAULT_MODEL_ENGINE]
        if checkpoint is not None:
            return EngineChoice(default.name, Path(checkpoint))
        found = _found_weights(default, weights_dir)
        return EngineChoice(default.name, found) if found else EngineChoice(FALLBACK_ENGINE, None)
    entry = ENGINES_BY_NAME.get(model)
    if entry is None:
        raise EngineConfigError(
            f"unknown SEGQ_MODEL {model!r}; choose one of {', '.join(ENGINE_NAMES)}"
        )
    if entry.weights is None:
        return EngineChoice(model, None)
    if checkpoint is not None:
        return EngineChoice(model, Path(checkpoint))
    found = _found_weights(entry, weights_dir)
    if found is None:
        fetch = (
            f"run `segq weights download {entry.weights.name}`"
            if entry.weights.official is not None
            else f"put them at {weights_dir / entry.weights.local_name}"
        )
        if entry.weights.hub_repository is not None:
            fetch += f" (a snapshot of {entry.weights.hub_repository})"
        raise EngineConfigError(
            f"SEGQ_MODEL={model} needs its weights: {fetch} or set SEGQ_MODEL_CHECKPOINT"
        )
    return EngineChoice(model, found)


def _found_weights(entry: EngineEntry, weights_dir: Path) -> Path | None:
    assert entry.weights is not None
    path = weights_dir / entry.weights.local_name
    present = path.is_dir() if entry.weights.layout is WeightsLayout.DIRECTORY else path.is_file()
    return path if present else None


def load_engine(
    choice: EngineChoice,
    device: str,
    embeddings: EmbeddingCache | None = None,
    encoder_options: EncoderOptions | None = None,
) -> SegmentationEngine:
    """Build the engine with its family's ``build_engine``; a model is
    loaded once per process, its image encoder readied as
    ``encoder_options`` say (precision, batch, compilation), and its image
    embeddings kept in ``embeddings`` under the weights' digest."""
    entry = ENGINES_BY_NAME.get(choice.name) or _registered_sam(choice.name)
    module = importlib.import_module(f"{__name__}.{ENGINE_MODULES[entry.family]}")
    build = cast(EngineBuilder, module.build_engine)
    setup = EngineSetup(device, embeddings, encoder_options or EncoderOptions())
    return build(entry, choice.checkpoint, setup)


def _registered_sam(name: str) -> EngineEntry:
    """A name outside the catalogue is a SAM architecture its caller added
    to ``sam.SAM_ARCHITECTURES`` (tests add tiny ones): ``sam_<architecture>``;
    SAM's loader names one it does not know."""
    sam = ENGINES_BY_NAME[DEFAULT_MODEL_ENGINE]
    assert sam.family is EngineFamily.SAM
    return EngineEntry(
        name,
        sam.family,
        sam.capabilities,
        architecture=name.removeprefix("sam_"),
        logits_frame=sam.logits_frame,
    )
