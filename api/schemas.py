"""Request and response schemas. The same models validate requests and
generate /openapi.json, so the documentation cannot drift from the checks."""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from segq.api.errors import ApiError, FieldPath
from segq.api.request_integers import ascii_integer, request_integer
from segq.api.stored_text import check_stored_text
from segq.contract import (
    DEFAULT_MODE,
    EVERYTHING_DEFAULTS,
    MAX_EVERYTHING_SEGMENTS,
    Mode,
    OutputKind,
)
from segq.coordinates import NORMALIZED_HINT
from segq.engine_catalogue import (
    MAX_TEXT_SEGMENTS,
    SAM3_MASK_THRESHOLD,
    SAM3_SCORE_THRESHOLD,
)
from segq.models import DeliveryStatus, ItemStatus, JobStatus
from segq.webhook_events import EVENT_TYPES, SHORT_NAMES

ModelT = TypeVar("ModelT", bound=BaseModel)

MAX_POINTS = 32
MAX_PROMPTS = 64
MAX_TEXT_LENGTH = 200
MAX_EXEMPLARS = 32
MAX_EXTERNAL_ID_LENGTH = 255

Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


def _normalized_coordinate(value: Any, handler: ValidatorFunctionWrapHandler) -> float:
    """A Unit whose range error says that coordinates are normalized."""
    try:
        coordinate: float = handler(value)
    except ValidationError as exc:
        [error] = exc.errors(include_url=False)
        if error["type"] not in ("greater_than_equal", "less_than_equal"):
            raise
        raise PydanticCustomError(
            "normalized_coordinate",
            "{message}: {hint}",
            {"message": error["msg"], "hint": NORMALIZED_HINT},
        ) from None
    return coordinate


#: A point's or a box's coordinate.
Coordinate = Annotated[Unit, WrapValidator(_normalized_coordinate)]
# Postgres text cannot hold NUL, and control characters in an id are always a mistake.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f]*$"


class StrictModel(BaseModel):
    # strict: "1" is not 1 and true is not 1; forbid: a misspelt field is an
    # error, not a silently ignored option.
    model_config = ConfigDict(extra="forbid", strict=True)


class Point(StrictModel):
    x: Coordinate
    y: Coordinate
    # An int in [0, 1] rather than Literal[0, 1]: a literal would take true as 1.
    label: Annotated[int, Field(ge=0, le=1)] = Field(1, description="1 foreground, 0 background")


class BoundingBox(StrictModel):
    xMin: Coordinate
    yMin: Coordinate
    xMax: Coordinate
    yMax: Coordinate


Identifier = Annotated[
    str, Field(min_length=1, max_length=MAX_EXTERNAL_ID_LENGTH, pattern=NO_CONTROL_CHARACTERS)
]


class InstanceId(StrictModel):
    """Cognite's data-modeling node id of a file."""

    space: Identifier
    externalId: Identifier


class FileReference(StrictModel):
    """Exactly one of the fields names the image."""

    fileId: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None
    fileExternalId: (
        Annotated[
            str,
            Field(min_length=1, max_length=MAX_EXTERNAL_ID_LENGTH, pattern=NO_CONTROL_CHARACTERS),
        ]
        | None
    ) = None
    fileUrl: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    imageData: str | None = None
    fileInstanceId: InstanceId | None = None


if TYPE_CHECKING:
    WebhookEventName = str
else:
    #: Full event names, and the contract's short ones for job events, as
    #: segq.webhook_events defines them. A literal rather than an enum: the
    #: strict models take an enum field only as an enum instance.
    WebhookEventName = Literal[(*EVENT_TYPES, *SHORT_NAMES)]


class Webhook(StrictModel):
    url: Annotated[str, Field(min_length=1, max_length=2048)]
    events: (
        Annotated[
            list[WebhookEventName],
            Field(
                min_length=1,
                max_length=10,
                description="default: job.completed, job.failed, job.canceled",
            ),
        ]
        | None
    ) = None


Index = Annotated[int, Field(ge=0, le=2**31 - 1)]


class MaskInput(StrictModel):
    """A segment of an earlier job of the same project that was asked for
    ``logits``: its logits are fed to SAM as ``mask_input``."""

    jobId: Annotated[int, Field(ge=1, le=2**63 - 1)]
    itemIndex: Index = Field(description="the item's position in that job's request")
    segmentIndex: Index = Field(description="the segment's position in that item's segments")


#: A text prompt: a phrase naming what to find, trimmed.
PromptText = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT_LENGTH),
    Field(
        pattern=NO_CONTROL_CHARACTERS,
        description="extension (SEGQ_MODEL=sam3): every instance of what this phrase "
        f"names; 1 to {MAX_TEXT_LENGTH} characters after trimming",
        examples=["person"],
    ),
]


