"""Replicate's predictions API over segq's jobs, so that Replicate's own
client (``replicate`` on PyPI) works against segq by its base URL alone.

A prediction is a segq job of one item, created by the same job service as
the native route (limits, tenancy, queue, webhooks), with what Replicate's
shape needs later (model, version, input, links) kept in the job's options.
Errors are RFC 7807 problems, which the client raises as ReplicateError."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Literal

from flask import Response, g, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select

from segq.api.context import db, services
from segq.api.errors import ApiError
from segq.api.files import MAX_FORM_PARTS
from segq.api.images import inspect_image
from segq.api.item_sources import decode_data_url
from segq.api.job_items import items_of
from segq.api.job_service import cancel_job, create_segmentation_job, owned_job
from segq.api.job_waiting import Wait, WaitingPlace
from segq.api.json_body import max_job_body_bytes, parse_json, read_json_object
from segq.api.openapi import documented
from segq.api.parking import RESUMED_ENVIRON_KEY, waits_without_thread
from segq.api.peers.caller_fields import CallerFields
from segq.api.peers.peer_blueprint import PeerBlueprint
from segq.api.public_links import public_link
from segq.api.refusals import Envelope, register_refusals
from segq.api.request_integers import ascii_integer
from segq.api.route_waits import wait_for_job
from segq.api.schemas import (
    CONTROL_CHARACTERS,
    MAX_EXTERNAL_ID_LENGTH,
    STORED_METADATA,
    BoundingBox,
    FileReference,
    Point,
    PromptText,
    SegmentRequest,
    Webhook,
)
from segq.api.stored_files import discard_objects, store_image
from segq.job_document import MaskLinker
from segq.models import Job, JobItem, JobStatus, Project, StoredFile
from segq.projects import ensure_webhook_secret, hash_api_key
from segq.replicate_prediction import (
    PEER_KIND,
    PredictionOutput,
    iso_time,
    render_prediction,
    replicate_request,
)
from segq.url_guard import UrlRefused, check_url
from segq.webhook_events import ITEM_COMPLETED, JOB_CANCELED, JOB_COMPLETED, JOB_FAILED, JOB_STARTED

log = logging.getLogger(__name__)

#: Where Replicate's client sends everything; Moondream's ``/v1/segment`` shares it.
REPLICATE_PREFIX = "/v1"
replicate = PeerBlueprint("replicate", __name__, url_prefix=REPLICATE_PREFIX)
#: The environ key that carries a creation's Prefer: wait to the runs that
#: resume it.
PREDICTION_WAIT_ENVIRON_KEY = "segq.prediction_wait"

#: The model of points and boxes: whatever engine this server's workers run (SEGQ_MODEL).
MODEL = "segq/sam"
MODEL_OWNER, MODEL_NAME = MODEL.split("/")
#: The model that adds ``text`` (SAM 3's every instance of a phrase): the
#: same workers, which must run SEGQ_MODEL=sam3 for a text prompt.
SAM3_MODEL = "segq/sam3"
#: Predictions per page of GET /v1/predictions, as Replicate pages them.
PAGE_SIZE = 100
#: The longest ``Prefer: wait``, as Replicate bounds it (seconds).
MAX_WAIT_SECONDS = 60
#: What a ``Prefer: wait`` leaves of its N seconds for rendering the answer.
ANSWER_MARGIN_SECONDS = 0.25
MAX_POINTS = 32

#: Replicate's webhook events, as segq's: ``logs`` has none (segq records no
#: log lines as they happen), ``output`` is the item's result arriving.
EVENTS_OF_FILTER: dict[str, list[str]] = {
    "start": [JOB_STARTED],
    "output": [ITEM_COMPLETED],
    "logs": [],
    "completed": [JOB_COMPLETED, JOB_FAILED, JOB_CANCELED],
}
#: Replicate's default: new output, and the end.
DEFAULT_EVENTS_FILTER = ("output", "completed")


PREFER_WAIT = re.compile(r"^\s*wait(?:\s*=\s*(\d{1,6}))?\s*$", re.IGNORECASE)


def _in_field_order(schema: dict[str, Any]) -> None:
    # Cog numbers a model's inputs (x-order) so that forms list them in order.
    for order, field in enumerate(schema.get("properties", {}).values()):
        field["x-order"] = order


# Named as SamPredictor and Livepeer name them. Its JSON schema (the
# docstring included) is the Input of the model version's OpenAPI schema.
class PredictionInput(BaseModel):
    """One object of the image, shown by points, a box or both."""

    model_config = ConfigDict(
        extra="forbid", strict=True, title="Input", json_schema_extra=_in_field_order
    )

    image: Annotated[str, Field(min_length=1, description="an http(s) URL or a data: URI")]
    point_coords: (
        Annotated[
            list[Annotated[list[float], Field(min_length=2, max_length=2)]],
            Field(min_length=1, max_length=MAX_POINTS),
        ]
        | None
    ) = Field(None, description="[[x, y], ...] in pixels (in 0..1 with normalize_coords true)")
    point_labels: list[Annotated[int, Field(ge=0, le=1)]] | None = Field(
        None, description="1 foreground, 0 background; default all 1"
    )
    box: Annotated[list[float], Field(min_length=4, max_length=4)] | None = Field(
        None, description="[x1, y1, x2, y2] in pixels (in 0..1 with normalize_coords true)"
    )
    multimask_output: bool = Field(False, description="up to 3 candidate masks, best first")
    # Replicate has no convention of its own; segq's models take pixels, as
    # SamPredictor does, and ``normalize_coords: true`` says the coordinates
    # are fractions of the image instead. (Livepeer's route keeps SAM 2's
    # opposite meaning, since its runner passes the flag to SAM2ImagePredictor.)
    normalize_coords: bool = Field(
        False, description="coordinates are in 0..1 of the image (true) or pixels (false)"
    )


class Sam3PredictionInput(PredictionInput):
    """Every instance of what ``text`` names (SAM 3), or one object shown
    by points, a box or both."""

    model_config = ConfigDict(title="Input")

    text: PromptText | None = Field(
        None,
        description='a phrase ("person", "red car"): its every instance, best first '
        "(needs SEGQ_MODEL=sam3); not with point_coords or box",
    )


#: Each model's input, by name.
MODEL_INPUTS: dict[str, type[PredictionInput]] = {
    MODEL: PredictionInput,
    SAM3_MODEL: Sam3PredictionInput,
}


ReplicateEvent = Literal["start", "output", "logs", "completed"]


class PredictionRequest(BaseModel):
    """The body Replicate's client sends; ``input`` is checked on its own."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "version": "segq/sam:default",
                    "input": {
                        "image": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAAC"
                        "QkWg2AAAAGklEQVR42mM8oaHBQApgYiARjGoY1TB0NAAAjC0BOJDndDkAAAAASUVORK5CYII=",
                        "point_coords": [[8, 8]],
                    },
                }
            ]
        },
    )

    version: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    input: dict[str, Any]
    webhook: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    webhook_completed: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    webhook_events_filter: (
        Annotated[list[ReplicateEvent], Field(min_length=1, max_length=4)] | None
    ) = None
    stream: bool | None = None


