"""segq/job_text.py writes an item as the response models would: drawn
results and references, rendered both ways, give the same bytes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from segq.api.schemas import JobItemResult
from segq.job_document import render_segment
from segq.job_text import LINK_HOLE, fill_links, render_item_text, render_result_text

#: What a stored float may be: a float, or an integer JSON gave back.
numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**53), max_value=2**53),
)
#: A bounding box's coordinates are fractions of the image.
units = st.one_of(st.floats(min_value=0, max_value=1), st.integers(min_value=0, max_value=1))
counts = st.lists(st.integers(min_value=0, max_value=2**31), max_size=6)
keys = st.from_regex(r"projects/[0-9]{1,4}/jobs/[a-z0-9/\-]{1,20}\.(png|npy)", fullmatch=True)


@st.composite
def segments(draw: st.DrawFn) -> dict[str, Any]:
    segment: dict[str, Any] = {
        "score": draw(numbers),
        "boundingBox": draw(
            st.none() | st.fixed_dictionaries({k: units for k in ("yMax", "xMin", "xMax", "yMin")})
        ),
        "area": draw(numbers),
    }
    if draw(st.booleans()):
        segment["promptIndex"] = draw(st.none() | st.integers(min_value=0, max_value=63))
    if draw(st.booleans()):
        segment["polygons"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "vertices": st.lists(st.tuples(numbers, numbers).map(list), max_size=5),
                        "isHole": st.booleans(),
                    }
                ),
                max_size=3,
            )
        )
    if draw(st.booleans()):
        segment["maskKey"] = draw(keys)
    if draw(st.booleans()):
        segment["rle"] = {"counts": draw(counts), "size": draw(counts)}
    if draw(st.booleans()):
        segment["svgPath"] = draw(st.text())
    if draw(st.booleans()):
        segment["logitsKey"] = draw(keys)
        segment["logitsShape"] = draw(counts)
    return segment


results = st.fixed_dictionaries(
    {
        "width": st.integers(min_value=1, max_value=10_000),
        "height": st.integers(min_value=1, max_value=10_000),
        "segments": st.lists(segments(), max_size=4),
    },
    optional={
        "metrics": st.fixed_dictionaries(
            {
                "embedding": st.sampled_from([None, "computed", "local", "shared"]),
                "encodeMs": numbers,
                "decodeMs": numbers,
            }
        )
    },
)
references = st.fixed_dictionaries(
    {},
    optional={
        "fileId": st.integers(min_value=1, max_value=2**63 - 1),
        "fileExternalId": st.text(),
        "fileInstanceId": st.fixed_dictionaries({"externalId": st.text(), "space": st.text()}),
        "fileUrl": st.text(),
    },
)


def _link(key: str) -> tuple[str, int]:
    return f'https://storage.example/{key}?sig=é&x="1"', len(key) * 1000


@settings(max_examples=300, deadline=None)
@given(result=results, reference=references)
def test_an_item_is_written_as_the_model_writes_it(
    result: dict[str, Any], reference: dict[str, Any]
) -> None:
    stored = render_result_text(result)
    ours = fill_links(render_item_text(reference, stored), _link)
    entry = {
        **reference,
        "segments": [
            render_segment(segment, result["width"], result["height"], _link)
            for segment in result["segments"]
        ],
    }
    if "metrics" in result:
        entry["metrics"] = result["metrics"]
    dumped = JobItemResult.model_validate(entry).model_dump(
        mode="json", by_alias=True, exclude_unset=True
    )
    # As the app writes answers: Flask's provider, compact, ASCII, unsorted.
    assert ours == json.dumps(dumped, ensure_ascii=True, separators=(",", ":"))
    assert LINK_HOLE not in ours


def test_a_reference_or_result_the_model_refuses_is_refused_here_too() -> None:
    for reference in ({"imageData": "data:,"}, {"fileId": 1, "extra": 2}):
        try:
            render_item_text(reference, None)
        except ValueError:
            continue
        raise AssertionError(f"{reference} was rendered")
    box = {"xMin": 0, "yMin": 0, "xMax": 1}
    try:
        render_result_text(
            {"width": 1, "height": 1, "segments": [{"score": 1, "boundingBox": box, "area": 1}]}
        )
    except ValueError:
        return
    raise AssertionError("a box without yMax was rendered")