class Exemplar(StrictModel):
    """A box around an example of the text prompt's concept (label 1) or
    around something that is not one (label 0), as SAM 3 takes them."""

    xMin: Coordinate
    yMin: Coordinate
    xMax: Coordinate
    yMax: Coordinate
    label: Annotated[int, Field(ge=0, le=1)] = Field(
        1, description="1 an instance of the concept, 0 not one"
    )


Exemplars = Annotated[
    list[Exemplar],
    Field(
        min_length=1,
        max_length=MAX_EXEMPLARS,
        description="extension: exemplar boxes for the text prompt, normalized",
    ),
]


class PromptSet(StrictModel):
    """One object to segment: at least one point or a box; or (SAM 3) a
    text prompt, with optional exemplar boxes, for every instance of it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"text": "person"},
                {
                    "text": "red car",
                    "boxes": [
                        {"xMin": 0.1, "yMin": 0.2, "xMax": 0.3, "yMax": 0.4, "label": 1},
                        {"xMin": 0.6, "yMin": 0.5, "xMax": 0.9, "yMax": 0.8, "label": 0},
                    ],
                },
            ]
        }
    )

    points: Annotated[list[Point], Field(max_length=MAX_POINTS)] | None = None
    boundingBox: BoundingBox | None = None
    maskInput: MaskInput | None = None
    text: PromptText | None = None
    boxes: Exemplars | None = None


class TextOptions(StrictModel):
    """How a text prompt's instances are kept; the defaults are SAM 3's own
    (``Sam3Processor.post_process_instance_segmentation``)."""

    scoreThreshold: Unit = Field(
        SAM3_SCORE_THRESHOLD, description="instances scoring at or below it are dropped"
    )
    maskThreshold: Unit = Field(
        SAM3_MASK_THRESHOLD, description="a pixel is on the mask where its probability is above it"
    )
    maxSegments: Annotated[int, Field(ge=1, le=MAX_TEXT_SEGMENTS)] = Field(
        MAX_TEXT_SEGMENTS, description="at most this many instances per text prompt, best first"
    )


class EverythingOptions(StrictModel):
    """Segment everything, as segment-anything's SamAutomaticMaskGenerator
    takes it; the defaults are its own."""

    pointsPerSide: Annotated[int, Field(ge=1, le=128)] = Field(
        EVERYTHING_DEFAULTS["pointsPerSide"],
        description="a grid of pointsPerSide x pointsPerSide single-point prompts",
    )
    predIouThresh: Unit = Field(
        EVERYTHING_DEFAULTS["predIouThresh"],
        description="masks with a lower predicted IoU are dropped",
    )
    stabilityScoreThresh: Unit = Field(
        EVERYTHING_DEFAULTS["stabilityScoreThresh"],
        description="masks with a lower stability score are dropped",
    )
    minArea: Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(
        EVERYTHING_DEFAULTS["minArea"],
        description="disconnected regions and holes under this many pixels are removed "
        "(SAM's min_mask_region_area)",
    )
    maxSegments: Annotated[int, Field(ge=1, le=MAX_EVERYTHING_SEGMENTS)] = Field(
        EVERYTHING_DEFAULTS["maxSegments"], description="at most this many segments, best first"
    )


class SegmentRequest(StrictModel):
    """Cognite's body, unchanged, plus optional extensions."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [{"fileId": 1}],
                    "points": [{"x": 0.5, "y": 0.5, "label": 1}],
                    "boundingBox": {"xMin": 0.2, "yMin": 0.15, "xMax": 0.8, "yMax": 0.85},
                },
                # SEGQ_MODEL=sam3: every person, and each mask best first.
                {"items": [{"fileId": 1}], "text": "person", "textOptions": {"maxSegments": 20}},
            ]
        }
    )

    items: Annotated[list[FileReference], Field(min_length=1)]
    points: Annotated[list[Point], Field(max_length=MAX_POINTS)] | None = None
    boundingBox: BoundingBox | None = None
    multimaskOutput: bool = False
    outputs: Annotated[list[OutputKind], Field(min_length=1)] | None = None
    prompts: (
        Annotated[
            list[PromptSet],
            Field(
                min_length=1,
                max_length=MAX_PROMPTS,
                description="extension: several objects per image, instead of points/boundingBox",
            ),
        ]
        | None
    ) = None
    mode: Mode = Field(
        DEFAULT_MODE, description="extension: everything finds every object, with no prompt"
    )
    everything: EverythingOptions | None = None
    text: PromptText | None = None
    boxes: Exemplars | None = None
    textOptions: TextOptions | None = Field(
        None, description="extension: the text prompts' thresholds and instance limit"
    )
    webhook: Webhook | None = None
    model: Annotated[str, Field(min_length=1, max_length=64)] | None = None


# Responses. Every JSON answer is serialized through one of these (see
# api/answers.py), so an answer cannot carry a field its schema lacks.


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(ResponseModel):
    code: int
    message: str
    missing: list[dict[str, Any]] | None = None
    duplicated: list[dict[str, Any]] | None = None


