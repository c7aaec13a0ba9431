"""The model engines segq can run (``SEGQ_MODEL``) and the official
checkpoints they load, written once: the worker builds its engine from an
entry, ``segq weights download`` fetches an entry's checkpoint, and the API
asks what the configured engine is. Imports no torch, so the command line
and the API read it freely."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EngineFamily(StrEnum):
    SAM = "SAM"
    SAM2 = "SAM 2"
    SAM3 = "SAM 3"
    GRABCUT = "GrabCut"


@dataclass(frozen=True)
class OfficialCheckpoint:
    url: str
    #: The MD5 Meta publishes, or None where it publishes no checksum (SAM 2
    #: and 2.1): such a download needs a SHA-256 from the operator, or their
    #: consent to keep it unverified.
    md5: str | None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ModelEngine:
    """An engine that runs a model from a checkpoint."""

    #: Its ``SEGQ_MODEL``, recorded on each job it runs.
    name: str
    family: EngineFamily
    #: What ``segq weights download`` calls its checkpoint.
    checkpoint_name: str
    checkpoint: OfficialCheckpoint
    #: How the family's package builds it: segment_anything's
    #: ``sam_model_registry`` key (SAM), or the config of the ``sam2``
    #: package that ``build_sam2`` reads (SAM 2).
    architecture: str


_SAM_BASE = "https://dl.fbaipublicfiles.com/segment_anything"
# SAM 2's July 2024 files and SAM 2.1's September 2024 ones, as
# facebookresearch/sam2's checkpoints/download_ckpts.sh fetches them, each
# with the config of its own release (the 2.1 models have three more tensors,
# so neither release's weights load into the other's model).
_SAM2_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/072824"
_SAM2_1_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
#: SAM 2 sizes: the checkpoint's size name -> the size in the configs' names.
_SAM2_SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


def _sam(architecture: str, md5: str) -> ModelEngine:
    # Meta names each SAM file after the first six hex digits of its MD5.
    url = f"{_SAM_BASE}/sam_{architecture}_{md5[:6]}.pth"
    return ModelEngine(
        f"sam_{architecture}",
        EngineFamily.SAM,
        architecture,
        OfficialCheckpoint(url, md5),
        architecture,
    )


def _sam2(release: str, base_url: str, size: str) -> ModelEngine:
    name = f"{release}_hiera_{size}"
    return ModelEngine(
        name,
        EngineFamily.SAM2,
        name,
        OfficialCheckpoint(f"{base_url}/{name}.pt", None),
        f"configs/{release}/{release}_hiera_{_SAM2_SIZES[size]}.yaml",
    )


#: Every model engine, in the order they are listed to users.
MODEL_ENGINES: tuple[ModelEngine, ...] = (
    _sam("vit_b", "01ec64d29a2fca3f0661936605ae66f8"),
    _sam("vit_l", "0b3195507c641ddb6910d2bb5adee89c"),
    _sam("vit_h", "4b8939a88964f0f4ff5f5b2642c598a6"),
    *(_sam2("sam2", _SAM2_BASE, size) for size in _SAM2_SIZES),
    *(_sam2("sam2.1", _SAM2_1_BASE, size) for size in _SAM2_SIZES),
)
GRABCUT = "grabcut"


@dataclass(frozen=True)
class SnapshotEngine:
    """An engine that runs a Hugging Face snapshot: a directory in the
    hub's layout that the operator downloads (gated, under their own token
    and licence acceptance), loaded with local files only."""

    #: Its ``SEGQ_MODEL``, recorded on each job it runs.
    name: str
    family: EngineFamily
    #: The hub repository whose snapshot it runs (for the operator's download).
    repository: str
    #: Where it is looked for under the weights directory without SEGQ_MODEL_CHECKPOINT.
    directory_name: str


#: SAM 3: text prompts (every instance of a concept), points and boxes.
SAM3 = SnapshotEngine("sam3", EngineFamily.SAM3, "facebook/sam3", "sam3")
SNAPSHOT_ENGINES_BY_NAME = {SAM3.name: SAM3}
#: SAM 3's own defaults (``Sam3Processor.post_process_instance_segmentation``)
#: for a text prompt's options, and the most instances one may ask for.
SAM3_SCORE_THRESHOLD = 0.3
SAM3_MASK_THRESHOLD = 0.5
MAX_TEXT_SEGMENTS = 256
#: The engines that take text prompts.
CONCEPT_ENGINES = (SAM3.name,)


def concept_unsupported_message(engine_name: str | None) -> str:
    """Why a text prompt cannot run on ``engine_name`` (the API's refusal
    and a worker's item failure say the same)."""
    running = engine_name or "another engine"
    return f"text prompts need SEGQ_MODEL={SAM3.name}; this server runs {running}"


#: What a worker runs with SEGQ_MODEL unset and this engine's checkpoint found.
DEFAULT_MODEL_ENGINE = "sam_vit_b"
#: Engines that take no model; the benchmark one is chosen only by name.
MODEL_FREE_ENGINES = (GRABCUT, "benchmark_fixed_mask")

MODEL_ENGINES_BY_NAME = {engine.name: engine for engine in MODEL_ENGINES}
MODEL_ENGINES_BY_CHECKPOINT = {engine.checkpoint_name: engine for engine in MODEL_ENGINES}
#: The names SEGQ_MODEL takes, as users are shown them.
ENGINE_NAMES = (*MODEL_ENGINES_BY_NAME, *SNAPSHOT_ENGINES_BY_NAME, GRABCUT)
#: The names ``segq weights download`` takes.
CHECKPOINT_NAMES = tuple(MODEL_ENGINES_BY_CHECKPOINT)


def engine_family(name: str | None) -> EngineFamily | None:
    """The family of the engine ``SEGQ_MODEL=name`` runs; None for a name
    that is unset or unknown (the worker chooses, or refuses to start)."""
    if name == GRABCUT:
        return EngineFamily.GRABCUT
    if name in SNAPSHOT_ENGINES_BY_NAME:
        return SNAPSHOT_ENGINES_BY_NAME[name].family
    engine = MODEL_ENGINES_BY_NAME.get(name or "")
    return None if engine is None else engine.family
