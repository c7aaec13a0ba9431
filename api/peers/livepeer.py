"""Livepeer's AI runner route, ``POST /segment-anything-2``, as its Python
SDK (livepeer-ai) sends it and reads the answer: a multipart form with
JSON arrays in text fields, answered with the masks, scores and logits as
JSON-array strings, best score first; errors as ``{"detail": {"msg": …}}``
with the runner's status codes (400 input, 401 key, 500 server), and 422
in FastAPI's list shape for a form field that is missing or not a boolean.

A thin adapter: the image becomes an inline image of a one-item segq job,
the request waits for it, parked (api/peers/synchronous_jobs.py: the same
call again gets the same job), and the answer is read from the item's
stored masks and logits."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from flask import Response, jsonify, request

from segq.api.context import services
from segq.api.errors import ApiError
from segq.api.images import inspect_image
from segq.api.openapi import documented
from segq.api.peers.caller_fields import CallerFields
from segq.api.peers.peer_blueprint import PeerBlueprint
from segq.api.peers.synchronous_jobs import (
    PeerWait,
    finished_or_parked,
    parked_answer,
    project_for_key,
    resumed_peer_wait,
    start_peer_job,
    stored_logits,
    stored_mask,
)
from segq.api.refusals import Envelope, register_refusals
from segq.api.schemas import SegmentRequest, parse
from segq.contract import LOGITS_KEY, MASK_KEY
from segq.engine_catalogue import Capability, LogitsFrame, engine_entry
from segq.mask_logits import encode_logits
from segq.models import Project

log = logging.getLogger(__name__)

livepeer = PeerBlueprint("livepeer", __name__)

#: The route, as it names the calls made to it (api/peers/synchronous_jobs.py).
ROUTE = "livepeer/segment-anything-2"

#: The Hugging Face ids a Livepeer client may name: any SAM checkpoint means
#: the engine this server runs (the answer does not depend on the name).
SAM_MODEL_ID_PREFIX = "facebook/sam"
#: The largest side of a mask_input: SAM's and SAM 2's low-resolution
#: logits are 256 x 256 (smaller models' smaller; the engine checks the fit).
MAX_MASK_INPUT_SIDE = 256
#: Statuses the SDK maps to its HTTPError with ``detail.msg``; others it
#: raises as SDKError, and 429/503 it may retry, so those keep their codes,
#: as does 413 (an answer or body over segq's bounds).
KEPT_STATUSES = frozenset({400, 401, 413, 429, 503, 504})
#: The masks a job gives at most (SAM's three with multimask_output).
MAX_MASKS = 3
#: What one value of a mask given as logits (or of the low-resolution
#: logits) takes at most in the answer: a float32 as json.dumps writes its
#: float64 ("-1.2345678437294438e-05"), and the ", " after it.
LOGIT_VALUE_BYTES = 25
#: A 0.0/1.0 mask value and its separator.
MASK_VALUE_BYTES = 5
#: The answer's keys, scores and outer brackets.
ANSWER_OVERHEAD_BYTES = 1024
#: About how much of the answer is written at once.
ANSWER_CHUNK_BYTES = 256 * 1024


class FormFieldError(Exception):
    """A form field FastAPI itself would refuse: 422 in its list shape."""

    def __init__(self, field: str, message: str, kind: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.kind = kind


@livepeer.post("/segment-anything-2")
@documented(
    "Segment an image with SAM 2 (multipart, as the livepeer-ai SDK sends it)",
    {200: ("masks, scores and logits as JSON-array strings, best score first", None)},
    errors=(400, 401, 413, 422, 429, 500, 503, 504),
)
def segment_anything_2() -> Response:
    project = project_for_key(_bearer_key(), "'Authorization: Bearer <key>'")
    peer_wait = resumed_peer_wait() or _start_call(project)
    finished = finished_or_parked(project, peer_wait)
    if finished is None:
        return parked_answer()
    return_logits = bool(peer_wait.answer_options["returnLogits"])

    segments = finished.segments  # best score first, as Livepeer sorts them
    logits = [stored_logits(s[LOGITS_KEY]) for s in segments if LOGITS_KEY in s]
    masks: Iterable[npt.NDArray[np.float32] | npt.NDArray[np.bool_]]
    if return_logits and logits:
        entry = engine_entry(services().settings.model)
        stretched = entry is not None and entry.logits_frame is LogitsFrame.STRETCHED_SQUARE
        width, height = finished.width, finished.height
        # Made one at a time, as the answer is written.
        masks = (
            full_size_logits(low_res, width, height, stretched=stretched) for low_res in logits
        )
    else:
        masks = [stored_mask(s[MASK_KEY]) for s in segments]
    scores = [s["score"] for s in segments]
    return Response(answer_chunks(masks, scores, logits), mimetype="application/json")


def _start_call(project: Project) -> PeerWait:
    """Read and check the form, and start (or find) the call's job."""
    upload = request.files.get("image")
    if upload is None:
        raise FormFieldError("image", "Field required", "missing")
    model_id = request.form.get("model_id", "")
    if model_id and not model_id.startswith(SAM_MODEL_ID_PREFIX):
        raise ApiError(
            400, f"pipeline configured with segq's SAM engine but called with {model_id}"
        )
    multimask = _form_bool("multimask_output", default=True)
    return_logits = _form_bool("return_logits", default=True)
    pixels = _form_bool("normalize_coords", default=True)
    mask_input = _mask_input(_json_field("mask_input"))
    point_coords = _json_field("point_coords")
    point_labels = _json_field("point_labels")
    box = _json_field("box")

    data = upload.read()
    settings = services().settings
    info = inspect_image(data, settings, field=("image",))
    gives_logits = _engine_gives_logits()
    answer_bytes = answer_size_bound(
        info.width,
        info.height,
        masks=MAX_MASKS if multimask else 1,
        logits=gives_logits,
        masks_as_logits=return_logits and gives_logits,
    )
    if answer_bytes > settings.max_answer_bytes:
        # Refused before the job runs: the answer could not be sent.
        raise ApiError(
            413,
            f"the answer for a {info.width}x{info.height} image would be up to "
            f"{answer_bytes} bytes, more than the {settings.max_answer_bytes} allowed "
            "(SEGQ_MAX_ANSWER_BYTES)",
        )
    body: dict[str, Any] = {
        "items": [{"imageData": "data:;base64," + base64.b64encode(data).decode()}],
        "multimaskOutput": multimask,
        "outputs": ["mask", "logits"] if gives_logits else ["mask"],
    }
    scale = (info.width, info.height) if pixels else (1, 1)
    body |= _prompt(point_coords, point_labels, box, scale)
    with _runner_fields(len(body.get("points", ()))).renaming():
        segment_request = parse(SegmentRequest, body)
        return start_peer_job(
            project,
            ROUTE,
            segment_request,
            {"returnLogits": return_logits},
            inline_mask_input=mask_input,
        )


