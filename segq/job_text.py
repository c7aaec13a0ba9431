"""A job's items as the JSON text GET answers with, written without the
response models.

Validating a result against api/schemas.py costs about 4 µs a polygon
vertex, and a noisy mask has 10^5 of them: too much to pay on every poll.
So an item's result is rendered to text once, when it completes (the
worker stores it beside the result), and GET splices the stored texts. The
text is exactly what the models would write (the same keys in the same
order, floats where they take floats, Flask's compact ASCII JSON), which
tests/core/test_job_text.py checks against the models for every output kind.

Pre-signed URLs expire, so they are never stored: where a mask or logits
link goes, the text holds a hole (the storage key between two LINK_HOLE
characters) that ``fill_links`` replaces with ``"url":…,"expiresTime":…,``
on the way out. JSON written with ``ensure_ascii`` escapes every control
character, so LINK_HOLE never occurs in the text otherwise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from segq.contract import LOGITS_KEY, LOGITS_SHAPE, MASK_KEY
from segq.images import PNG
from segq.mask_logits import NPY_MEDIA_TYPE

#: Marks both ends of a link's storage key in a rendered text.
LINK_HOLE = "\x1f"

#: key of a stored object -> (pre-signed URL, its expiry in epoch milliseconds).
Linker = Callable[[str], tuple[str, int]]

#: The fields of an item reference, in the contract's order (ItemReference).
_REFERENCE_FIELDS = ("fileId", "fileExternalId", "fileInstanceId", "fileUrl")
_BOX_FIELDS = ("xMin", "yMin", "xMax", "yMax")


def json_text(value: Any) -> str:
    """``value`` as Flask writes an answer: compact, ASCII only."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def _number(value: Any) -> str:
    """A float field: an integer in the stored JSON is written as a float,
    as the model's float coerces it."""
    number = float(value)
    if not math.isfinite(number):
        # The models write these as null; no engine output is ever one.
        raise ValueError(f"{value!r} is not a finite number")
    return repr(number)


def _box(box: Mapping[str, Any] | None) -> str:
    if box is None:
        return "null"
    if set(box) != set(_BOX_FIELDS):
        raise ValueError(f"a bounding box has the fields {_BOX_FIELDS}, not {sorted(box)}")
    return "{" + ",".join(f'"{name}":{_number(box[name])}' for name in _BOX_FIELDS) + "}"


def _ring(ring: Mapping[str, Any]) -> str:
    vertices = ",".join(
        f'{{"x":{_number(x)},"y":{_number(y)},"confidence":null}}' for x, y in ring["vertices"]
    )
    is_hole = json_text(bool(ring["isHole"]))
    return f'{{"vertices":[{vertices}],"confidence":null,"isHole":{is_hole}}}'


def _link_hole(key: str) -> str:
    if LINK_HOLE in key:
        raise ValueError(f"a storage key cannot hold {LINK_HOLE!r}")
    return f"{LINK_HOLE}{key}{LINK_HOLE}"


def _ints(values: Iterable[Any]) -> str:
    return "[" + ",".join(str(int(value)) for value in values) + "]"


def _segment(segment: Mapping[str, Any], width: int, height: int) -> str:
    """A stored segment as the contract's Segment (what
    segq.job_document.render_segment builds), its fields in the model's order."""
    members: list[str] = []
    if "promptIndex" in segment:
        index = segment["promptIndex"]
        members.append(f'"promptIndex":{"null" if index is None else int(index)}')
    members.append(f'"score":{_number(segment["score"])}')
    members.append(f'"boundingBox":{_box(segment["boundingBox"])}')
    members.append(f'"area":{_number(segment["area"])}')
    if "polygons" in segment:
        members.append('"polygons":[' + ",".join(map(_ring, segment["polygons"])) + "]")
    if MASK_KEY in segment:
        members.append(
            '"mask":{'
            + _link_hole(segment[MASK_KEY])
            + f'"width":{int(width)},"height":{int(height)},"format":{json_text(PNG.mime_type)}}}'
        )
    if "rle" in segment:
        rle = segment["rle"]
        members.append(f'"rle":{{"size":{_ints(rle["size"])},"counts":{_ints(rle["counts"])}}}')
    if "svgPath" in segment:
        members.append(f'"svgPath":{json_text(str(segment["svgPath"]))}')
    if LOGITS_KEY in segment:
        members.append(
            '"logits":{'
            + _link_hole(segment[LOGITS_KEY])
            + f'"format":{json_text(NPY_MEDIA_TYPE)},"shape":{_ints(segment[LOGITS_SHAPE])}}}'
        )
    return "{" + ",".join(members) + "}"


def _metrics(metrics: Mapping[str, Any]) -> str:
    embedding = metrics["embedding"]
    return (
        f'{{"embedding":{"null" if embedding is None else json_text(str(embedding))},'
        f'"encodeMs":{_number(metrics["encodeMs"])},"decodeMs":{_number(metrics["decodeMs"])}}}'
    )


def render_result_text(result: Mapping[str, Any]) -> str:
    """An item's stored result (``{"width", "height", "segments", "metrics"?}``)
    as the members it adds to the item in GET's answer, ``"segments":[…]``
    and ``"metrics":{…}``, with a hole for each link."""
    width, height = result["width"], result["height"]
    text = '"segments":[' + ",".join(_segment(s, width, height) for s in result["segments"]) + "]"
    if "metrics" in result:
        text += f',"metrics":{_metrics(result["metrics"])}'
    return text


def segments_text(result_text: str) -> str:
    """The ``"segments":[…]`` member alone of a text ``render_result_text``
    wrote (the viewer shows no metrics). The metrics, when there, are its
    last member; a quote inside a string is escaped, so the one unescaped
    ``,"metrics":{`` is theirs."""
    metrics_at = result_text.rfind(',"metrics":{')
    return result_text if metrics_at < 0 else result_text[:metrics_at]


def render_reference_text(reference: Mapping[str, Any]) -> str:
    """What the client named an item's image by, as ItemReference's members."""
    unknown = set(reference) - set(_REFERENCE_FIELDS)
    if unknown:
        raise ValueError(f"an item reference has no field {sorted(unknown)}")
    members: list[str] = []
    for name in _REFERENCE_FIELDS:
        if name not in reference:
            continue
        value = reference[name]
        if value is None:
            members.append(f'"{name}":null')
        elif name == "fileId":
            members.append(f'"fileId":{int(value)}')
        elif name == "fileInstanceId":
            members.append(
                f'"fileInstanceId":{{"space":{json_text(str(value["space"]))},'
                f'"externalId":{json_text(str(value["externalId"]))}}}'
            )
        else:
            members.append(f'"{name}":{json_text(str(value))}')
    return ",".join(members)


def render_item_text(reference: Mapping[str, Any], result_text: str | None) -> str:
    """One entry of GET's ``items``: the reference, then the result's members."""
    members = [text for text in (render_reference_text(reference), result_text) if text]
    return "{" + ",".join(members) + "}"


def fill_links(text: str, link: Linker) -> str:
    """``text`` with each link hole replaced by its signed URL and expiry."""
    if LINK_HOLE not in text:
        return text
    parts = text.split(LINK_HOLE)
    for index in range(1, len(parts), 2):
        url, expires_time = link(parts[index])
        parts[index] = f'"url":{json_text(url)},"expiresTime":{int(expires_time)},'
    return "".join(parts)
