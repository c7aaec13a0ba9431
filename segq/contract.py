"""The contract's stored shapes: what a job's row keeps of its prompt and
options, what an item's row keeps as its result, and the names and defaults
every layer agrees on.

The API writes these shapes (api/job_service.py), the worker reads the
prompt and options and writes the result (worker/item_inputs.py,
worker/results.py), and the job document renders them (segq/job_document.py,
segq/job_text.py); each fact is written here once and imported. Free of
Flask, torch and the database, so any layer may import it.

These are stored values: rows written by earlier versions, and messages
queued by them, must keep reading. A key or a default here changes only
with a migration of the rows that hold the old one.
"""

from __future__ import annotations

from typing import Any, Final, Literal, NotRequired, TypedDict, get_args

# Outputs: what a segment carries besides its score, box and area.

#: Every output a job may ask for (``outputs`` in the request and the row).
OutputKind = Literal["polygons", "mask", "rle", "svgPath", "logits"]
OUTPUT_KINDS: Final[tuple[OutputKind, ...]] = get_args(OutputKind)
#: What a job that names no outputs is given (and was, before outputs existed).
DEFAULT_OUTPUTS: Final[tuple[OutputKind, ...]] = ("polygons", "mask")
#: Outputs a segment keeps under their own name and shows as kept (no stored object).
INLINE_OUTPUTS: Final[tuple[OutputKind, ...]] = ("rle", "svgPath")

# Modes.

Mode = Literal["prompted", "everything"]
#: The mode of a job whose options name none (every job before modes existed).
DEFAULT_MODE: Final[Mode] = "prompted"
EVERYTHING: Final[Mode] = "everything"

# Stored objects: fields of a stored segment that name an object in storage.

#: The segment's mask, a PNG (255 on the object).
MASK_KEY: Final = "maskKey"
#: The segment's low-resolution logits, an .npy; with their shape beside them.
LOGITS_KEY: Final = "logitsKey"
LOGITS_SHAPE: Final = "logitsShape"
SEGMENT_OBJECT_FIELDS: Final[tuple[str, ...]] = (MASK_KEY, LOGITS_KEY)

# Segment everything.

MAX_EVERYTHING_SEGMENTS: Final = 256


class EverythingSettings(TypedDict):
    """Segment everything's options as a job's row keeps them (every field
    filled in by the API)."""

    pointsPerSide: int
    predIouThresh: float
    stabilityScoreThresh: float
    minArea: int
    maxSegments: int


#: segment-anything's own SamAutomaticMaskGenerator defaults, and at most
#: MAX_EVERYTHING_SEGMENTS segments.
EVERYTHING_DEFAULTS: Final[EverythingSettings] = {
    "pointsPerSide": 32,
    "predIouThresh": 0.88,
    "stabilityScoreThresh": 0.95,
    "minArea": 0,
    "maxSegments": MAX_EVERYTHING_SEGMENTS,
}


class TextSettings(TypedDict):
    """How a text prompt's instances are kept (the API fills in SAM 3's
    defaults: segq.engine_catalogue's SAM3_* values)."""

    scoreThreshold: float
    maskThreshold: float
    maxSegments: int


# A job's row: its prompt and options.


class StoredPoint(TypedDict):
    """Normalized to the image (0..1); label 1 foreground, 0 background."""

    x: float
    y: float
    label: int


class StoredBox(TypedDict):
    xMin: float
    yMin: float
    xMax: float
    yMax: float


class StoredMaskInput(TypedDict, total=False):
    """The logits fed to SAM as mask_input: a segment of an earlier job,
    resolved by the API to its ``logitsKey``, or the logits a peer's
    request gave ``inline`` (base64 of an .npy)."""

    jobId: int
    itemIndex: int
    segmentIndex: int
    logitsKey: str
    inline: str


class StoredExemplar(StoredBox):
    """A box around an example of a text prompt's concept (label 1) or of
    something that is not one (label 0), normalized."""

    label: int


class StoredPromptSet(TypedDict):
    """One object's prompt; or a text prompt (``text``, with optional
    exemplar ``boxes``) for every instance of what it names. The text keys
    are kept only on text prompts, so other rows are as they always were."""

    points: list[StoredPoint] | None
    boundingBox: StoredBox | None
    maskInput: NotRequired[StoredMaskInput | None]
    text: NotRequired[str]
    boxes: NotRequired[list[StoredExemplar] | None]


class StoredPrompt(StoredPromptSet):
    """The job's prompt: the top-level one, or ``prompts`` (one per object)."""

    prompts: NotRequired[list[StoredPromptSet]]


class StoredOptions(TypedDict):
    """How the job asked to be segmented."""

    multimaskOutput: bool
    outputs: list[OutputKind]
    mode: NotRequired[Mode]
    everything: NotRequired[EverythingSettings]
    #: Only on jobs with text prompts.
    textOptions: NotRequired[TextSettings]


# An item's row: its result.


class StoredRing(TypedDict):
    """A polygon ring in pixels: [[x, y], ...]."""

    vertices: list[list[float]]
    isHole: bool


class StoredRle(TypedDict):
    size: list[int]
    counts: list[int]


class StoredSegment(TypedDict):
    """One candidate mask; the optional fields are there when the job asked
    for their output."""

    promptIndex: NotRequired[int | None]
    score: float
    boundingBox: dict[str, float] | None
    area: float
    polygons: NotRequired[list[StoredRing]]
    svgPath: NotRequired[str]
    rle: NotRequired[StoredRle]
    maskKey: NotRequired[str]
    logitsKey: NotRequired[str]
    logitsShape: NotRequired[list[int]]


#: The fields of an item's metrics a client sees (ItemMetrics); the rest
#: (StoredMetrics' stage times) stay in the row.
SHOWN_METRICS = ("embedding", "encodeMs", "decodeMs")


class StoredMetrics(TypedDict):
    embedding: Literal["computed", "local", "shared"] | None
    encodeMs: float
    decodeMs: float
    #: Where the attempt's time went up to its completion's commit, by stage
    #: (worker/item_stages.py): not shown to clients, which see the above.
    stagesMs: NotRequired[dict[str, float]]
    #: The attempt's time from the start of its claim to that commit.
    workerMs: NotRequired[float]


class StoredResult(TypedDict):
    """A completed item's result: keys of stored objects, never URLs."""

    width: int
    height: int
    segments: list[StoredSegment]
    metrics: NotRequired[StoredMetrics]


def chosen_outputs(options: dict[str, Any] | StoredOptions) -> tuple[OutputKind, ...]:
    """The outputs a job's options ask for (rows from before ``outputs``: the default)."""
    return tuple(options.get("outputs") or DEFAULT_OUTPUTS)


def objects_named_by_result(result: dict[str, Any] | StoredResult | None) -> list[str]:
    """The storage keys an item's result names (none for a failure)."""
    if not result:
        return []
    return [
        segment[field]  # type: ignore[literal-required]
        for segment in result.get("segments", ())
        for field in SEGMENT_OBJECT_FIELDS
        if segment.get(field)
    ]