def answer_size_bound(
    width: int, height: int, *, masks: int, logits: bool, masks_as_logits: bool
) -> int:
    """The most bytes the answer for a ``width`` x ``height`` image can
    take, from what it will hold: ``masks`` masks at the image's size
    (logits, or 0.0/1.0), and as many low-resolution logits when ``logits``."""
    per_value = LOGIT_VALUE_BYTES if masks_as_logits else MASK_VALUE_BYTES
    # Each row's brackets and separator.
    size = masks * height * (width * per_value + 4)
    if logits:
        side = MAX_MASK_INPUT_SIDE
        size += masks * side * (side * LOGIT_VALUE_BYTES + 4)
    return size + ANSWER_OVERHEAD_BYTES


def answer_chunks(
    masks: Iterable[npt.NDArray[np.float32] | npt.NDArray[np.bool_]],
    scores: list[float],
    logits: list[npt.NDArray[np.float32]],
) -> Iterator[bytes]:
    """The answer's JSON, written as it goes: ``masks``, ``scores`` and
    ``logits`` each a JSON array in a string (as json.dumps writes them,
    which needs no escaping inside a string), so the whole answer is never
    held; a chunk is about ANSWER_CHUNK_BYTES."""
    yield b'{"masks":"'
    yield from _array_chunks(masks)
    yield b'","scores":"' + json.dumps(scores).encode() + b'","logits":"'
    yield from _array_chunks(logits)
    yield b'"}'


