"""A segq job shown as a Replicate prediction: the body of Replicate's
``GET /v1/predictions/{id}``, and of the webhooks of jobs created through
api/peers/replicate.py. Shared by the API (with fresh mask URLs) and the
webhook events the worker records (without them: pre-signed URLs are made
per request, never stored)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from segq.contract import MASK_KEY
from segq.job_document import MaskLinker
from segq.models import ItemStatus, Job, JobItem, JobStatus

#: The value of a job's options["peer"]["kind"] for a Replicate prediction.
PEER_KIND = "replicate"

REPLICATE_STATUS = {
    JobStatus.QUEUED: "starting",
    JobStatus.RUNNING: "processing",
    JobStatus.COMPLETED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled",
}


def replicate_request(job: Job) -> dict[str, Any] | None:
    """What the prediction was created with (model, version, input, the
    API's predictions URL),
    or None for a job not created as a prediction."""
    peer = job.options.get("peer")
    if isinstance(peer, dict) and peer.get("kind") == PEER_KIND:
        return peer
    return None


def iso_time(epoch_ms: int | None) -> str | None:
    if epoch_ms is None:
        return None
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat().replace("+00:00", "Z")


# Its JSON schema (the docstring included) is the Output of the model
# version's OpenAPI schema (api/peers/replicate.py), so the two agree.
class PredictionOutput(BaseModel):
    """The masks, best first, and their scores: one object's (points and
    boxes), or every instance a text prompt names (segq/sam3)."""

    model_config = ConfigDict(extra="forbid", title="Output")

    masks: list[Annotated[str, Field(json_schema_extra={"format": "uri"})]] | None = Field(
        None,
        description="each mask as a PNG (255 on the object, 0 elsewhere) at a URL that "
        "expires, best first; absent from webhooks (URLs are made per request)",
    )
    scores: list[float] = Field(
        description="each mask's score (SAM's predicted IoU; SAM 3's detection score for "
        "text), best first"
    )


def _output(item: JobItem, link_mask: MaskLinker | None) -> dict[str, Any]:
    """{"masks": [URL, ...], "scores": [...]}, best first (the worker stores a
    prompt's segments by score). Without ``link_mask`` (webhooks), no masks."""
    assert item.result is not None
    segments = item.result["segments"]
    output = PredictionOutput(
        masks=None
        if link_mask is None
        else [link_mask(segment[MASK_KEY])[0] for segment in segments],
        scores=[segment["score"] for segment in segments],
    )
    return output.model_dump(exclude_none=True)


def _logs(job: Job, item: JobItem | None) -> str:
    """What Replicate shows as a model's printed output: here, what ran and
    what it cost, from the job's record."""
    lines = []
    if job.engine is not None:
        lines.append(f"engine: {job.engine}")
    if item is not None and item.result is not None and "metrics" in item.result:
        metrics = item.result["metrics"]
        lines.append(
            f"embedding: {metrics.get('embedding')}, encode {metrics.get('encodeMs')} ms, "
            f"decode {metrics.get('decodeMs')} ms"
        )
    if item is not None and item.error_message:
        lines.append(f"error: {item.error_message}")
    return "".join(line + "\n" for line in lines)


def render_prediction(
    job: Job,
    items: Sequence[JobItem],
    link_mask: MaskLinker | None,
    *,
    unfinished_as_starting: bool = False,
) -> dict[str, Any]:
    """The prediction for ``job`` (created as one: see replicate_request).

    ``unfinished_as_starting``: answer ``starting`` for any unfinished job,
    as the answer to ``Prefer: wait`` must: Replicate's client takes any
    other status there as final (it stops waiting on ``processing``)."""
    request = replicate_request(job)
    assert request is not None
    base = request["predictionsUrl"]
    status = JobStatus(job.status)
    item = items[0] if items else None
    shown_status = REPLICATE_STATUS[status]
    if unfinished_as_starting and not status.finished:
        shown_status = "starting"
    output = None
    if item is not None and item.status == ItemStatus.COMPLETED and item.result is not None:
        output = _output(item, link_mask)
    metrics: dict[str, Any] = {}
    if status.finished and job.start_time is not None:
        metrics["predict_time"] = max(job.status_time - job.start_time, 0) / 1000
    return {
        "id": str(job.id),
        "model": request["model"],
        "version": request["version"],
        "input": request["input"],
        "logs": _logs(job, item),
        "output": output,
        "data_removed": False,
        "error": job.error_message if status == JobStatus.FAILED else None,
        "status": shown_status,
        "source": "api",
        "created_at": iso_time(job.created_time),
        "started_at": iso_time(job.start_time),
        "completed_at": iso_time(job.status_time) if status.finished else None,
        "urls": {"get": f"{base}/{job.id}", "cancel": f"{base}/{job.id}/cancel"},
        "metrics": metrics,
    }


def prediction_event_body(session: Session, job: Job) -> str:
    """A webhook's body for a prediction: the prediction itself, as
    Replicate sends it, without mask URLs (GET ``urls.get`` for them)."""
    items = list(
        session.scalars(select(JobItem).where(JobItem.job_id == job.id).order_by(JobItem.position))
    )
    return json.dumps(
        render_prediction(job, items, None), separators=(",", ":"), ensure_ascii=False
    )