class ErrorResponse(ResponseModel):
    error: ErrorBody


class InstanceIdBody(ResponseModel):
    space: str
    externalId: str


class LabelBody(ResponseModel):
    externalId: str


class FileResponse(ResponseModel):
    """Cognite's file, plus what segq learnt from the bytes (size,
    dimensions, digest), present once they are uploaded."""

    id: int
    externalId: str | None
    instanceId: InstanceIdBody | None = None
    name: str | None
    mimeType: str | None
    metadata: dict[str, str] | None = None
    source: str | None = None
    directory: str | None = None
    sourceCreatedTime: int | None = None
    sourceModifiedTime: int | None = None
    assetIds: list[int] | None = None
    dataSetId: int | None = None
    labels: list[LabelBody] | None = None
    geoLocation: dict[str, Any] | None = None
    securityCategories: list[int] | None = None
    uploaded: bool
    uploadedTime: int | None = None
    createdTime: int
    lastUpdatedTime: int
    size: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None


class CreatedFile(FileResponse):
    uploadUrl: str | None = Field(
        None,
        description="from JSON metadata: PUT the bytes here (signed, expiring, for this "
        "file only); absent after a multipart upload, which carries the bytes",
    )


class MultipartUploadFile(FileResponse):
    uploadUrls: list[str] = Field(description="PUT part i (from 0) to uploadUrls[i]")
    uploadId: str


class FileList(ResponseModel):
    items: list[FileResponse]


class FilePage(ResponseModel):
    items: list[FileResponse]
    nextCursor: str | None = None


class DownloadLink(ResponseModel):
    id: int | None = None
    externalId: str | None = None
    instanceId: InstanceIdBody | None = None
    downloadUrl: str


class DownloadLinks(ResponseModel):
    items: list[DownloadLink]


class UploadLinks(ResponseModel):
    items: list[CreatedFile]


class MultipartUploadLinks(ResponseModel):
    items: list[MultipartUploadFile]


class Count(ResponseModel):
    count: int


class CountAggregate(ResponseModel):
    items: list[Count]


class EmptyAnswer(ResponseModel):
    pass


class ProjectScope(ResponseModel):
    projectUrlName: str
    groups: list[int]


class TokenInspection(ResponseModel):
    """Cognite's answer: who the key is, its project and what it may do."""

    subject: str
    projects: list[ProjectScope]
    capabilities: list[dict[str, Any]]


class ItemReference(ResponseModel):
    fileId: int | None = None
    fileExternalId: str | None = None
    fileInstanceId: InstanceIdBody | None = None
    fileUrl: str | None = None


class Vertex(ResponseModel):
    x: float
    y: float
    confidence: float | None


class Polygon(ResponseModel):
    vertices: list[Vertex]
    confidence: float | None
    isHole: bool = Field(description="extension: this ring is a hole of the object")


class MaskLink(ResponseModel):
    url: str
    expiresTime: int
    width: int
    height: int
    format: Literal["image/png"]


class Rle(ResponseModel):
    size: list[int]
    counts: list[int]


class LogitsLink(ResponseModel):
    url: str
    expiresTime: int
    format: Literal["application/x-npy"]
    shape: list[int] = Field(description="[256, 256]: SAM's low-resolution mask logits, float16")


class Segment(ResponseModel):
    promptIndex: int | None = Field(
        None, description="extension: the prompt this segment answers (0 for a top-level prompt)"
    )
    score: float
    boundingBox: BoundingBox | None
    area: float
    polygons: list[Polygon] | None = None
    mask: MaskLink | None = None
    rle: Rle | None = None
    svgPath: str | None = None
    logits: LogitsLink | None = None


class ItemMetrics(ResponseModel):
    embedding: Literal["computed", "local", "shared"] | None = Field(
        description=(
            "extension: where the image's embedding came from: encoded for this item, "
            "this worker's memory, or the embeddings shared by all workers; "
            "null for an engine without one (GrabCut)"
        )
    )
    encodeMs: float = Field(description="extension: milliseconds spent getting the embedding")
    decodeMs: float = Field(description="extension: the engine's other milliseconds")


class JobItemResult(ItemReference):
    segments: list[Segment] | None = None
    metrics: ItemMetrics | None = Field(
        default=None, description="extension: what a finished item cost the engine"
    )


class FailedItems(ResponseModel):
    errorMessage: str
    items: list[ItemReference]


class Progress(ResponseModel):
    total: int
    completed: int
    failed: int


class JobState(ResponseModel):
    """The fields every shape of a job starts with."""

    status: JobStatus
    jobId: int
    createdTime: int
    startTime: int | None
    statusTime: int
    errorMessage: str | None


