"""What the synchronous peer routes (Livepeer's, Moondream's) share: the
project of a key sent in the peer's own header, and a segq job run to its
end within the request, its segments read back from storage."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from sqlalchemy import select

from segq.api.context import db, services
from segq.api.errors import ApiError
from segq.api.job_service import create_segmentation_job
from segq.api.job_waiting import NoWaitingSlot
from segq.api.schemas import SegmentRequest
from segq.models import Job, JobItem, JobStatus, Project
from segq.projects import hash_api_key


def project_for_key(key: str, header: str) -> Project:
    """The project ``key`` belongs to, counted by the same per-key rate
    limit as the native routes. ``header``: where the peer sends keys, for
    the 401's message."""
    key = key.strip()
    project = services().projects_by_key.project(db(), key) if key else None
    if project is None:
        raise ApiError(401, f"missing or invalid API key: send a segq project key in {header}")
    if not services().rate_limiter.allow(hash_api_key(key)):
        raise ApiError(429, "too many requests for this key", headers={"Retry-After": "1"})
    return project


@dataclass(frozen=True)
class FinishedItem:
    """The one item of a finished job: its image size and its segments as
    the item's row keeps them (keys of stored objects, not URLs)."""

    job_id: int
    width: int
    height: int
    segments: list[dict[str, Any]]


def run_to_completion(
    project: Project, segment_request: SegmentRequest, *, inline_mask_input: bytes | None = None
) -> FinishedItem:
    """Create a one-item job and wait for it, at most SEGQ_PEER_WAIT_SECONDS.
    Raises ApiError: the job's refusal as created, 504 if it is still running
    at the deadline (it runs on; the message says where to read it), 422 if
    its item failed, 409 if it was canceled meanwhile. ``inline_mask_input``
    as ``create_segmentation_job`` takes it."""
    settings = services().settings
    session = db()
    created = create_segmentation_job(
        session,
        services(),
        project.id,
        segment_request,
        None,
        inline_mask_input=inline_mask_input,
    )
    job_id = created.job.id
    # Nothing of the request's session is needed while waiting: its
    # connection goes back to the pool.
    session.close()
    try:
        finished_in_time = services().wait_until_finished(job_id, settings.peer_wait_seconds)
    except NoWaitingSlot:
        raise ApiError(
            503,
            f"too many requests of this server are waiting for their jobs; job {job_id} "
            f"runs on: GET /api/v1/projects/{project.name}/context/vision/segment/{job_id}",
            headers={"Retry-After": "5"},
        ) from None
    if not finished_in_time:
        raise ApiError(
            504,
            f"job {job_id} did not finish within {settings.peer_wait_seconds} s "
            f"(SEGQ_PEER_WAIT_SECONDS); it runs on: "
            f"GET /api/v1/projects/{project.name}/context/vision/segment/{job_id}",
        )
    with services().sessions() as reading:
        job = reading.get(Job, job_id)
        item = reading.scalar(select(JobItem).where(JobItem.job_id == job_id))
    if job is None or item is None:
        raise ApiError(409, f"job {job_id} was deleted before its answer was read")
    if item.status == JobStatus.COMPLETED and item.result is not None:
        return FinishedItem(
            job_id, item.result["width"], item.result["height"], item.result["segments"]
        )
    if job.status == JobStatus.CANCELED:
        raise ApiError(409, f"job {job_id} was canceled before it finished")
    raise ApiError(422, f"job {job_id} failed: {item.error_message or 'failed'}")


def stored_mask(key: str) -> npt.NDArray[np.bool_]:
    """(H, W) bool: a mask PNG the worker stored (0 background, 255 object)."""
    with Image.open(io.BytesIO(services().storage.get(key))) as png:
        return np.asarray(png) > 127


def stored_logits(key: str) -> npt.NDArray[np.float32]:
    """(256, 256) float32: a segment's low-resolution logits as the worker
    stored them (float16 .npy); never unpickles."""
    array = np.load(io.BytesIO(services().storage.get(key)), allow_pickle=False)
    return np.asarray(array, dtype=np.float32)
