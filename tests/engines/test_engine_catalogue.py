"""The engine catalogue: one entry per engine, read without torch, and
everything that names engines (resolution, loading, downloads, the API's
checks) answering from it."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segq import engine_catalogue
from segq.engine_catalogue import (
    CHECKPOINT_NAMES,
    ENGINE_MODULES,
    ENGINE_NAMES,
    ENGINES,
    Capability,
    EngineEntry,
    EngineFamily,
    EngineWeights,
    WeightsLayout,
    configured_capabilities,
    lacks,
)
from segq.worker.engines import EngineChoice, EngineConfigError, load_engine, resolve_engine
from segq.worker.engines.base import Prompt
from segq.worker.engines.fixed_mask import BenchmarkFixedMaskEngine

#: Each capability the pipeline finds by an engine's methods (base.py's
#: Protocols) -> that method.
_BY_METHOD = {
    Capability.PROMPT_BATCHING: "segment_batch",
    Capability.EVERYTHING: "segment_everything",
    Capability.IMAGE_BATCHING: "encode_images",
}


def test_reading_the_catalogue_imports_no_torch() -> None:
    repo_root = Path(__file__).resolve().parents[2]
    script = (
        "import sys\n"
        "import segq.engine_catalogue, segq.worker.engines, segq.worker.weights\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["False"]


def test_names_are_unique_and_every_family_has_a_loader() -> None:
    assert len({entry.name for entry in ENGINES}) == len(ENGINES)
    assert set(ENGINE_MODULES) == set(EngineFamily)
    assert "benchmark_fixed_mask" not in ENGINE_NAMES and "grabcut" in ENGINE_NAMES
    for family, module_name in ENGINE_MODULES.items():
        module = importlib.import_module(f"segq.worker.engines.{module_name}")
        assert callable(module.build_engine), family


def test_capabilities_say_what_each_engine_class_implements() -> None:
    """The API trusts the catalogue's capabilities; the pipeline looks at
    the engine's methods. They must agree, family by family."""
    for family, module_name in ENGINE_MODULES.items():
        module = importlib.import_module(f"segq.worker.engines.{module_name}")
        # The class build_engine says it returns (a name: annotations are lazy).
        engine_class = getattr(module, inspect.signature(module.build_engine).return_annotation)
        for entry in (entry for entry in ENGINES if entry.family is family):
            for capability, method in _BY_METHOD.items():
                assert entry.can(capability) == hasattr(engine_class, method), (entry, capability)
            # Only an engine with logits says which frame they cover.
            assert (entry.logits_frame is not None) == entry.can(Capability.LOGITS)


def test_only_weights_segq_fetches_are_offered_for_download() -> None:
    fetched = {e.weights.name for e in ENGINES if e.weights and e.weights.official}
    assert set(CHECKPOINT_NAMES) == fetched
    assert all(entry.weights is None for entry in ENGINES if entry.family is EngineFamily.GRABCUT)


def test_the_api_refuses_only_what_a_known_engine_lacks() -> None:
    assert lacks("grabcut", Capability.EVERYTHING)
    assert lacks("grabcut", Capability.LOGITS)
    assert not lacks("grabcut", Capability.BOX_PROMPTS)
    assert not lacks("sam2.1_hiera_tiny", Capability.MASK_INPUT)
    # Unset or unknown: the worker chooses (or refuses to start), so the
    # API refuses nothing on its behalf.
    assert configured_capabilities(None) is None and not lacks(None, Capability.EVERYTHING)
    assert not lacks("no_such_engine", Capability.LOGITS)


def test_a_new_engine_is_one_entry_and_its_family_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine whose weights are a folder that segq does not fetch (as a
    Hugging Face model is saved), of a family whose module is already
    there: one catalogue entry makes it resolvable, loadable and checked."""
    entry = EngineEntry(
        "folder_model",
        EngineFamily.BENCHMARK,
        frozenset({Capability.BOX_PROMPTS, Capability.TEXT_PROMPTS}),
        weights=EngineWeights(
            "folder_model", "folder-model", WeightsLayout.DIRECTORY, hub_repository="acme/folder"
        ),
    )
    monkeypatch.setitem(engine_catalogue.ENGINES_BY_NAME, entry.name, entry)

    with pytest.raises(
        EngineConfigError, match=r"folder-model \(a snapshot of acme/folder\) or set SEGQ_MODEL_"
    ):
        resolve_engine("folder_model", None, tmp_path)
    # A file of that name is not the folder it needs.
    (tmp_path / "folder-model").write_bytes(b"x")
    with pytest.raises(EngineConfigError, match="needs its weights"):
        resolve_engine("folder_model", None, tmp_path)
    (tmp_path / "folder-model").unlink()
    (tmp_path / "folder-model").mkdir()
    choice = resolve_engine("folder_model", None, tmp_path)
    assert choice == EngineChoice("folder_model", tmp_path / "folder-model")

    engine = load_engine(choice, "cpu")
    assert isinstance(engine, BenchmarkFixedMaskEngine)
    box = Prompt(np.zeros((0, 2)), np.zeros(0, np.int64), np.array([0.0, 0.0, 4.0, 4.0]))
    assert len(engine.segment(np.zeros((8, 8, 3), np.uint8), box, multimask=False)) == 1
    assert lacks("folder_model", Capability.EVERYTHING)
    assert not lacks("folder_model", Capability.TEXT_PROMPTS)