class JobCreatedResponse(JobState):
    items: list[ItemReference]
    points: list[Point] | None = None
    boundingBox: BoundingBox | None = None
    prompts: list[PromptSet] | None = None
    text: str | None = None
    boxes: list[Exemplar] | None = None


class JobPrompt(ResponseModel):
    points: list[Point] | None = None
    boundingBox: BoundingBox | None = None
    prompts: list[PromptSet] | None = None
    text: str | None = Field(None, description="extension: the top-level text prompt")
    boxes: list[Exemplar] | None = Field(None, description="extension: its exemplar boxes")


class JobResponse(JobState):
    items: list[JobItemResult]
    prompt: JobPrompt
    mode: Mode = Field(description="extension: as asked; prompted for a job that did not say")
    everything: EverythingOptions | None = Field(
        None, description="extension: segment everything's options, defaults filled in"
    )
    textOptions: TextOptions | None = Field(
        None, description="extension: for a job with text prompts, defaults filled in"
    )
    multimaskOutput: bool = Field(description="as asked")
    outputs: list[OutputKind] | None = Field(
        None, description="extension: as asked, or the default"
    )
    failedItems: list[FailedItems] | None = None
    progress: Progress
    engine: str | None = Field(description="extension: the engine that ran the job")
    waitingFor: str | None = Field(
        None,
        description=(
            "extension: while unfinished, why its items wait when no live worker takes them "
            "(every worker paused for a dependency that is down, or none running)"
        ),
    )
    viewUrl: str | None = Field(
        None,
        description=(
            "extension: the job's viewer page (masks over the images), signed: it opens "
            "in a browser without the API key until it expires, as mask URLs do"
        ),
    )
    nextItemsCursor: str | None = Field(
        None,
        description=(
            "extension, only on a page of items (itemsLimit or itemsCursor): pass as "
            "?itemsCursor= for the next page; null on the last"
        ),
    )


class JobViewItem(ItemReference):
    """One item as the viewer shows it: in position order, failed or not."""

    fileName: str | None = Field(
        default=None,
        description="the stored file's name; null for a fileUrl item or a deleted file",
    )
    position: int
    status: ItemStatus
    imageUrl: str | None = Field(
        description="the stored image, pre-signed; null for a fileUrl item or a deleted file"
    )
    width: int | None
    height: int | None
    errorMessage: str | None
    segments: list[Segment] | None = None


class JobView(JobState):
    """What the viewer page polls: the job with every item in place."""

    items: list[JobViewItem]
    prompt: JobPrompt
    progress: Progress
    engine: str | None
    refreshAfter: int | None = Field(
        description="seconds before the page should ask again; null once the job has finished"
    )


class JobSummary(JobState):
    progress: Progress
    engine: str | None


class JobList(ResponseModel):
    items: list[JobSummary]
    nextCursor: str | None = Field(
        description="pass as ?cursor= for the next page; null at the end"
    )


class WebhookSecret(ResponseModel):
    secret: str = Field(description="whsec_ + base64: the Standard Webhooks signing secret")
    rotatedTime: int | None
    previousSecretExpiresTime: int | None = Field(
        description="until then, deliveries are signed with the previous secret too"
    )


class WebhookAttemptRecord(ResponseModel):
    attempt: int
    attemptedTime: int
    statusCode: int | None = Field(description="null when no answer came")
    latencyMs: int
    error: str | None


class WebhookDeliveryResponse(ResponseModel):
    deliveryId: int
    type: str
    url: str
    webhookId: str = Field(description="the webhook-id header: the same on every retry")
    status: DeliveryStatus
    createdTime: int
    nextAttemptTime: int | None
    attempts: list[WebhookAttemptRecord] = Field(description="the latest attempts, oldest first")


class WebhookDeliveryList(ResponseModel):
    items: list[WebhookDeliveryResponse]
    nextCursor: str | None


class HealthResponse(ResponseModel):
    status: Literal["ok"]


class WorkersState(ResponseModel):
    serving: int = Field(description="live segmenting worker processes that take items")
    paused: int = Field(
        description="live ones that take no items because a dependency (storage) is down"
    )
    waitingFor: str | None = Field(
        None,
        description=(
            "why queued items wait, when no live worker takes them: every worker paused "
            "(for which dependency, since when) or none running (and why the last start failed)"
        ),
    )


class ReadinessResponse(ResponseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description="database, broker, storage: ok or why not")
    workers: WorkersState | None = Field(
        None,
        description=(
            "extension, informative: the segmenting workers as they last said; never makes "
            "this API process unready (it can still take jobs). Absent while the database is down"
        ),
    )


# Query strings, headers and forms, as documented. The handlers read them
# themselves, so that each refusal keeps its own message.

#: Epoch milliseconds a client may filter on (15 digits reach the year 33658).
EpochMs = Annotated[int, Field(ge=0, le=10**15 - 1)]
MAX_LIST_LIMIT = 1000
ListLimit = Annotated[int, Field(ge=1, le=MAX_LIST_LIMIT)]


