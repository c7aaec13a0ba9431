"""The typed contract (segq/contract.py): importable by any layer, and its
stored values pinned, so rows and queued messages written before a change
keep reading after it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from segq import contract
from segq.api.schemas import EverythingOptions, SegmentRequest
from segq.worker.engines import base


def test_the_contract_imports_no_flask_torch_or_database() -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, segq.contract; print(' '.join(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    heavy = {"flask", "torch", "sqlalchemy", "pydantic", "numpy"}
    assert not heavy & {name.split(".")[0] for name in loaded}


def test_stored_names_are_the_ones_old_rows_hold() -> None:
    # Stored in item rows and job rows: renaming one strands every old row.
    assert contract.SEGMENT_OBJECT_FIELDS == ("maskKey", "logitsKey")
    assert contract.LOGITS_SHAPE == "logitsShape"
    assert contract.OUTPUT_KINDS == ("polygons", "mask", "rle", "svgPath", "logits")
    assert contract.DEFAULT_OUTPUTS == ("polygons", "mask")
    assert contract.DEFAULT_MODE == "prompted"
    assert contract.EVERYTHING_DEFAULTS == {
        "pointsPerSide": 32,
        "predIouThresh": 0.88,
        "stabilityScoreThresh": 0.95,
        "minArea": 0,
        "maxSegments": 256,
    }


def test_a_row_from_before_outputs_gets_the_default() -> None:
    assert contract.chosen_outputs({"multimaskOutput": False}) == ("polygons", "mask")
    assert contract.chosen_outputs({"outputs": ["rle"]}) == ("rle",)


def test_objects_named_by_a_result() -> None:
    result: contract.StoredResult = {
        "width": 2,
        "height": 2,
        "segments": [
            {"score": 1.0, "boundingBox": None, "area": 0, "maskKey": "m0", "logitsKey": "l0"},
            {"score": 0.5, "boundingBox": None, "area": 0, "rle": {"size": [2, 2], "counts": [4]}},
            {"score": 0.2, "boundingBox": None, "area": 0, "maskKey": "m2"},
        ],
    }
    assert contract.objects_named_by_result(result) == ["m0", "l0", "m2"]
    assert contract.objects_named_by_result(None) == []


def test_the_api_takes_its_outputs_and_defaults_from_the_contract() -> None:
    assert EverythingOptions().model_dump() == contract.EVERYTHING_DEFAULTS
    field = SegmentRequest.model_fields["outputs"]
    schema = SegmentRequest.model_json_schema()["properties"]["outputs"]
    assert field.default is None
    listed = schema["anyOf"][0]["items"]["enum"]
    assert tuple(listed) == contract.OUTPUT_KINDS


def test_the_engines_defaults_are_the_contracts() -> None:
    # The engines' own dataclass (worker/engines/base.py) keeps snake_case
    # names; its defaults must be the stored ones.
    defaults = {f.name: f.default for f in dataclasses.fields(base.EverythingOptions)}
    assert defaults == {
        "points_per_side": contract.EVERYTHING_DEFAULTS["pointsPerSide"],
        "pred_iou_thresh": contract.EVERYTHING_DEFAULTS["predIouThresh"],
        "stability_score_thresh": contract.EVERYTHING_DEFAULTS["stabilityScoreThresh"],
        "min_area": contract.EVERYTHING_DEFAULTS["minArea"],
        "max_segments": contract.EVERYTHING_DEFAULTS["maxSegments"],
    }