class PreferWaitHeader(BaseModel):
    prefer: Annotated[str, Field(pattern=r"^wait(=\d+)?$")] | None = Field(
        None,
        alias="Prefer",
        description="wait=N: answer when the prediction finishes or after N seconds (at most 60)",
    )


# Errors: RFC 7807 problems for everything this blueprint answers.


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    response = jsonify({"type": "about:blank", "title": phrase, "detail": detail, "status": status})
    response.status_code = status
    response.mimetype = "application/problem+json"
    response.headers.update(headers or {})
    return response


def _replicate_status(status: int) -> int:
    """Replicate answers input it cannot use with 422; it has no 415
    (api/refusals.py says why)."""
    return 422 if status == 415 else status


REPLICATE_ENVELOPE = Envelope(
    "replicate",
    lambda refused: problem(refused.code, refused.message, refused.headers),
    peer_status=_replicate_status,
)
register_refusals(replicate, REPLICATE_ENVELOPE)


@replicate.before_request
def _note_arrival() -> None:
    g.arrived = time.monotonic()


@replicate.before_request
def _authenticate() -> None:
    """Replicate's client sends ``Authorization: Bearer <token>`` (older
    ones ``Token <token>``): here the token is a segq project key, and the
    project is the key's."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() not in ("bearer", "token") or not key:
        raise ApiError(
            401,
            "missing API token: send 'Authorization: Bearer <segq project key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    project = services().projects_by_key.project(db(), key)
    if project is None:
        raise ApiError(401, "invalid API token", headers={"WWW-Authenticate": "Bearer"})
    # Once per request: a parked Prefer: wait's later runs are the same one.
    resumed = request.environ.get(RESUMED_ENVIRON_KEY) is not None
    if not resumed and not services().rate_limiter.allow(hash_api_key(key)):
        raise ApiError(429, "too many requests for this key", headers={"Retry-After": "1"})
    g.project = project


def _project() -> Project:
    project: Project = g.project
    return project


# Input: Replicate's field names to segq's request.


def _input_error(exc: ValidationError, model: str) -> ApiError:
    first = exc.errors(include_url=False)[0]
    where = "input" + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
    )
    if first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
        inputs = ", ".join(MODEL_INPUTS[model].model_fields)
        return ApiError(422, f"{where}: {model} has no such input; its inputs are {inputs}")
    return ApiError(422, f"{where}: {first['msg']}")


def _image_source(image: str) -> tuple[FileReference, tuple[int, int] | None]:
    """The item for ``image`` and, when segq knows it now (inline images and
    files uploaded to /v1/files), its (width, height)."""
    settings = services().settings
    base = _files_url()
    if image.startswith(base):
        file_id = ascii_integer(image[len(base) :], minimum=1)
        stored = (
            db().scalar(
                select(StoredFile).where(
                    StoredFile.id == file_id, StoredFile.project_id == _project().id
                )
            )
            if file_id is not None
            else None
        )
        if stored is None or stored.width is None or stored.height is None:
            raise ApiError(422, f"input.image: file {image[len(base) :][:32]} not found")
        return FileReference(fileId=stored.id), (stored.width, stored.height)
    if image[:5].lower() == "data:":
        try:
            data = decode_data_url(("input", "image"), image, settings.max_upload_bytes)
        except ApiError as exc:
            raise ApiError(422, exc.message) from None
        info = inspect_image(data, settings, field=("input", "image"))
        return FileReference(imageData=image), (info.width, info.height)
    if image[:8].lower() == "https://" or image[:7].lower() == "http://":
        try:
            check_url(image, settings.fetch_policy())
        except UrlRefused as exc:
            raise ApiError(422, f"input.image: {exc}") from None
        return FileReference(fileUrl=image), None
    raise ApiError(422, "input.image must be an http(s) URL or a data: URI")


def _scaled(
    field: str, values: list[float], size: tuple[int, int] | None, in_pixels: bool
) -> list[float]:
    """``values`` (x, y, x, y, ...) in 0..1 of the image's size."""
    if not in_pixels:
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ApiError(422, f"{field} must be in 0..1 with normalize_coords true")
        return values
    if size is None:
        raise ApiError(
            422,
            f"{field} is in pixels, but segq learns an image URL's size only when a "
            "worker fetches it: send normalize_coords=true with coordinates in 0..1, "
            "or the image as a data: URI",
        )
    width, height = size
    scaled = [v / (width if index % 2 == 0 else height) for index, v in enumerate(values)]
    if any(not 0.0 <= v <= 1.0 for v in scaled):
        raise ApiError(422, f"{field} lies outside the {width}x{height} image")
    return scaled