class FileListQuery(BaseModel):
    externalId: str | None = None
    limit: ListLimit | None = None


class ViewQuery(BaseModel):
    token: str = Field(description="the signed token of the job's viewUrl")


class JobListQuery(BaseModel):
    status: JobStatus | None = None
    limit: ListLimit | None = None
    cursor: str | None = None
    createdAfter: EpochMs | None = None
    createdBefore: EpochMs | None = None


class JobQuery(BaseModel):
    itemsLimit: ListLimit | None = Field(
        None, description="a page of this many items (failed ones included), the job on each"
    )
    itemsCursor: str | None = Field(None, description="the nextItemsCursor of the page before")


class PageQuery(BaseModel):
    limit: ListLimit | None = None
    cursor: str | None = None


MAX_IDEMPOTENCY_KEY_LENGTH = 255


#: Prefer: wait=N, as a header parameter of /openapi.json (api/job_waiting.py reads it).
PreferWait = Annotated[str, Field(pattern=r"^wait(=\d+)?$")] | None


class WaitHeaders(BaseModel):
    prefer: PreferWait = Field(
        None,
        alias="Prefer",
        description="wait=N (RFC 7240): answer when the job finishes or after N seconds "
        "(at most 60), whichever is first; the answer carries Preference-Applied",
    )


class JobReadHeaders(WaitHeaders):
    ifNoneMatch: str | None = Field(
        None,
        alias="If-None-Match",
        description="the ETag of the answer the client has: 304, with no body, while current",
    )


class JobCreationHeaders(WaitHeaders):
    idempotencyKey: Annotated[str, Field(max_length=MAX_IDEMPOTENCY_KEY_LENGTH)] | None = Field(
        None,
        alias="Idempotency-Key",
        description="the same key with the same request answers the first job; "
        "with another request, 409",
    )


class EventStreamHeaders(BaseModel):
    lastEventId: Annotated[str, Field(pattern=r"^\d+$")] | None = Field(
        None,
        alias="Last-Event-ID",
        description="resume after the event of this id (EventSource sends it by itself)",
    )


class FileUpload(BaseModel):
    """multipart/form-data: the image, and optional text fields."""

    file: bytes
    externalId: Annotated[str, Field(max_length=MAX_EXTERNAL_ID_LENGTH)] | None = None
    name: Annotated[str, Field(max_length=MAX_EXTERNAL_ID_LENGTH)] | None = None


#: Cognite's limits on a file's metadata: at most 256 pairs, keys of at most
#: 128 characters, values of at most 10,240, and all keys and values
#: together at most 10,240 bytes of UTF-8 (which also bounds what a listing
#: of files answers).
MAX_METADATA_PAIRS = 256
MAX_METADATA_BYTES = 10240


