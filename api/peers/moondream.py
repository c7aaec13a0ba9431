"""Moondream's ``POST /v1/segment``, as its Python client (moondream's
``md.vl(endpoint=...)``) sends it and reads the answer: a JSON body with
the image as ``image_url`` (a data URI, or an http(s) URL fetched through
the URL guard like ``fileUrl``), the key in ``X-Moondream-Auth``, and
``{"path", "bbox"}`` back, or server-sent events with ``stream: true``.

Moondream finds the object named in ``object`` by its text. On a server
whose workers run SAM 3 (``SEGQ_MODEL=sam3``), ``object`` alone is a text
prompt and the answer is its best instance (none found: an empty path and
a null bbox). With ``spatial_refs`` the refs say which object is meant, as
they do for Moondream: they are the point and box prompt (SAM 3's tracker
on a SAM 3 server), and ``object`` only names it. On any other server a
request without refs is refused (422 naming ``SEGQ_MODEL=sam3``) rather
than answered as if the text had been understood. ``settings`` and
``model`` are checked for shape and otherwise unused. Errors use segq's
envelope: the client raises on any status of 400 or more without reading
the body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Response, jsonify, request

from segq.api.context import services
from segq.api.errors import ApiError, FieldPath
from segq.api.json_body import max_job_body_bytes, read_json_object
from segq.api.openapi import documented
from segq.api.peers.caller_fields import CallerFields
from segq.api.peers.peer_blueprint import PeerBlueprint
from segq.api.peers.synchronous_jobs import FinishedItem, project_for_key, run_to_completion
from segq.api.schemas import SegmentRequest, parse
from segq.engine_catalogue import CONCEPT_ENGINES, concept_unsupported_message

moondream = PeerBlueprint("moondream", __name__, url_prefix="/v1")

AUTH_HEADER = "X-Moondream-Auth"
MAX_OBJECT_LENGTH = 1000
#: Decimal places of the path's coordinates: a ten-thousandth of the image
#: is under a pixel for images up to 10,000 pixels a side.
PATH_DECIMALS = 4
KNOWN_FIELDS = frozenset({"image_url", "object", "stream", "spatial_refs", "settings", "model"})


@moondream.post("/segment")
@documented(
    "Segment the object the spatial_refs point at (JSON, as moondream's client sends it)",
    {200: ("{path, bbox}, or server-sent events with stream: true", None)},
    errors=(400, 401, 413, 422, 429, 503),
)
def segment() -> Response:
    project = project_for_key(request.headers.get(AUTH_HEADER, ""), AUTH_HEADER)
    body = read_json_object(max_bytes=max_job_body_bytes(services().settings.max_upload_bytes))
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown fields: {', '.join(unknown)}")
    image_url = body.get("image_url")
    if not isinstance(image_url, str) or not image_url:
        raise ApiError(400, "image_url must be a data: URI or an http(s) URL")
    target = body.get("object")
    if not isinstance(target, str) or len(target) > MAX_OBJECT_LENGTH:
        raise ApiError(400, f"object must be a string of at most {MAX_OBJECT_LENGTH} characters")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false")
    for optional, kind in (("settings", dict), ("model", str)):
        if optional in body and not isinstance(body[optional], kind):
            raise ApiError(400, f"{optional} must be {'an object' if kind is dict else 'a string'}")
    item = {"imageData" if image_url[:5].lower() == "data:" else "fileUrl": image_url}
    fields = CallerFields()
    fields.name(("items", 0), "image_url")
    spatial_refs = body.get("spatial_refs")
    if spatial_refs is None or spatial_refs == []:
        prompt = _text_prompt(target, fields)
    else:
        prompt = _prompt(spatial_refs, fields)
    with fields.renaming():
        segment_request = parse(
            SegmentRequest, {"items": [item], "outputs": ["polygons"], **prompt}
        )
        finished = run_to_completion(project, segment_request)
    subpaths, bbox = _subpaths_and_bbox(finished)
    if not stream:
        return jsonify({"path": " ".join(subpaths), "bbox": bbox})
    return Response(_events(subpaths, bbox), mimetype="text/event-stream")


def _text_prompt(target: str, fields: CallerFields) -> dict[str, Any]:
    """``object`` as a text prompt for its best instance, where SAM 3 runs."""
    model = services().settings.model
    if model not in CONCEPT_ENGINES:
        raise ApiError(
            422,
            f"{concept_unsupported_message(model)}: give spatial_refs "
            "(points [x, y] or a box [x1, y1, x2, y2], in 0..1)",
        )
    fields.name(("text",), "object")
    return {"text": target, "textOptions": {"maxSegments": 1}}


def _prompt(spatial_refs: Any, fields: CallerFields) -> dict[str, Any]:
    """Points ``[x, y]`` and at most one box ``[x1, y1, x2, y2]``, in 0..1;
    ``fields`` learns which of ``spatial_refs`` each became."""
    if not isinstance(spatial_refs, list):
        raise ApiError(400, "spatial_refs must be a list of points and boxes")
    points: list[dict[str, Any]] = []
    boxes: list[dict[str, float]] = []
    for index, ref in enumerate(spatial_refs):
        if (
            not isinstance(ref, list)
            or len(ref) not in (2, 4)
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in ref)
        ):
            raise ApiError(400, f"spatial_refs[{index}] must be [x, y] or [x1, y1, x2, y2]")
        native: FieldPath = ("points", len(points)) if len(ref) == 2 else ("boundingBox",)
        keys = ("x", "y") if len(ref) == 2 else ("xMin", "yMin", "xMax", "yMax")
        fields.name(native, f"spatial_refs[{index}]")
        for position, key in enumerate(keys):
            fields.name((*native, key), f"spatial_refs[{index}][{position}]")
        if len(ref) == 2:
            points.append({"x": float(ref[0]), "y": float(ref[1]), "label": 1})
        else:
            x1, y1, x2, y2 = (float(v) for v in ref)
            boxes.append({"xMin": x1, "yMin": y1, "xMax": x2, "yMax": y2})
    if len(boxes) > 1:
        raise ApiError(422, "spatial_refs may hold at most one box: one object per call")
    prompt: dict[str, Any] = {}
    if points:
        prompt["points"] = points
    if boxes:
        prompt["boundingBox"] = boxes[0]
    return prompt


def _subpaths_and_bbox(finished: FinishedItem) -> tuple[list[str], dict[str, float] | None]:
    """The best segment as Moondream shows it: an SVG path in the image's
    normalized frame (``viewBox="0 0 1 1"``, one closed subpath per ring,
    holes included: draw with ``fill-rule="evenodd"``) and its box; a
    text prompt that found nothing has neither."""
    if not finished.segments:
        return [], None
    best = finished.segments[0]
    # Vertices at pixel centres, as segq's own svgPath puts them, in 0..1.
    dx, dy = 0.5 / finished.width, 0.5 / finished.height
    subpaths = [
        "M" + " L".join(f"{_number(x + dx)},{_number(y + dy)}" for x, y in ring["vertices"]) + " Z"
        for ring in best["polygons"]
        if ring["vertices"]
    ]
    box = best["boundingBox"]
    bbox = (
        None
        if box is None
        else {
            "x_min": box["xMin"],
            "y_min": box["yMin"],
            "x_max": box["xMax"],
            "y_max": box["yMax"],
        }
    )
    return subpaths, bbox


def _number(value: float) -> str:
    return f"{value:.{PATH_DECIMALS}f}".rstrip("0").rstrip(".") or "0"


def _events(subpaths: list[str], bbox: dict[str, float] | None) -> Iterator[str]:
    """Moondream's stream: the box, the path in chunks (one per subpath;
    joined they are the path), then the whole answer marked completed."""
    yield _event({"type": "bbox", "bbox": bbox})
    for index, subpath in enumerate(subpaths):
        chunk = subpath if index == 0 else " " + subpath
        yield _event({"type": "path_delta", "chunk": chunk, "completed": False})
    path = " ".join(subpaths)
    yield _event({"type": "final", "path": path, "bbox": bbox, "completed": True})


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