def segment_request_for(
    model_input: PredictionInput, raw_input: dict[str, Any], webhook: Webhook | None
) -> tuple[SegmentRequest, dict[str, Any]]:
    """segq's request for the prediction, and its input as the prediction
    shows it (an inline image shortened: it is stored as a file, not echoed)."""
    source, size = _image_source(model_input.image)
    in_pixels = not model_input.normalize_coords
    points: list[Point] | None = None
    if model_input.point_coords is not None:
        labels = model_input.point_labels or [1] * len(model_input.point_coords)
        if len(labels) != len(model_input.point_coords):
            raise ApiError(422, "input.point_labels must have one label per point of point_coords")
        points = []
        for index, (coords, label) in enumerate(zip(model_input.point_coords, labels, strict=True)):
            x, y = _scaled(f"input.point_coords[{index}]", coords, size, in_pixels)
            if any((p.x, p.y) == (x, y) for p in points):
                raise ApiError(422, f"input.point_coords[{index}] repeats an earlier point")
            points.append(Point(x=x, y=y, label=label))
    elif model_input.point_labels is not None:
        raise ApiError(422, "input.point_labels needs point_coords")
    text = model_input.text if isinstance(model_input, Sam3PredictionInput) else None
    if text is not None and (points is not None or model_input.box is not None):
        raise ApiError(
            422,
            "input.text is a text prompt of its own: give point_coords and box in "
            "another prediction",
        )
    box: BoundingBox | None = None
    if model_input.box is not None:
        x1, y1, x2, y2 = _scaled("input.box", model_input.box, size, in_pixels)
        if x1 >= x2 or y1 >= y2:
            raise ApiError(422, "input.box must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2")
        box = BoundingBox(xMin=x1, yMin=y1, xMax=x2, yMax=y2)
    if points is None and box is None and text is None:
        raise ApiError(
            422,
            "input: give point_coords or box (or both)"
            + (", or text" if isinstance(model_input, Sam3PredictionInput) else ""),
        )
    segment_request = SegmentRequest(
        items=[source],
        points=points,
        boundingBox=box,
        text=text,
        multimaskOutput=model_input.multimask_output,
        outputs=["mask"],
        webhook=webhook,
    )
    shown = dict(raw_input)
    if model_input.image[:5].lower() == "data:" and size is not None:
        media_type = model_input.image.partition(",")[0]
        shown["image"] = f"{media_type},... ({size[0]}x{size[1]}, stored as a file)"
    return segment_request, shown