def _metadata_within_total(metadata: dict[str, str]) -> dict[str, str]:
    total = sum(
        len(key.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass"))
        for key, value in metadata.items()
    )
    if total > MAX_METADATA_BYTES:
        raise ValueError(
            f"keys and values take {total} bytes of UTF-8 together, more than {MAX_METADATA_BYTES}"
        )
    return metadata


#: A file's metadata as stored: checked whole wherever it is written, on
#: creation and after every update (add, remove or set) alike.
MetadataMap = Annotated[
    dict[
        Annotated[str, Field(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)],
        # JSONB cannot hold NUL either.
        Annotated[str, Field(max_length=10240, pattern=r"^[^\x00]*$")],
    ],
    Field(max_length=MAX_METADATA_PAIRS),
    AfterValidator(_metadata_within_total),
]
STORED_METADATA: TypeAdapter[dict[str, str]] = TypeAdapter(MetadataMap)
FileName = Annotated[
    str, Field(min_length=1, max_length=MAX_EXTERNAL_ID_LENGTH, pattern=NO_CONTROL_CHARACTERS)
]
FileId = Annotated[int, Field(ge=1, le=2**63 - 1)]


FileSource = Annotated[str, Field(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)]
#: Cognite's directory: an absolute, unix-style path.
FileDirectory = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^/[^\x00-\x1f\x7f]*$")]
MimeType = Annotated[str, Field(min_length=1, max_length=255, pattern=NO_CONTROL_CHARACTERS)]
#: Cognite's ids of other resources (assets, data sets, security
#: categories), which segq keeps as the client gave them.
ResourceId = Annotated[int, Field(ge=1, le=2**53 - 1)]
#: Cognite's bounds on a file's lists.
AssetIds = Annotated[list[ResourceId], Field(max_length=1000)]
SecurityCategories = Annotated[list[ResourceId], Field(max_length=100)]


class Label(StrictModel):
    """Cognite's reference to a label, by its externalId."""

    externalId: Identifier


Labels = Annotated[list[Label], Field(max_length=10)]
GeoCoordinate = Annotated[float, Field(allow_inf_nan=False)]
Position = Annotated[list[GeoCoordinate], Field(min_length=2, max_length=3)]
#: GeoJSON coordinates, one to four levels of lists deep (Point to MultiPolygon).
Coordinates = (
    list[GeoCoordinate] | list[Position] | list[list[Position]] | list[list[list[Position]]]
)
#: How deep each geometry's coordinates are.
GEOMETRY_DEPTHS = {
    "Point": 1,
    "MultiPoint": 2,
    "LineString": 2,
    "Polygon": 3,
    "MultiLineString": 3,
    "MultiPolygon": 4,
}
#: Bounds on a file's geoLocation, as metadata's bound it: what a listing of
#: files answers stays bounded.
MAX_GEO_POSITIONS = 256


def _depth_and_positions(coordinates: list[Any]) -> tuple[int, int]:
    if not coordinates or not isinstance(coordinates[0], list):
        return 1, 1
    inner = [_depth_and_positions(part) for part in coordinates]
    depths = {depth for depth, _ in inner}
    return (max(depths) + 1 if len(depths) == 1 else 0), sum(count for _, count in inner)


class Geometry(StrictModel):
    type: Literal["Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon"]
    coordinates: Coordinates

    @model_validator(mode="after")
    def _shaped_as_its_type(self) -> Geometry:
        depth, positions = _depth_and_positions(self.coordinates)
        if depth != GEOMETRY_DEPTHS[self.type]:
            raise ValueError(
                f"a {self.type}'s coordinates are lists nested {GEOMETRY_DEPTHS[self.type]} deep"
            )
        if positions > MAX_GEO_POSITIONS:
            raise ValueError(f"has {positions} positions, more than {MAX_GEO_POSITIONS}")
        return self


GeoPropertyValue = Annotated[str, Field(max_length=MAX_METADATA_BYTES)] | float | bool | None


def _properties_within_total(properties: dict[str, Any]) -> dict[str, Any]:
    _metadata_within_total(
        {key: value for key, value in properties.items() if isinstance(value, str)}
    )
    return properties


class GeoLocation(StrictModel):
    """Cognite's geographic metadata of a file: a GeoJSON Feature."""

    type: Literal["Feature"]
    geometry: Geometry
    properties: (
        Annotated[
            dict[
                Annotated[str, Field(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)],
                GeoPropertyValue,
            ],
            Field(max_length=MAX_METADATA_PAIRS),
            AfterValidator(_properties_within_total),
        ]
        | None
    ) = None


#: Cognite's file fields that only describe the file: segq keeps and shows
#: them as set, and gives them no meaning (securityCategories included:
#: segq's access is by project key only).
DESCRIPTIVE_FILE_FIELDS = (
    "source",
    "directory",
    "sourceCreatedTime",
    "sourceModifiedTime",
    "assetIds",
    "dataSetId",
    "labels",
    "geoLocation",
    "securityCategories",
)
#: The descriptive fields that are lists, which updates add to and remove from.
DESCRIPTIVE_LIST_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "assetIds": TypeAdapter(AssetIds),
    "labels": TypeAdapter(Labels),
    "securityCategories": TypeAdapter(SecurityCategories),
}


