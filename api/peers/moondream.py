"""Moondream's ``POST /v1/segment``, as its Python client (moondream's
``md.vl(endpoint=...)``) sends it and reads the answer: a JSON body with
the image as ``image_url`` (a data URI, or an http(s) URL fetched through
the URL guard like ``fileUrl``), the key in ``X-Moondream-Auth``, and
``{"path", "bbox"}`` back, or server-sent events with ``stream: true``.

Moondream finds the object named in ``object`` by its text. On a server
whose workers run SAM 3 (SEGQ_MODEL=sam3) so does segq: ``object`` is a
text prompt, the answer its best instance; with ``spatial_refs`` the
answer is the best instance at the refs (every point on it, its box's
centre inside the box), else the object the refs outline. On any other
server the ``spatial_refs`` (points and boxes in 0..1) are the prompt,
and a request without them is refused, naming the setting, rather than
answered as if the text had been understood. ``settings`` and ``model``
are checked for shape and otherwise unused. Errors use segq's envelope:
the client raises on any status of 400 or more without reading the
body."""

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
from segq.api.peers.synchronous_jobs import (
    PeerWait,
    finished_or_parked,
    parked_answer,
    project_for_key,
    resumed_peer_wait,
    start_peer_job,
)
from segq.api.schemas import SegmentRequest, parse
from segq.engine_catalogue import Capability, concept_unsupported_message, lacks
from segq.models import Project

moondream = PeerBlueprint("moondream", __name__, url_prefix="/v1")

#: The route, as it names the calls made to it (api/peers/synchronous_jobs.py).
ROUTE = "moondream/segment"

AUTH_HEADER = "X-Moondream-Auth"
MAX_OBJECT_LENGTH = 1000
#: Decimal places of the path's coordinates: a ten-thousandth of the image
#: is under a pixel for images up to 10,000 pixels a side.
PATH_DECIMALS = 4
KNOWN_FIELDS = frozenset({"image_url", "object", "stream", "spatial_refs", "settings", "model"})


@moondream.post("/segment")
@documented(
    "Segment the object named (SAM 3) or the one the spatial_refs point at "
    "(JSON, as moondream's client sends it)",
    {200: ("{path, bbox}, or server-sent events with stream: true", None)},
    errors=(400, 401, 413, 422, 429, 503, 504),
)
def segment() -> Response:
    project = project_for_key(request.headers.get(AUTH_HEADER, ""), AUTH_HEADER)
    peer_wait = resumed_peer_wait() or _start_call(project)
    finished = finished_or_parked(project, peer_wait)
    if finished is None:
        return parked_answer()
    options = peer_wait.answer_options
    best = (
        _chosen(finished.segments, options["refs"]) if options["by_text"] else finished.segments[0]
    )
    subpaths, bbox = _subpaths_and_bbox(best, finished.width, finished.height)
    if not options["stream"]:
        return jsonify({"path": " ".join(subpaths), "bbox": bbox})
    return Response(_events(subpaths, bbox), mimetype="text/event-stream")


def _start_call(project: Project) -> PeerWait:
    """Read and check the body, and start (or find) the call's job; what
    the answer needs besides the job (how it is chosen and sent) travels in
    the wait's answer options."""
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
    by_text = not lacks(services().settings.model, Capability.TEXT_PROMPTS)
    refs = (
        _prompt(spatial_refs, fields, where=("prompts", 1) if by_text else ())
        if spatial_refs not in (None, [])
        else None
    )
    if by_text:
        fields.name(("prompts", 0, "text"), "object")
        fields.name(("text",), "object")
        prompt: dict[str, Any] = (
            {"text": target} if refs is None else {"prompts": [{"text": target}, refs]}
        )
    elif refs is None:
        raise ApiError(
            422,
            f"object alone is a text prompt, and "
            f"{concept_unsupported_message(services().settings.model)}: give spatial_refs "
            "(points [x, y] or a box [x1, y1, x2, y2], in 0..1) to segment what they point at",
        )
    else:
        prompt = refs
    with fields.renaming():
        segment_request = parse(
            SegmentRequest, {"items": [item], "outputs": ["polygons"], **prompt}
        )
        return start_peer_job(
            project,
            ROUTE,
            segment_request,
            {"stream": stream, "by_text": by_text, "refs": refs},
        )


def _prompt(spatial_refs: Any, fields: CallerFields, where: FieldPath) -> dict[str, Any]:
    """Points ``[x, y]`` and at most one box ``[x1, y1, x2, y2]``, in 0..1,
    as the prompt at ``where`` of segq's request (``()``: its top level);
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
        native: FieldPath = (
            (*where, "points", len(points)) if len(ref) == 2 else (*where, "boundingBox")
        )
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


def _chosen(segments: list[dict[str, Any]], refs: dict[str, Any] | None) -> dict[str, Any] | None:
    """The answer on SAM 3: the best instance of ``object`` (segments of
    prompt 0, best first) at ``refs`` (every point on it, its box's centre
    inside the box), else the refs' own segment (prompt 1); without refs,
    the best instance. None: nothing found."""
    instances = [s for s in segments if s.get("promptIndex", 0) == 0]
    if refs is None:
        return instances[0] if instances else None
    for instance in instances:
        if _at_refs(instance, refs):
            return instance
    return next((s for s in segments if s.get("promptIndex") == 1), None)


def _at_refs(segment: dict[str, Any], refs: dict[str, Any]) -> bool:
    rings = [ring["vertices"] for ring in segment["polygons"]]
    if not all(_inside(rings, point["x"], point["y"]) for point in refs.get("points") or ()):
        return False
    box, found = refs.get("boundingBox"), segment["boundingBox"]
    if box is None:
        return True
    if found is None:
        return False
    x = (found["xMin"] + found["xMax"]) / 2
    y = (found["yMin"] + found["yMax"]) / 2
    return bool(box["xMin"] <= x <= box["xMax"] and box["yMin"] <= y <= box["yMax"])


def _inside(rings: list[list[list[float]]], x: float, y: float) -> bool:
    """Whether (x, y) lies inside the rings by the even-odd rule (holes are
    rings too), as the path is drawn."""
    inside = False
    for ring in rings:
        for (x1, y1), (x2, y2) in zip(ring, ring[1:] + ring[:1], strict=True):
            if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
                inside = not inside
    return inside


def _subpaths_and_bbox(
    best: dict[str, Any] | None, width: int, height: int
) -> tuple[list[str], dict[str, float] | None]:
    """The best segment as Moondream shows it: an SVG path in the image's
    normalized frame (``viewBox="0 0 1 1"``, one closed subpath per ring,
    holes included: draw with ``fill-rule="evenodd"``) and its box; an
    empty path and no box where nothing was found."""
    if best is None:
        return [], None
    # Vertices at pixel centres, as segq's own svgPath puts them, in 0..1.
    dx, dy = 0.5 / width, 0.5 / height
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
