"""Where an item's time goes: the stage times the pipeline records (worker/
item_stages.py), stored with the item and observed in the histograms,
against Postgres and S3 (moto over HTTP), from recorded times only."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import Histogram
from sqlalchemy.orm import Session, sessionmaker

from segq.models import JobItem
from segq.storage import S3Storage
from segq.worker.engines.grabcut import GrabCutEngine
from segq.worker.item_stages import Stage
from segq.worker.metrics import ITEM_SECONDS, ITEM_STAGE_SECONDS
from segq.worker.pipeline import ItemOutcome, process_item
from tests.support.database import item_ids
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.in_process_workers import TEST_LIMITS
from tests.support.tenants import Tenant

#: What the stages may leave of an attempt's total: the untimed glue
#: between them (Python between calls; a lone item's is about 0.1 ms), on a
#: shared machine whose scheduler may pause the process anywhere.
GLUE_MS = 5.0
GLUE_SHARE = 0.05


def sums(histogram: Histogram) -> dict[str, float]:
    """Each labelled series' ``_sum`` now, by its stage (or "" unlabelled)."""
    return {
        sample.labels.get("stage", ""): sample.value
        for family in histogram.collect()
        for sample in family.samples
        if sample.name.endswith("_sum")
    }


def run_item(
    tenant: Tenant, sessions: sessionmaker[Session], storage: S3Storage, **options: Any
) -> tuple[JobItem, dict[str, float], float]:
    """One item run by the pipeline: the item, and what its attempt added to
    each stage's histogram and to the total's (seconds)."""
    file_id = tenant.upload(png_bytes(160, 120)).json["id"]
    response = tenant.post_job({**scene_prompt_body(file_id), **options})
    assert response.status_code == 200, response.json
    [item_id] = item_ids(tenant, response.json["jobId"])
    stages_before, total_before = sums(ITEM_STAGE_SECONDS), sums(ITEM_SECONDS)[""]
    outcome = process_item(
        sessions,
        storage,
        GrabCutEngine(),
        item_id,
        lease_seconds=60,
        max_attempts=3,
        limits=TEST_LIMITS,
        announce_job_change=lambda job_id: None,
    )
    assert outcome.outcome == ItemOutcome.COMPLETED
    stages_after = sums(ITEM_STAGE_SECONDS)
    added = {
        stage: value - stages_before.get(stage, 0.0)
        for stage, value in stages_after.items()
        if value - stages_before.get(stage, 0.0) > 0
    }
    with sessions() as session:
        item = session.get_one(JobItem, item_id)
    return item, added, sums(ITEM_SECONDS)[""] - total_before


def assert_adds_up(stage_total: float, total: float) -> None:
    glue = total - stage_total
    assert glue >= -0.01  # stages are disjoint parts of the total (rounding aside)
    assert glue <= max(GLUE_MS, GLUE_SHARE * total), (stage_total, total)


@pytest.mark.parametrize(
    ("outputs", "encodings"),
    [
        (None, {Stage.ENCODE_POLYGONS, Stage.ENCODE_PNG}),
        (
            ["rle", "svgPath", "mask"],
            {Stage.ENCODE_POLYGONS, Stage.ENCODE_SVG_PATH, Stage.ENCODE_RLE, Stage.ENCODE_PNG},
        ),
    ],
)
def test_stage_times_add_up_to_the_items_recorded_total(
    tenant: Tenant,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    outputs: list[str] | None,
    encodings: set[Stage],
) -> None:
    item, added, total_seconds = run_item(
        tenant, sessions, storage, **({} if outputs is None else {"outputs": outputs})
    )
    metrics = item.result["metrics"]
    stored = metrics["stagesMs"]
    # Stored with the item: every stage up to the completion's commit, an
    # encoding per format asked for and none other, the engine's own time
    # within its stage.
    assert set(stored) == {
        str(s) for s in (Stage.CLAIM, Stage.IMAGE_READ, Stage.ENGINE, Stage.ENCODE_SUMMARY,
                         Stage.STORAGE_WRITE, Stage.NOTIFY, *encodings)
    }  # fmt: skip
    assert all(ms > 0 for ms in stored.values()), stored
    assert metrics["encodeMs"] + metrics["decodeMs"] <= stored["engine"] + 0.1
    assert_adds_up(sum(stored.values()), metrics["workerMs"])

    # In the histograms: the same stages plus the result's rendering, the
    # commit and the last notification, adding up to the attempt's whole
    # time, which is the stored time and then some.
    assert set(added) == set(stored) | {str(Stage.RENDER), str(Stage.COMPLETION)}
    for stage, ms in stored.items():
        if stage != Stage.NOTIFY:  # notified again after the commit
            assert added[stage] * 1000 == pytest.approx(ms, abs=0.01)
    assert_adds_up(sum(added.values()) * 1000, total_seconds * 1000)

    # Kept in the row, not shown: a client sees the contract's metrics only.
    shown = tenant.get_job(item.job_id).json["items"][0]["metrics"]
    assert set(shown) == {"embedding", "encodeMs", "decodeMs"}
    assert total_seconds * 1000 > metrics["workerMs"] + added[Stage.COMPLETION] * 1000 - 0.01