def _input_fields(segment_request: SegmentRequest) -> CallerFields:
    """Replicate's names for the fields of the job ``segment_request_for`` made."""
    fields = CallerFields()
    fields.name(("items", 0), "input.image")
    for index in range(len(segment_request.points or ())):
        fields.name(("points", index), f"input.point_coords[{index}]")
        fields.name(("points", index, "label"), f"input.point_labels[{index}]")
    fields.name(("boundingBox",), "input.box")
    fields.name(("text",), "input.text")
    fields.name(("webhook",), "webhook")
    return fields


def _webhook(body: PredictionRequest) -> Webhook | None:
    url = body.webhook or body.webhook_completed
    if url is None:
        return None
    wanted: list[str] = list(body.webhook_events_filter or ())
    wanted = wanted or (["completed"] if body.webhook is None else list(DEFAULT_EVENTS_FILTER))
    events = sorted({event for name in wanted for event in EVENTS_OF_FILTER[name]})
    if not events:
        raise ApiError(
            422,
            'webhook_events_filter: segq sends no "logs" events; add start, output or completed',
        )
    return Webhook(url=url, events=events)


def _predictions_url() -> str:
    return public_link(services().settings.public_url, "/v1/predictions")


def _prefer_wait() -> float | None:
    """Seconds asked for by ``Prefer: wait[=N]``, at most 60; None if not asked.
    Other preferences are ignored, as RFC 7240 says."""
    for preference in request.headers.get("Prefer", "").split(","):
        found = PREFER_WAIT.match(preference)
        if found:
            seconds = int(found.group(1)) if found.group(1) else MAX_WAIT_SECONDS
            return float(min(max(seconds, 1), MAX_WAIT_SECONDS))
    return None


