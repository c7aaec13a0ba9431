"""A job as the contract shows it: the body of GET /context/vision/segment/{id}.

Shared by the API (with fresh mask URLs) and webhooks (without URLs)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from segq.contract import (
    DEFAULT_MODE,
    INLINE_OUTPUTS,
    LOGITS_KEY,
    LOGITS_SHAPE,
    MASK_KEY,
    SHOWN_METRICS,
)
from segq.images import PNG
from segq.mask_logits import NPY_MEDIA_TYPE
from segq.models import ItemStatus, Job, JobItem

#: key of a stored mask -> (pre-signed URL, its expiry in epoch milliseconds).
MaskLinker = Callable[[str], tuple[str, int]]


def item_reference(item: JobItem) -> dict[str, Any]:
    """What the client named the image by: fileId and, when known, fileExternalId."""
    return dict(item.file_ref)


def render_segment(
    segment: dict[str, Any], width: int, height: int, link_mask: MaskLinker | None
) -> dict[str, Any]:
    rendered: dict[str, Any] = {}
    if "promptIndex" in segment:
        rendered["promptIndex"] = segment["promptIndex"]
    rendered |= {
        "score": segment["score"],
        "boundingBox": segment["boundingBox"],
        "area": segment["area"],
    }
    if "polygons" in segment:
        rendered["polygons"] = [
            {
                "vertices": [{"x": x, "y": y, "confidence": None} for x, y in ring["vertices"]],
                "confidence": None,
                "isHole": ring["isHole"],
            }
            for ring in segment["polygons"]
        ]
    if MASK_KEY in segment:
        mask: dict[str, Any] = {"width": width, "height": height, "format": PNG.mime_type}
        if link_mask is not None:
            mask["url"], mask["expiresTime"] = link_mask(segment[MASK_KEY])
        rendered["mask"] = mask
    for optional in INLINE_OUTPUTS:
        if optional in segment:
            rendered[optional] = segment[optional]
    if LOGITS_KEY in segment:
        logits: dict[str, Any] = {"format": NPY_MEDIA_TYPE, "shape": segment[LOGITS_SHAPE]}
        if link_mask is not None:
            logits["url"], logits["expiresTime"] = link_mask(segment[LOGITS_KEY])
        rendered["logits"] = logits
    return rendered


def shown_prompt(prompt: dict[str, Any]) -> dict[str, Any]:
    """The job's prompt as the client gave it: ``prompts`` only when it
    gave them, and a ``maskInput`` without the storage key it resolved to."""
    shown: dict[str, Any] = {
        "points": prompt.get("points"),
        "boundingBox": prompt.get("boundingBox"),
    }
    if prompt.get("text") is not None:
        shown["text"] = prompt["text"]
        shown["boxes"] = prompt.get("boxes")
    if prompt.get("prompts"):
        shown["prompts"] = [
            {
                key: (
                    {k: v for k, v in value.items() if k != LOGITS_KEY}
                    if key == "maskInput"
                    else value
                )
                for key, value in entry.items()
                if value is not None
            }
            for entry in prompt["prompts"]
        ]
    return shown


def shown_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """How the job asked to be segmented: the mode, with segment
    everything's options (defaults filled in) when that is the mode, the
    multimask flag and the outputs."""
    shown: dict[str, Any] = {"mode": options.get("mode", DEFAULT_MODE)}
    if "everything" in options:
        shown["everything"] = options["everything"]
    if "textOptions" in options:
        shown["textOptions"] = options["textOptions"]
    shown["multimaskOutput"] = options.get("multimaskOutput", False)
    if "outputs" in options:
        shown["outputs"] = options["outputs"]
    return shown


def job_state(job: Job) -> dict[str, Any]:
    """The fields every shape of a job starts with."""
    return {
        "status": job.status,
        "jobId": job.id,
        "createdTime": job.created_time,
        "startTime": job.start_time,
        "statusTime": job.status_time,
        "errorMessage": job.error_message,
    }


def render_job(job: Job, items: Sequence[JobItem], link_mask: MaskLinker | None) -> dict[str, Any]:
    """``items`` in position order. Failed items are listed under
    ``failedItems`` grouped by message; the others under ``items``, with
    ``segments`` once they are done."""
    shown: list[dict[str, Any]] = []
    failures: dict[str, list[dict[str, Any]]] = {}
    completed = failed = 0
    for item in items:
        if item.status == ItemStatus.FAILED:
            failed += 1
            message = item.error_message or "failed"
            failures.setdefault(message, []).append(item_reference(item))
            continue
        entry = item_reference(item)
        if item.status == ItemStatus.COMPLETED and item.result is not None:
            completed += 1
            width, height = item.result["width"], item.result["height"]
            entry["segments"] = [
                render_segment(segment, width, height, link_mask)
                for segment in item.result["segments"]
            ]
            if "metrics" in item.result:
                stored = item.result["metrics"]
                entry["metrics"] = {name: stored[name] for name in SHOWN_METRICS if name in stored}
        shown.append(entry)
    document: dict[str, Any] = {
        **job_state(job),
        "items": shown,
        "prompt": shown_prompt(job.prompt),
        **shown_options(job.options),
        "progress": {"total": len(items), "completed": completed, "failed": failed},
        "engine": job.engine,
    }
    if failures:
        document["failedItems"] = [
            {"errorMessage": message, "items": refs} for message, refs in failures.items()
        ]
    return document


def render_created_job(job: Job, items: Sequence[JobItem]) -> dict[str, Any]:
    """The answer to POST: Cognite echoes the prompt at the top level here."""
    return {
        **job_state(job),
        "items": [item_reference(item) for item in items],
        **shown_prompt(job.prompt),
    }


def _progress(item_counts: Mapping[str, int]) -> dict[str, int]:
    return {
        "total": sum(item_counts.values()),
        "completed": item_counts.get(ItemStatus.COMPLETED, 0),
        "failed": item_counts.get(ItemStatus.FAILED, 0),
    }


def render_job_summary(job: Job, item_counts: Mapping[str, int]) -> dict[str, Any]:
    """A job in a listing: its state and progress, without items or results
    (GET the job for those). ``item_counts``: item status -> number of items."""
    return {**job_state(job), "progress": _progress(item_counts), "engine": job.engine}


def render_item_event(job: Job, item: JobItem, item_counts: Mapping[str, int]) -> dict[str, Any]:
    """The data of an item event: the job as GET shows it (without mask
    URLs) but with only this item, beside the whole job's progress."""
    return {**render_job(job, [item], None), "progress": _progress(item_counts)}