class FileCreation(StrictModel):
    """Cognite's file metadata, the first step of its two-step upload."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "photo.jpg", "externalId": "cam-3/0001", "mimeType": "image/jpeg"}
            ]
        }
    )

    name: FileName
    externalId: Identifier | None = None
    mimeType: MimeType | None = None
    metadata: MetadataMap | None = None
    instanceId: InstanceId | None = None
    source: FileSource | None = None
    directory: FileDirectory | None = None
    sourceCreatedTime: EpochMs | None = None
    sourceModifiedTime: EpochMs | None = None
    assetIds: AssetIds | None = None
    dataSetId: ResourceId | None = None
    labels: Labels | None = None
    geoLocation: GeoLocation | None = None
    securityCategories: SecurityCategories | None = None


class OverwriteQuery(BaseModel):
    overwrite: bool | None = None


class MultipartQuery(BaseModel):
    overwrite: bool | None = None
    parts: Annotated[int, Field(ge=1, le=250)]


class PartsQuery(BaseModel):
    parts: Annotated[int, Field(ge=1, le=250)]


class FileIdentifier(StrictModel):
    """Exactly one of the fields names the file."""

    id: FileId | None = None
    externalId: Identifier | None = None
    instanceId: InstanceId | None = None


class FileIdentifiers(StrictModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [{"id": 1}], "ignoreUnknownIds": True}]}
    )

    items: Annotated[list[FileIdentifier], Field(min_length=1, max_length=1000)]
    ignoreUnknownIds: bool = False


class FileIdentifierList(StrictModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [{"id": 1}]}]})

    items: Annotated[list[FileIdentifier], Field(min_length=1, max_length=1000)]


class TimeRange(StrictModel):
    min: EpochMs | None = None
    max: EpochMs | None = None


class DataSetReference(StrictModel):
    """A data set by id: segq keeps no data sets, so none has an externalId."""

    id: ResourceId


class LabelFilter(StrictModel):
    """Exactly one of the fields: files with any, or with all, of the labels."""

    containsAny: Annotated[list[Label], Field(min_length=1, max_length=100)] | None = None
    containsAll: Annotated[list[Label], Field(min_length=1, max_length=100)] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> LabelFilter:
        if (self.containsAny is None) == (self.containsAll is None):
            raise ValueError("give exactly one of containsAny and containsAll")
        return self


class FileFilter(StrictModel):
    externalIdPrefix: (
        Annotated[str, Field(max_length=MAX_EXTERNAL_ID_LENGTH, pattern=NO_CONTROL_CHARACTERS)]
        | None
    ) = None
    mimeType: Annotated[str, Field(max_length=255, pattern=NO_CONTROL_CHARACTERS)] | None = None
    uploaded: bool | None = None
    createdTime: TimeRange | None = None
    lastUpdatedTime: TimeRange | None = None
    uploadedTime: TimeRange | None = None
    source: FileSource | None = None
    directoryPrefix: Annotated[str, Field(max_length=512, pattern=NO_CONTROL_CHARACTERS)] | None = (
        None
    )
    sourceCreatedTime: TimeRange | None = None
    sourceModifiedTime: TimeRange | None = None
    name: FileName | None = None
    metadata: MetadataMap | None = None
    assetIds: Annotated[list[ResourceId], Field(min_length=1, max_length=100)] | None = None
    dataSetIds: Annotated[list[DataSetReference], Field(min_length=1, max_length=100)] | None = None
    labels: LabelFilter | None = None


#: Cognite's partition of a listing, "m/n": the m-th of n disjoint slices.
MAX_PARTITIONS = 100
PARTITION = re.compile(r"^([1-9][0-9]{0,2})/([1-9][0-9]{0,2})$")


def _partition_within(value: str) -> str:
    found = PARTITION.fullmatch(value)
    if found is None or not int(found[1]) <= int(found[2]) <= MAX_PARTITIONS:
        raise ValueError(f"must be m/n with 1 <= m <= n <= {MAX_PARTITIONS}")
    return value


Partition = Annotated[str, Field(max_length=7), AfterValidator(_partition_within)]


def partition_of(value: str) -> tuple[int, int]:
    """(m, n) of a checked partition "m/n"."""
    index, count = value.split("/")
    return int(index), int(count)


class FileListRequest(StrictModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"filter": {"mimeType": "image/png"}, "limit": 100}]}
    )

    filter: FileFilter | None = None
    limit: ListLimit | None = None
    cursor: Annotated[str, Field(max_length=64)] | None = None
    partition: Partition | None = None


class FileAggregateRequest(StrictModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"filter": {"uploaded": True}}]})

    filter: FileFilter | None = None


class FileNameSearch(StrictModel):
    name: (
        Annotated[str, Field(max_length=MAX_EXTERNAL_ID_LENGTH, pattern=NO_CONTROL_CHARACTERS)]
        | None
    ) = None


class FileSearchRequest(StrictModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"search": {"name": "photo"}, "limit": 10}]}
    )

    search: FileNameSearch | None = None
    filter: FileFilter | None = None
    limit: ListLimit | None = None


class NullableIdentifierChange(StrictModel):
    set: Identifier | None = None
    setNull: Literal[True] | None = None


class NameChange(StrictModel):
    set: FileName


class MetadataChange(StrictModel):
    set: MetadataMap | None = None
    add: MetadataMap | None = None
    remove: Annotated[list[str], Field(max_length=MAX_METADATA_PAIRS)] | None = None


class SourceChange(StrictModel):
    set: FileSource | None = None
    setNull: Literal[True] | None = None


class DirectoryChange(StrictModel):
    set: FileDirectory | None = None
    setNull: Literal[True] | None = None


class TimeChange(StrictModel):
    set: EpochMs | None = None
    setNull: Literal[True] | None = None


class MimeTypeChange(StrictModel):
    set: MimeType | None = None
    setNull: Literal[True] | None = None


class DataSetIdChange(StrictModel):
    set: ResourceId | None = None
    setNull: Literal[True] | None = None


class GeoLocationChange(StrictModel):
    set: GeoLocation | None = None
    setNull: Literal[True] | None = None


class IdListChange(StrictModel):
    """set replaces the list; add and remove change it (the result is checked whole)."""

    set: Annotated[list[ResourceId], Field(max_length=1000)] | None = None
    add: Annotated[list[ResourceId], Field(max_length=1000)] | None = None
    remove: Annotated[list[ResourceId], Field(max_length=1000)] | None = None


class LabelsChange(StrictModel):
    set: Labels | None = None
    add: Labels | None = None
    remove: Labels | None = None


class FileChanges(StrictModel):
    externalId: NullableIdentifierChange | None = None
    name: NameChange | None = None
    mimeType: MimeTypeChange | None = None
    metadata: MetadataChange | None = None
    source: SourceChange | None = None
    directory: DirectoryChange | None = None
    sourceCreatedTime: TimeChange | None = None
    sourceModifiedTime: TimeChange | None = None
    assetIds: IdListChange | None = None
    dataSetId: DataSetIdChange | None = None
    labels: LabelsChange | None = None
    geoLocation: GeoLocationChange | None = None
    securityCategories: IdListChange | None = None


class FileUpdate(FileIdentifier):
    update: FileChanges


class FileUpdates(StrictModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [{"id": 1, "update": {"name": {"set": "renamed.png"}}}]}]
        }
    )

    items: Annotated[list[FileUpdate], Field(min_length=1, max_length=1000)]


class MultipartCompletion(StrictModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"id": 1, "uploadId": "the uploadId that initmultipartupload answered"}]
        }
    )

    id: FileId
    uploadId: Annotated[str, Field(min_length=1, max_length=512)]


def list_limit(raw: str | None, default: int = 100) -> int:
    """The ``limit`` of a listing: an integer in [1, MAX_LIST_LIMIT], else 400."""
    if raw is None:
        return default
    return request_integer("limit", raw, minimum=1, maximum=MAX_LIST_LIMIT)


def encode_cursor(last_id: int) -> str:
    """Cursors are opaque to clients: base64 of the last id shown."""
    return base64.urlsafe_b64encode(str(last_id).encode()).decode().rstrip("=")


def cursor_after(raw: str | None) -> int | None:
    """The last id shown, from a ``cursor`` a listing handed out; 400 if it is not one."""
    if raw is None:
        return None
    try:
        text = base64.urlsafe_b64decode(raw.encode() + b"==").decode()
    except (ValueError, UnicodeError, binascii.Error):
        raise ApiError(400, "cursor is invalid") from None
    value = ascii_integer(text, minimum=1)
    # One spelling per cursor: base64 decoding skips characters outside its
    # alphabet and extra padding, and ints take leading zeros.
    if value is None or encode_cursor(value) != raw:
        raise ApiError(400, "cursor is invalid")
    return value


def checked_text(name: str, value: str, max_length: int = MAX_EXTERNAL_ID_LENGTH) -> str:
    """A client's text field (form, query, header) that will be stored or
    compared in the database: bounded and free of control characters."""
    if len(value) > max_length:
        raise ApiError(400, f"{name} is longer than {max_length} characters")
    if CONTROL_CHARACTERS.search(value):
        raise ApiError(400, f"{name} contains control characters")
    return check_stored_text(name, value)


def parse(model: type[ModelT], body: dict[str, Any]) -> ModelT:
    """Validate ``body`` or raise a 400 naming the first offending field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_refusal(exc) from None


