"""Every engine segq can run (``SEGQ_MODEL``), written once: its family,
what it can do, the weights it loads and where they come from.

The worker builds its engine from an entry (``segq.worker.engines``
imports the family's module named in ``ENGINE_MODULES`` and calls its
``build_engine``), ``segq weights download`` fetches an entry's official
checkpoint, the command line offers the entries' names, and the API asks
an entry's ``capabilities`` (never its name) before it queues a job that
needs one. Imports no torch, so the command line and the API read it freely.

Adding an engine is one module under ``worker/engines/`` with a
``build_engine(entry, weights, setup)`` function and one entry here (and,
for a new family, its ``EngineFamily`` member and ``ENGINE_MODULES`` line)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EngineFamily(StrEnum):
    SAM = "SAM"
    SAM2 = "SAM 2"
    SAM3 = "SAM 3"
    GRABCUT = "GrabCut"
    BENCHMARK = "benchmark"


#: Family -> its module under ``segq.worker.engines``, which defines
#: ``build_engine`` (the family's loader, as segment-anything's
#: ``sam_model_registry`` maps a name to a builder). A string, so reading
#: the catalogue imports no engine and no torch.
ENGINE_MODULES: dict[EngineFamily, str] = {
    EngineFamily.SAM: "sam",
    EngineFamily.SAM2: "sam2",
    EngineFamily.SAM3: "sam3",
    EngineFamily.GRABCUT: "grabcut",
    EngineFamily.BENCHMARK: "fixed_mask",
}


class Capability(StrEnum):
    """What an engine can do, as the API and the pipeline ask it."""

    POINT_PROMPTS = "point prompts"
    BOX_PROMPTS = "box prompts"
    #: Objects named in words ("a red car").
    TEXT_PROMPTS = "text prompts"
    #: A prompt's ``maskInput`` (an earlier answer's logits).
    MASK_INPUT = "mask input"
    #: Segment everything: every object without a prompt.
    EVERYTHING = "segment everything"
    #: Many prompts on one image answered together.
    PROMPT_BATCHING = "prompt batching"
    #: The images of several items encoded as one batch.
    IMAGE_BATCHING = "image batching"
    #: Low-resolution mask logits with each mask (the ``logits`` output).
    LOGITS = "logits"


class LogitsFrame(StrEnum):
    """How an engine's 256x256 logits cover the image: SAM resizes the
    longest side and pads to a square; SAM 2 stretches the image to one."""

    PADDED_SQUARE = "padded square"
    STRETCHED_SQUARE = "stretched square"


class WeightsLayout(StrEnum):
    #: One checkpoint file (``torch.save``'d).
    FILE = "file"
    #: A folder, as a Hugging Face model is saved (``config.json``, weights...).
    DIRECTORY = "directory"


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
class EngineWeights:
    """What an engine loads, and where a worker finds it unconfigured."""

    #: What ``segq weights download`` (and its messages) call them.
    name: str
    #: The file or folder name under ``SEGQ_DATA_DIR/weights``.
    local_name: str
    layout: WeightsLayout = WeightsLayout.FILE
    #: Where ``segq weights download`` fetches them; None where segq does
    #: not download them itself (the operator puts them in place).
    official: OfficialCheckpoint | None = None
    #: The Hugging Face repository a folder is a snapshot of, for the
    #: operator's own download (a gated model: their token, their licence).
    hub_repository: str | None = None


@dataclass(frozen=True)
class EngineEntry:
    #: Its ``SEGQ_MODEL``, recorded on each job it runs.
    name: str
    family: EngineFamily
    capabilities: frozenset[Capability]
    #: What the family's loader builds: segment_anything's
    #: ``sam_model_registry`` key (SAM), the config ``build_sam2`` reads
    #: (SAM 2); empty for a family with one model.
    architecture: str = ""
    #: None for an engine that loads no model.
    weights: EngineWeights | None = None
    logits_frame: LogitsFrame | None = None
    #: Shown to users (the CLI, error messages); the benchmark engine is
    #: chosen only by name.
    listed: bool = True

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities


_PROMPTED = frozenset({Capability.POINT_PROMPTS, Capability.BOX_PROMPTS})
#: SAM and SAM 2 alike (one engine body: worker/engines/sam_body.py).
_SAM_CAPABILITIES = _PROMPTED | {
    Capability.MASK_INPUT,
    Capability.EVERYTHING,
    Capability.PROMPT_BATCHING,
    Capability.IMAGE_BATCHING,
    Capability.LOGITS,
}

_SAM_BASE = "https://dl.fbaipublicfiles.com/segment_anything"
# SAM 2's July 2024 files and SAM 2.1's September 2024 ones, as
# facebookresearch/sam2's checkpoints/download_ckpts.sh fetches them, each
# with the config of its own release (the 2.1 models have three more tensors,
# so neither release's weights load into the other's model).
_SAM2_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/072824"
_SAM2_1_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
#: SAM 2 sizes: the checkpoint's size name -> the size in the configs' names.
_SAM2_SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


def _sam(architecture: str, md5: str) -> EngineEntry:
    # Meta names each SAM file after the first six hex digits of its MD5.
    official = OfficialCheckpoint(f"{_SAM_BASE}/sam_{architecture}_{md5[:6]}.pth", md5)
    return EngineEntry(
        name=f"sam_{architecture}",
        family=EngineFamily.SAM,
        capabilities=_SAM_CAPABILITIES,
        architecture=architecture,
        weights=EngineWeights(architecture, official.filename, official=official),
        logits_frame=LogitsFrame.PADDED_SQUARE,
    )


def _sam2(release: str, base_url: str, size: str) -> EngineEntry:
    name = f"{release}_hiera_{size}"
    official = OfficialCheckpoint(f"{base_url}/{name}.pt", None)
    return EngineEntry(
        name=name,
        family=EngineFamily.SAM2,
        capabilities=_SAM_CAPABILITIES,
        architecture=f"configs/{release}/{release}_hiera_{_SAM2_SIZES[size]}.yaml",
        weights=EngineWeights(name, official.filename, official=official),
        logits_frame=LogitsFrame.STRETCHED_SQUARE,
    )


GRABCUT = "grabcut"
SAM3 = "sam3"
BENCHMARK_FIXED_MASK = "benchmark_fixed_mask"

#: Every engine, in the order they are listed to users.
ENGINES: tuple[EngineEntry, ...] = (
    _sam("vit_b", "01ec64d29a2fca3f0661936605ae66f8"),
    _sam("vit_l", "0b3195507c641ddb6910d2bb5adee89c"),
    _sam("vit_h", "4b8939a88964f0f4ff5f5b2642c598a6"),
    *(_sam2("sam2", _SAM2_BASE, size) for size in _SAM2_SIZES),
    *(_sam2("sam2.1", _SAM2_1_BASE, size) for size in _SAM2_SIZES),
    # SAM 3 (transformers): text prompts (every instance of a concept) and,
    # through its tracker on the same vision backbone, points and boxes.
    # Its weights are the gated facebook/sam3 snapshot, which the operator
    # downloads; segq never contacts a hub.
    EngineEntry(
        SAM3,
        EngineFamily.SAM3,
        _PROMPTED
        | {
            Capability.TEXT_PROMPTS,
            Capability.MASK_INPUT,
            Capability.PROMPT_BATCHING,
            Capability.IMAGE_BATCHING,
            Capability.LOGITS,
        },
        weights=EngineWeights(SAM3, SAM3, WeightsLayout.DIRECTORY, hub_repository="facebook/sam3"),
        logits_frame=LogitsFrame.STRETCHED_SQUARE,
    ),
    # OpenCV's GrabCut: no model, one prompt at a time, no logits.
    EngineEntry(GRABCUT, EngineFamily.GRABCUT, _PROMPTED),
    # Returns a fixed mask: measures the pipeline's own overhead (bench/).
    EngineEntry(BENCHMARK_FIXED_MASK, EngineFamily.BENCHMARK, _PROMPTED, listed=False),
)

ENGINES_BY_NAME = {entry.name: entry for entry in ENGINES}
#: What a worker runs with SEGQ_MODEL unset and this engine's weights found...
DEFAULT_MODEL_ENGINE = "sam_vit_b"
#: ...and what it runs with them not found.
FALLBACK_ENGINE = GRABCUT
#: Entries with weights, by what ``segq weights download`` calls them.
ENGINES_BY_WEIGHTS = {entry.weights.name: entry for entry in ENGINES if entry.weights is not None}
#: The names SEGQ_MODEL takes, as users are shown them.
ENGINE_NAMES = tuple(entry.name for entry in ENGINES if entry.listed)
#: ``segq weights download``'s names -> the files it fetches (weights segq
#: fetches itself; others the operator puts in place).
OFFICIAL_CHECKPOINTS = {
    entry.weights.name: entry.weights.official
    for entry in ENGINES
    if entry.weights is not None and entry.weights.official is not None
}
CHECKPOINT_NAMES = tuple(OFFICIAL_CHECKPOINTS)


def engine_entry(name: str | None) -> EngineEntry | None:
    """The entry of ``SEGQ_MODEL=name``; None for a name that is unset or
    unknown (the worker chooses, or refuses to start)."""
    return ENGINES_BY_NAME.get(name or "")


def configured_capabilities(name: str | None) -> frozenset[Capability] | None:
    """What the engine ``SEGQ_MODEL=name`` can do; None where it is not
    known before a worker starts (unset: the worker runs SAM if it finds
    its weights, GrabCut otherwise)."""
    entry = engine_entry(name)
    return None if entry is None else entry.capabilities


def lacks(name: str | None, capability: Capability) -> bool:
    """Whether the configured engine is known to lack ``capability``: what
    the API refuses a job for before queueing it. With SEGQ_MODEL unset a
    worker runs the default model or the fallback engine, so only what
    neither of them can do is refused here; otherwise the item fails,
    saying why."""
    capabilities = configured_capabilities(name)
    if capabilities is None:
        capabilities = (
            ENGINES_BY_NAME[DEFAULT_MODEL_ENGINE].capabilities
            | ENGINES_BY_NAME[FALLBACK_ENGINE].capabilities
        )
    return capability not in capabilities


#: SAM 3's own defaults (``Sam3Processor.post_process_instance_segmentation``)
#: for a text prompt's options, and the most instances one may ask for.
SAM3_SCORE_THRESHOLD = 0.3
SAM3_MASK_THRESHOLD = 0.5
MAX_TEXT_SEGMENTS = 256


def text_engines() -> tuple[str, ...]:
    """The engines that take text prompts, as a refusal names them."""
    return tuple(e.name for e in ENGINES if e.listed and e.can(Capability.TEXT_PROMPTS))


def concept_unsupported_message(engine_name: str | None) -> str:
    """Why a text prompt cannot run on ``engine_name`` (the API's refusal
    and a worker's item failure say the same)."""
    running = engine_name or "an engine chosen by its workers (SEGQ_MODEL unset)"
    needed = " or ".join(f"SEGQ_MODEL={name}" for name in text_engines())
    return f"text prompts need {needed}; this server runs {running}"