def _prediction_request() -> PredictionRequest:
    raw = read_json_object(max_bytes=max_job_body_bytes(services().settings.max_upload_bytes))
    try:
        return PredictionRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(422, f"{where}: {first['msg']}") from None


def _create(body: PredictionRequest, model: str, version: str) -> tuple[Response, int]:
    if body.stream:
        raise ApiError(422, "stream: segq does not stream predictions; poll or use Prefer: wait")
    try:
        model_input = MODEL_INPUTS[model].model_validate(body.input)
    except ValidationError as exc:
        raise _input_error(exc, model) from None
    webhook = _webhook(body)
    if webhook is not None:
        try:
            check_url(webhook.url, services().settings.webhook_policy())
        except UrlRefused as exc:
            raise ApiError(422, f"webhook: {exc}") from None
    segment_request, shown_input = segment_request_for(model_input, body.input, webhook)
    peer: dict[str, Any] = {
        "kind": PEER_KIND,
        "model": model,
        "version": version,
        "input": shown_input,
        # Kept for the webhooks the worker renders: it may not know the API's URL.
        "predictionsUrl": _predictions_url(),
    }
    with _input_fields(segment_request).renaming():
        job = create_segmentation_job(
            db(), services(), _project().id, segment_request, None, peer_request=peer
        ).job
    seconds = _prefer_wait()
    if seconds is None:
        return _prediction_answer(job), 201
    # Prefer: wait is a preference: with every waiting place of this
    # process taken, the prediction is answered as it is.
    place = services().waiting_requests.reserve(parkable=waits_without_thread())
    if place is None:
        return _prediction_answer(job, unfinished_as_starting=True), 201
    # Counted from the request's arrival, less the time to answer: the
    # client stops reading half a second after the N seconds it asked for.
    wait = Wait(int(seconds), deadline=g.arrived + seconds - ANSWER_MARGIN_SECONDS)
    return _waited_prediction(job, PredictionWait(wait, place))


@dataclass(frozen=True)
class PredictionWait:
    """A creation's ``Prefer: wait``, carried to the runs that resume it."""

    wait: Wait
    place: WaitingPlace


def _waited_prediction(job: Job, prediction_wait: PredictionWait) -> tuple[Response, int]:
    """The created prediction once finished, or as it is when the wait runs
    out (unfinished: "starting", as Replicate answers it). Parked the way
    every wait for a job is (api/route_waits.py's wait_for_job); a resumed
    run is a GET of the prediction that answers as its creation would."""
    path = url_for(f"{replicate.name}.get_prediction", prediction_id=str(job.id))
    resume = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path.removeprefix(request.script_root),
        "QUERY_STRING": "",
        PREDICTION_WAIT_ENVIRON_KEY: prediction_wait,
    }
    if wait_for_job(job.id, prediction_wait.wait, resume, prediction_wait.place):
        # Dropped by the server: the resumed run answers.
        return Response(status=204), 201
    job = owned_job(db(), _project().id, job.id)
    return _prediction_answer(job, unfinished_as_starting=True), 201


def _mask_linker() -> MaskLinker:
    settings = services().settings
    storage = services().storage

    def link_mask(key: str) -> tuple[str, int]:
        url = storage.presigned_get_url(key, settings.url_expires_seconds)
        # Replicate shows no expiry; the linker's second value goes unused.
        return public_link(settings.public_url, url), 0

    return link_mask


def _prediction_answer(job: Job, *, unfinished_as_starting: bool = False) -> Response:
    return jsonify(
        render_prediction(
            job, items_of(db(), job), _mask_linker(), unfinished_as_starting=unfinished_as_starting
        )
    )


