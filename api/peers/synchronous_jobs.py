"""What the synchronous peer routes (Livepeer's, Moondream's) share: the
project of a key sent in the peer's own header, and a segq job run to its
end within the request, its segments read back from storage.

Waiting. A call waits for its job the way native ``Prefer: wait`` does
(api/route_waits.py's wait_for_job): parked by the server, holding no
thread and no database connection, and run again (the same route, with no
body: the first run's ``PeerWait`` in its environ) when the job may have
changed or SEGQ_PEER_WAIT_SECONDS have passed. A call takes its place
among the process's waiting requests (SEGQ_MAX_WAITING_REQUESTS) before
its job is made: one refused 503 for want of a place leaves no job.

The same call again. A client that retries (after a 503, a 504, a
dropped connection) sends the same call again; within
SEGQ_PEER_RETRY_WINDOW_SECONDS of the first it gets the first call's job,
running or completed, instead of another. Two calls are the same when
they are made with the same project's key to the same route and ask for
the same job: the job request they become, as validated (defaults filled
in, numbers as numbers), with each inline image replaced by the SHA-256
of its bytes, and the SHA-256 of a mask_input's logits. How the caller
wants the answer rendered (Livepeer's return_logits and normalize_coords
once applied, model_id; Moondream's stream) is not part of it: a retry
may ask for another rendering of the same job. A first job that failed
or was canceled is not attached to: the retry makes a new one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from flask import Response, request
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from segq.api.context import db, services
from segq.api.errors import ApiError
from segq.api.job_service import create_segmentation_job
from segq.api.job_waiting import Wait, WaitingPlace
from segq.api.parking import RESUMED_ENVIRON_KEY, waits_without_thread
from segq.api.route_waits import wait_for_job
from segq.api.schemas import SegmentRequest
from segq.clock import now_ms
from segq.models import Job, JobItem, JobStatus, Project
from segq.projects import hash_api_key

#: The environ key that carries a call's ``PeerWait`` to the runs of it
#: that resume its wait.
PEER_WAIT_ENVIRON_KEY = "segq.peer_wait"
#: The start of the job's idempotency key that marks it as a peer's call,
#: followed by the route and the call's SHA-256 (see the module's doc).
PEER_CALL_KEY_PREFIX = "segq-peer-call:"
#: Statuses of a first job that a repeated call does not get: it makes a new one.
NOT_ATTACHED_STATUSES = frozenset({JobStatus.FAILED, JobStatus.CANCELED})


def project_for_key(key: str, header: str) -> Project:
    """The project ``key`` belongs to, counted by the same per-key rate
    limit as the native routes, once per call (a parked call's later runs
    are the same call). ``header``: where the peer sends keys, for the
    401's message."""
    key = key.strip()
    project = services().projects_by_key.project(db(), key) if key else None
    if project is None:
        raise ApiError(401, f"missing or invalid API key: send a segq project key in {header}")
    resumed = request.environ.get(RESUMED_ENVIRON_KEY) is not None
    if not resumed and not services().rate_limiter.allow(hash_api_key(key)):
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


@dataclass(frozen=True)
class PeerWait:
    """A call waiting for its job, carried from run to run of the request."""

    job_id: int
    wait: Wait
    place: WaitingPlace
    #: What the route needs, besides the job, to answer (how it renders it).
    answer_options: Mapping[str, Any]


def resumed_peer_wait() -> PeerWait | None:
    """In a run that resumes a parked call, the wait its first run began;
    the route then reads no body (there is none) and answers from the job."""
    peer_wait: PeerWait | None = request.environ.get(PEER_WAIT_ENVIRON_KEY)
    return peer_wait