#: What to do instead of a field of Cognite's that segq does not read, by
#: the field's name (or its parent's and its own, joined by a dot).
UNSUPPORTED_FIELD_ADVICE: dict[str, str] = {
    "assetExternalIds": "segq keeps no assets, only the assetIds files were given: "
    "filter on assetIds instead",
    "assetSubtreeIds": "segq keeps no asset hierarchy: filter on assetIds instead",
    "assetSubtreeExternalIds": "segq keeps no asset hierarchy: filter on assetIds instead",
    "dataSetIds.externalId": "segq keeps no data sets, only the dataSetId files were given: "
    "name data sets by id instead",
    "filter.geoLocation": "segq keeps files' geoLocation but does not filter on it: "
    "filter the listed files' geoLocation yourself",
}


def validation_refusal(exc: ValidationError, where: FieldPath = ()) -> ApiError:
    """A 400 naming the first field ``exc`` found wrong, under ``where``.
    A field the model does not have is said to be unsupported in plain
    words, with what to do instead where there is something; such a field
    is named before any other error, since it is what the caller must
    change first (and a field required beside it may be its replacement)."""
    errors = exc.errors(include_url=False)
    first = next((error for error in errors if error["type"] == "extra_forbidden"), errors[0])
    field: FieldPath = (*where, *first["loc"])
    if first["type"] != "extra_forbidden":
        return ApiError.about(field, 400, f": {first['msg']}")
    names = [part for part in field if isinstance(part, str)]
    advice = UNSUPPORTED_FIELD_ADVICE.get(".".join(names[-2:])) or UNSUPPORTED_FIELD_ADVICE.get(
        names[-1] if names else ""
    )
    instead = advice or "leave it out"
    name = names[-1] if names else "this field"
    return ApiError.about(field, 400, f": segq does not support {name!r} here; {instead}")