def _prediction(prediction_id: str) -> Job:
    """The prediction's job, of this project and created as a prediction;
    anything else is 404 (another project's job too: no existence oracle)."""
    job_id = ascii_integer(prediction_id, minimum=1, maximum=2**63 - 1)
    job = (
        db().scalar(select(Job).where(Job.id == job_id, Job.project_id == _project().id))
        if job_id is not None
        else None
    )
    if job is None or replicate_request(job) is None:
        raise ApiError(404, f"prediction {prediction_id[:64]} not found")
    return job


def _model_name(owner: str, name: str) -> str:
    model = f"{owner}/{name}"
    if model not in MODEL_INPUTS:
        raise ApiError(
            404, f"model {model[:100]} not found; this server runs {' and '.join(MODEL_INPUTS)}"
        )
    return model


@replicate.post("/predictions")
@documented(
    "Create a prediction (segq/sam3's version runs it; any other runs segq/sam)",
    {201: ("the prediction", None)},
    errors=(401, 404, 422, 429, 503),
    json_body=PredictionRequest,
    headers=PreferWaitHeader,
)
def create_prediction() -> tuple[Response, int]:
    """``version`` may be ``<model>:<id>`` (any id), segq/sam3's version id,
    or any other id, which runs segq/sam."""
    body = _prediction_request()
    version = body.version
    model = MODEL
    if version is not None and ":" in version:
        owner_name, _, version = version.partition(":")
        owner, _, name = owner_name.partition("/")
        model = _model_name(owner, name)
    elif version == VERSION_IDS[SAM3_MODEL]:
        model = SAM3_MODEL
    if not version:
        raise ApiError(422, "version: give the model's version (any id runs segq/sam)")
    return _create(body, model, version)


@replicate.post("/models/<owner>/<name>/predictions")
@documented(
    "Create a prediction of the model (segq/sam or segq/sam3)",
    {201: ("the prediction", None)},
    errors=(401, 404, 422, 429, 503),
    json_body=PredictionRequest,
    headers=PreferWaitHeader,
)
def create_model_prediction(owner: str, name: str) -> tuple[Response, int]:
    model = _model_name(owner, name)
    return _create(_prediction_request(), model, VERSION_IDS[model])


@replicate.get("/predictions/<prediction_id>")
@documented("Read a prediction", {200: ("the prediction", None)}, errors=(401, 404))
def get_prediction(prediction_id: str) -> Response | tuple[Response, int]:
    job = _prediction(prediction_id)
    resumed: PredictionWait | None = request.environ.get(PREDICTION_WAIT_ENVIRON_KEY)
    if resumed is not None:
        # A creation's Prefer: wait, resumed (_waited_prediction).
        return _waited_prediction(job, resumed)
    return _prediction_answer(job)


@replicate.post("/predictions/<prediction_id>/cancel")
@documented("Cancel a prediction", {200: ("the prediction", None)}, errors=(401, 404))
def cancel_prediction(prediction_id: str) -> Response:
    """A finished prediction is answered as it is (Replicate's way), not 409."""
    job = _prediction(prediction_id)
    if not JobStatus(job.status).finished:
        try:
            job = cancel_job(db(), services(), _project().id, job.id)
        except ApiError as refused:
            if refused.code != 409:
                raise
            # It finished since it was read: answered as it is now.
            job = _prediction(prediction_id)
    return _prediction_answer(job)


@replicate.get("/predictions")
@documented("List predictions, newest first", {200: ("a page of predictions", None)}, errors=(401,))
def list_predictions() -> Response:
    """Newest first, ``PAGE_SIZE`` a page, by keyset on the id; ``next`` is
    the URL of the next page, as Replicate's client follows it."""
    query = select(Job).where(
        Job.project_id == _project().id, Job.options[("peer", "kind")].as_string() == PEER_KIND
    )
    raw_cursor = request.args.get("cursor")
    if raw_cursor is not None:
        cursor = ascii_integer(raw_cursor, minimum=1, maximum=2**63 - 1)
        # The spelling ``next`` wrote, not another (leading zeros).
        if cursor is None or str(cursor) != raw_cursor:
            raise ApiError(400, "cursor is invalid")
        query = query.where(Job.id < cursor)
    page = list(db().scalars(query.order_by(Job.id.desc()).limit(PAGE_SIZE + 1)))
    more = len(page) > PAGE_SIZE
    page = page[:PAGE_SIZE]
    items: dict[int, list[JobItem]] = {job.id: [] for job in page}
    if page:
        for item in db().scalars(
            select(JobItem).where(JobItem.job_id.in_(items)).order_by(JobItem.position)
        ):
            items[item.job_id].append(item)
    link_mask = _mask_linker()
    results = [render_prediction(job, items[job.id], link_mask) for job in page]
    next_url = (
        public_link(services().settings.public_url, f"/v1/predictions?cursor={page[-1].id}")
        if more
        else None
    )
    return jsonify({"previous": None, "next": next_url, "results": results})