def start_peer_job(
    project: Project,
    route: str,
    segment_request: SegmentRequest,
    answer_options: Mapping[str, Any],
    *,
    inline_mask_input: bytes | None = None,
) -> PeerWait:
    """Take a waiting place, then make the call's one-item job, or find the
    one an identical call made within the retry window. Raises ApiError:
    503 when every waiting place of the process is taken (no job made), or
    the job's refusal as created. ``inline_mask_input`` as
    ``create_segmentation_job`` takes it."""
    settings = services().settings
    waiting = services().waiting_requests
    place = waiting.reserve(parkable=waits_without_thread())
    if place is None:
        raise ApiError(503, waiting.refusal(), headers={"Retry-After": "1"})
    try:
        session = db()
        call = call_sha256(segment_request, inline_mask_input)
        key = f"{PEER_CALL_KEY_PREFIX}{route}:{call}"
        _forget_stale_call(session, project.id, key, settings.peer_retry_window_seconds)
        created = create_segmentation_job(
            session,
            services(),
            project.id,
            segment_request,
            key,
            inline_mask_input=inline_mask_input,
            request_sha256=call,
        )
    except BaseException:
        place.release()
        raise
    return PeerWait(
        created.job.id, Wait.starting_now(settings.peer_wait_seconds), place, answer_options
    )


def call_sha256(segment_request: SegmentRequest, inline_mask_input: bytes | None) -> str:
    """What identifies a call (see the module's doc): its job request as
    validated, each inline image as the SHA-256 of its bytes, and the
    SHA-256 of its mask_input."""
    canonical = segment_request.model_dump(mode="json")
    for item in canonical.get("items") or ():
        data = item.get("imageData")
        if isinstance(data, str):
            item["imageData"] = "sha256:" + hashlib.sha256(_data_url_bytes(data)).hexdigest()
    canonical["maskInputSha256"] = (
        None if inline_mask_input is None else hashlib.sha256(inline_mask_input).hexdigest()
    )
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _data_url_bytes(data_url: str) -> bytes:
    """The bytes of a base64 data: URL, so the same image sent with another
    media type (or none) is the same image; the URL's own bytes otherwise
    (the job's validation has refused it already if it is not one)."""
    head, _, payload = data_url.partition(",")
    if head.lower().endswith(";base64"):
        compact = "".join(payload.split())
        try:
            return base64.b64decode(compact + "=" * (-len(compact) % 4))
        except ValueError:
            pass
    return data_url.encode()


def _forget_stale_call(session: Session, project_id: int, key: str, window_seconds: int) -> None:
    """Free ``key`` from a first job that a repeated call must not get (too
    old, failed, canceled), so the call makes a new job under it; the old
    job stays as it is, without the key."""
    earlier = session.scalar(
        select(Job).where(Job.project_id == project_id, Job.idempotency_key == key)
    )
    if earlier is None:
        return
    fresh = earlier.created_time >= now_ms() - window_seconds * 1000
    if fresh and earlier.status not in NOT_ATTACHED_STATUSES:
        return
    session.execute(
        update(Job)
        .where(Job.id == earlier.id, Job.idempotency_key == key)
        .values(idempotency_key=None)
    )
    session.commit()


def parked_answer() -> Response:
    """What a route returns for a run whose request parked: the server drops it."""
    return Response(status=204)


def finished_or_parked(project: Project, peer_wait: PeerWait) -> FinishedItem | None:
    """The call's job once finished; None when the request is parked (the
    route returns any response: it is dropped, and a later run answers).
    Raises ApiError: 504 if it is still running at the deadline (it runs
    on; the message says where to read it, and the same call again gets
    it), 422 if its item failed, 409 if it was canceled or deleted."""
    resume = {PEER_WAIT_ENVIRON_KEY: peer_wait}
    if wait_for_job(peer_wait.job_id, peer_wait.wait, resume, peer_wait.place):
        return None
    job_id = peer_wait.job_id
    settings = services().settings
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
    if not JobStatus(job.status).finished:
        raise ApiError(
            504,
            f"job {job_id} did not finish within {settings.peer_wait_seconds} s "
            f"(SEGQ_PEER_WAIT_SECONDS); it runs on: the same call again within "
            f"{settings.peer_retry_window_seconds} s answers it, or "
            f"GET /api/v1/projects/{project.name}/context/vision/segment/{job_id}",
        )
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