def _array_chunks(
    arrays: Iterable[npt.NDArray[np.float32] | npt.NDArray[np.bool_]],
) -> Iterator[bytes]:
    pending: list[str] = ["["]
    held = 0
    for index, array in enumerate(arrays):
        pending.append(", [" if index else "[")
        for row_index, row in enumerate(array):
            values = row.astype(np.float32).tolist() if row.dtype == np.bool_ else row.tolist()
            text = json.dumps(values)
            pending.append(", " + text if row_index else text)
            held += len(text)
            if held >= ANSWER_CHUNK_BYTES:
                yield "".join(pending).encode()
                pending, held = [], 0
        pending.append("]")
    pending.append("]")
    yield "".join(pending).encode()


def _mask_input(value: Any) -> bytes | None:
    """The runner's ``mask_input``: an earlier answer's low-resolution
    logits, (1, 256, 256) as SAM2ImagePredictor takes them for one prompt
    ((256, 256) too), as the .npy the worker reads. A size the model does
    not take fails the job (422), as the runner's model would fail."""
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise ApiError(400, "mask_input must be a (1, 256, 256) array of numbers") from None
    side = array.shape[-1] if array.ndim in (2, 3) else 0
    if array.shape not in ((side, side), (1, side, side)) or not 0 < side <= MAX_MASK_INPUT_SIDE:
        raise ApiError(
            400, f"mask_input must be a (1, 256, 256) array of numbers, got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise ApiError(400, "mask_input must hold finite numbers")
    return encode_logits(array.reshape(side, side))


def full_size_logits(
    low_res: npt.NDArray[np.float32], width: int, height: int, *, stretched: bool = False
) -> npt.NDArray[np.float32]:
    """(height, width) float32: the mask logits at the image's size, made
    from the (L, L) low-resolution logits as the model's own postprocessing
    makes them. SAM (``Sam.postprocess_masks``) padded the image into its
    square input: bilinear to that square (4L), cropped to where the image
    lay in it (its longest side scaled to 4L), bilinear to the image. SAM 2
    (``stretched``; ``SAM2Transforms.postprocess_masks``) stretched the
    image to its square: bilinear straight to the image. OpenCV's bilinear
    has torch's half-pixel centres and, like it, no antialiasing."""
    if stretched:
        resized = cv2.resize(low_res, (width, height), interpolation=cv2.INTER_LINEAR)
        return np.asarray(resized, dtype=np.float32)
    side = 4 * low_res.shape[-1]
    scale = side / max(width, height)
    inside_w, inside_h = int(width * scale + 0.5), int(height * scale + 0.5)
    square = cv2.resize(low_res, (side, side), interpolation=cv2.INTER_LINEAR)
    full = cv2.resize(
        np.ascontiguousarray(square[:inside_h, :inside_w]),
        (width, height),
        interpolation=cv2.INTER_LINEAR,
    )
    return np.asarray(full, dtype=np.float32)


def _engine_gives_logits() -> bool:
    """Logits are asked for only where the configured engine gives them:
    with SEGQ_MODEL unset the worker may pick GrabCut, which would fail an
    item that asks for them."""
    entry = engine_entry(services().settings.model)
    return entry is not None and entry.can(Capability.LOGITS)


def _bearer_key() -> str:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key if scheme.lower() == "bearer" else ""


def _form_bool(name: str, *, default: bool) -> bool:
    """FastAPI's booleans: true/false, 1/0, yes/no, on/off."""
    raw = request.form.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise FormFieldError(name, "Input should be a valid boolean", "bool_parsing")


def _json_field(name: str) -> Any:
    """A text field holding JSON, as the runner reads it; absent or empty is None."""
    raw = request.form.get(name)
    if not raw:
        return None
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"Error parsing JSON for {name}: nested too deeply") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise ApiError(400, f"Error parsing JSON for {name}: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _numbers(name: str, value: Any, shape: str, count: int | None) -> list[float]:
    if (
        not isinstance(value, list)
        or (count is not None and len(value) != count)
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ApiError(400, f"{name} must be {shape}")
    return [float(v) for v in value]


def _prompt(
    point_coords: Any, point_labels: Any, box: Any, scale: tuple[int, int]
) -> dict[str, Any]:
    """The job's top-level prompt, normalized to the image by ``scale``
    (the image's size for pixel coordinates, 1 for coordinates in 0..1)."""
    width, height = scale
    prompt: dict[str, Any] = {}
    if point_coords is not None:
        if not isinstance(point_coords, list) or not point_coords:
            raise ApiError(400, "point_coords must be [[x, y], ...]")
        coords = [
            _numbers(f"point_coords[{i}]", p, "[x, y]", 2) for i, p in enumerate(point_coords)
        ]
        if point_labels is None:
            raise ApiError(400, "point_labels must be given with point_coords")
        labels = _numbers("point_labels", point_labels, "[1, 0, ...], one per point", len(coords))
        if any(label not in (0.0, 1.0) for label in labels):
            raise ApiError(400, "point_labels must be 1 (foreground) or 0 (background)")
        prompt["points"] = [
            {
                "x": _unit(f"point_coords[{i}]", x / width),
                "y": _unit(f"point_coords[{i}]", y / height),
                "label": int(label),
            }
            for i, ((x, y), label) in enumerate(zip(coords, labels, strict=True))
        ]
    elif point_labels is not None:
        raise ApiError(400, "point_labels given without point_coords")
    if box is not None:
        if isinstance(box, list) and len(box) == 1 and isinstance(box[0], list):
            box = box[0]  # the runner's (1, 4) form
        x1, y1, x2, y2 = _numbers("box", box, "one box [x1, y1, x2, y2]", 4)
        prompt["boundingBox"] = {
            "xMin": _unit("box", x1 / width),
            "yMin": _unit("box", y1 / height),
            "xMax": _unit("box", x2 / width),
            "yMax": _unit("box", y2 / height),
        }
    if not prompt:
        raise ApiError(400, "give point_coords (with point_labels) or box, or both")
    return prompt


def _runner_fields(point_count: int) -> CallerFields:
    """The runner's names for the fields of the job ``_prompt`` made."""
    fields = CallerFields()
    fields.name(("items", 0), "image")
    for index in range(point_count):
        fields.name(("points", index), f"point_coords[{index}]")
        fields.name(("points", index, "x"), f"point_coords[{index}][0]")
        fields.name(("points", index, "y"), f"point_coords[{index}][1]")
        fields.name(("points", index, "label"), f"point_labels[{index}]")
    fields.name(("boundingBox",), "box")
    for position, key in enumerate(("xMin", "yMin", "xMax", "yMax")):
        fields.name(("boundingBox", key), f"box[{position}]")
    return fields


def _unit(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ApiError(400, f"{name} lies outside the image")
    return value


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _runner_status(status: int) -> int:
    """The statuses the SDK reads as the runner's are kept; another is the
    runner's input error (400), or its server error (500)."""
    if status in KEPT_STATUSES:
        return status
    return 500 if status >= 500 else 400


LIVEPEER_ENVELOPE = Envelope(
    "livepeer",
    lambda refused: _json({"detail": {"msg": refused.message}}, refused.code, refused.headers),
    peer_status=_runner_status,
)


@livepeer.errorhandler(FormFieldError)
def _bad_field(error: FormFieldError) -> Response:
    return _json(
        {"detail": [{"loc": ["body", error.field], "msg": error.message, "type": error.kind}]}, 422
    )


register_refusals(livepeer, LIVEPEER_ENVELOPE)