# The model, its version and the key's account, as Replicate's client reads
# them (replicate.models.get, .versions.list, replicate.accounts.current).


#: The version's OpenAPI schema, as Cog writes one for a model: its Input and
#: Output are the JSON schemas of the models that check the input and shape
#: the output.
def _openapi_schema(model: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": model, "version": "1"},
        "components": {
            "schemas": {
                "Input": MODEL_INPUTS[model].model_json_schema(),
                "Output": PredictionOutput.model_json_schema(),
            }
        },
    }


OPENAPI_SCHEMAS = {model: _openapi_schema(model) for model in MODEL_INPUTS}
#: Named by its content, as Replicate's version ids are: a new schema is a
#: new version. Any other id runs segq/sam.
VERSION_IDS = {
    model: hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()
    for model, schema in OPENAPI_SCHEMAS.items()
}
#: When this version's schema was written; Replicate's client requires a date.
VERSION_CREATED_AT = "2026-01-01T00:00:00Z"


def _version(model: str, version_id: str) -> dict[str, Any]:
    return {
        "id": version_id,
        "created_at": VERSION_CREATED_AT,
        "cog_version": "segq",
        "openapi_schema": OPENAPI_SCHEMAS[model],
    }


def _single_page(result: dict[str, Any]) -> Response:
    return jsonify({"previous": None, "next": None, "results": [result]})


def _model(model: str) -> dict[str, Any]:
    """One of segq's models as Replicate shows a model. Visible to this
    server's keys only; ``run_count``: the key's project's predictions of it."""
    settings = services().settings
    engine = settings.model or "the engine each worker finds (SEGQ_MODEL unset)"
    run_count = db().scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.project_id == _project().id,
            Job.options[("peer", "kind")].as_string() == PEER_KIND,
            Job.options[("peer", "model")].as_string() == model,
        )
    )
    description = f"Segment Anything on this segq server: {engine}"
    if model == SAM3_MODEL:
        description = (
            "SAM 3 on this segq server: every instance of what input.text names, or "
            f"points and boxes; text needs SEGQ_MODEL=sam3 (this server: {engine})"
        )
    owner, name = model.split("/")
    return {
        "url": public_link(settings.public_url, f"/v1/models/{model}"),
        "owner": owner,
        "name": name,
        "description": description,
        "visibility": "private",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": run_count or 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": _version(model, VERSION_IDS[model]),
    }


@replicate.get("/models")
@documented("List models: segq/sam and segq/sam3", {200: ("a page of models", None)}, errors=(401,))
def list_models() -> Response:
    return jsonify(
        {"previous": None, "next": None, "results": [_model(model) for model in MODEL_INPUTS]}
    )


@replicate.get("/models/<owner>/<name>")
@documented("Read the model", {200: ("the model", None)}, errors=(401, 404))
def get_model(owner: str, name: str) -> Response:
    return jsonify(_model(_model_name(owner, name)))


@replicate.get("/models/<owner>/<name>/versions")
@documented("List the model's versions", {200: ("a page of versions", None)}, errors=(401, 404))
def list_versions(owner: str, name: str) -> Response:
    model = _model_name(owner, name)
    return _single_page(_version(model, VERSION_IDS[model]))


@replicate.get("/models/<owner>/<name>/versions/<version_id>")
@documented(
    "Read a model version: its input and output schemas",
    {200: ("the version", None)},
    errors=(401, 404),
)
def get_version(owner: str, name: str, version_id: str) -> Response:
    """What ``replicate.run("segq/sam:<id>")`` reads before waiting (output
    not an iterator). Any id is this version: predictions take any id."""
    return jsonify(_version(_model_name(owner, name), version_id[:200]))


@replicate.get("/account")
@documented("The account of the key: its project", {200: ("the account", None)}, errors=(401,))
def current_account() -> Response:
    """The account of the key: its project, as an organization."""
    project = _project()
    return jsonify(
        {"type": "organization", "username": project.name, "name": project.name, "github_url": None}
    )


@replicate.get("/webhooks/default/secret")
@documented("The webhook signing secret", {200: ("the secret", None)}, errors=(401,))
def webhook_secret() -> Response:
    """The project's signing secret, as ``replicate.webhooks.default.secret()``
    reads it; the same one segq's own route shows."""
    session = db()
    project = ensure_webhook_secret(session, _project().id)
    session.commit()
    assert project.webhook_secret is not None
    return jsonify({"key": project.webhook_secret})


# Files: where Replicate's client uploads a file object given as an input
# (``open("photo.jpg", "rb")``), then passes the answer's ``urls.get`` as the
# input's value. Stored as a file of the project, like a native upload.


def _files_url() -> str:
    return public_link(services().settings.public_url, "/v1/files/")


def _file_answer(stored: StoredFile) -> Response:
    return jsonify(
        {
            "id": str(stored.id),
            "name": stored.name or "",
            "content_type": stored.mime_type,
            "size": stored.size,
            "etag": stored.sha256,
            "checksums": {"sha256": stored.sha256},
            "metadata": stored.file_metadata or {},
            "created_at": iso_time(stored.created_time),
            "expires_at": None,
            "urls": {"get": f"{_files_url()}{stored.id}"},
        }
    )


@replicate.post("/files")
@documented(
    "Upload a file (multipart, the image in field content)",
    {201: ("the file", None)},
    errors=(401, 413, 422),
)
def create_file() -> tuple[Response, int]:
    """Multipart, the image in field ``content``; optional ``metadata``, a
    JSON object of strings (segq keeps files' metadata as strings)."""
    request.max_form_parts = MAX_FORM_PARTS
    upload = request.files.get("content")
    if upload is None:
        raise ApiError(422, "content: send the file as multipart/form-data field 'content'")
    metadata: dict[str, str] | None = None
    if (raw_metadata := request.form.get("metadata")) is not None:
        try:
            metadata = STORED_METADATA.validate_python(parse_json(raw_metadata, "metadata"))
        except ValidationError:
            raise ApiError(422, "metadata must be a JSON object of strings") from None
    name = CONTROL_CHARACTERS.sub("", upload.filename or "")[:MAX_EXTERNAL_ID_LENGTH] or None
    settings = services().settings
    data = upload.stream.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, f"content is larger than {settings.max_upload_bytes} bytes")
    info = inspect_image(data, settings, field=("content",))
    session = db()
    stored = store_image(session, services().storage, _project().id, data, info, name=name)
    stored.file_metadata = metadata
    try:
        session.commit()
    except Exception:
        session.rollback()
        discard_objects(services().storage, [stored.storage_key])
        raise
    return _file_answer(stored), 201


@replicate.get("/files/<file_id>")
@documented("Read a file", {200: ("the file", None)}, errors=(401, 404))
def get_file(file_id: str) -> Response:
    found = ascii_integer(file_id, minimum=1)
    stored = (
        db().scalar(
            select(StoredFile).where(StoredFile.id == found, StoredFile.project_id == _project().id)
        )
        if found is not None
        else None
    )
    if stored is None:
        raise ApiError(404, f"file {file_id[:32]} not found")
    return _file_answer(stored)
