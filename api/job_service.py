"""Creating a segmentation job, and finding a project's jobs: the work
behind the job routes, with no Flask in it, so every route family that
speaks the contract (Cognite's, and compatibility routes) shares it.
Refusals are ApiErrors; the caller's error envelope renders them."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from segq.api.errors import ApiError, FieldPath, field_name
from segq.api.item_sources import item_reference, resolve_sources
from segq.api.job_items import items_of
from segq.api.schemas import (
    MAX_IDEMPOTENCY_KEY_LENGTH,
    BoundingBox,
    EverythingOptions,
    Exemplar,
    MaskInput,
    Point,
    SegmentRequest,
    TextOptions,
    Webhook,
    checked_text,
)
from segq.api.service_container import Services
from segq.api.stored_files import discard_objects
from segq.clock import now_ms
from segq.contract import (
    DEFAULT_OUTPUTS,
    EVERYTHING,
    LOGITS_KEY,
    EverythingSettings,
    StoredMaskInput,
    StoredOptions,
    TextSettings,
)
from segq.engine_catalogue import Capability, concept_unsupported_message, lacks
from segq.fault_points import API_AFTER_COMMIT, die_if_armed
from segq.models import ItemStatus, Job, JobItem, JobStatus
from segq.queue import enqueue_items
from segq.url_guard import FetchPolicy, UrlRefused, check_url
from segq.webhook_events import JOB_CANCELED, record_event, subscribed_events, whole_job_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CreatedJob:
    job: Job
    #: In position order.
    items: list[JobItem]


def create_segmentation_job(
    session: Session,
    services: Services,
    project_id: int,
    segment_request: SegmentRequest,
    idempotency_key_header: str | None,
    *,
    peer_request: dict[str, Any] | None = None,
    inline_mask_input: bytes | None = None,
    request_sha256: str | None = None,
) -> CreatedJob:
    """Check ``segment_request``, commit the job and its items, and publish
    the items to the broker. A request repeated with the same idempotency
    key (the Idempotency-Key header as sent, None if absent) gets the job
    the first one created. ``peer_request``: what a compatibility route
    (api/peers/) must show of the job later in its own shape, kept in the
    job's options under its "peer" key, committed with the job itself.
    ``inline_mask_input``: logits (segq.mask_logits' .npy) for the job's
    top-level prompt, given with the request by a compatibility route
    (Livepeer's ``mask_input``), kept in the job's row. ``request_sha256``:
    what a repeated request is compared on, where the caller decides what
    makes requests the same (api/peers/synchronous_jobs.py); by default the
    request as validated."""
    settings = services.settings
    _check_semantics(segment_request, settings.max_items_per_job, settings.model)
    if inline_mask_input is not None:
        _check_capability(settings.model, Capability.MASK_INPUT, "mask_input")
    webhook = _checked_webhook(segment_request.webhook, settings.webhook_policy())
    idempotency_key = _checked_idempotency_key(idempotency_key_header)
    if request_sha256 is None:
        request_sha256 = _request_fingerprint(segment_request, webhook)
    if idempotency_key is not None:
        earlier = _job_for_idempotency_key(session, project_id, idempotency_key, request_sha256)
        if earlier is not None:
            return CreatedJob(earlier, items_of(session, earlier))

    _check_unfinished_jobs(session, services, project_id)
    stored_prompt = _stored_prompt(session, project_id, segment_request)
    if inline_mask_input is not None:
        stored_prompt["maskInput"] = {"inline": base64.b64encode(inline_mask_input).decode()}
    sources = resolve_sources(session, services, project_id, segment_request.items)
    now = now_ms()
    job = Job(
        project_id=project_id,
        status=JobStatus.QUEUED,
        created_time=now,
        status_time=now,
        prompt=stored_prompt,
        options=_stored_options(segment_request)
        | ({"peer": peer_request} if peer_request is not None else {}),
        idempotency_key=idempotency_key,
        request_sha256=request_sha256,
        webhook=webhook,
    )
    try:
        session.add(job)
        session.flush()  # the job's id, for its items; a duplicate key fails here
        items = [
            JobItem(
                job_id=job.id,
                position=position,
                file_id=None if isinstance(source, str) else source.id,
                file_ref=item_reference(source),
                file_storage_key=None if isinstance(source, str) else source.storage_key,
                status=ItemStatus.QUEUED,
                attempt=0,
                published_time=now,
            )
            for position, source in enumerate(sources.sources)
        ]
        session.add_all(items)
        session.commit()
    except IntegrityError:
        session.rollback()
        discard_objects(services.storage, sources.written_keys)
        earlier = (
            _job_for_idempotency_key(session, project_id, idempotency_key, request_sha256)
            if idempotency_key is not None
            else None
        )
        if earlier is None:
            # The only other constraint a valid request can break: a file it
            # names was deleted between the check and the commit.
            raise ApiError(409, "a file of this job was deleted meanwhile; retry") from None
        # Another request with the same idempotency key committed first.
        return CreatedJob(earlier, items_of(session, earlier))

    die_if_armed(API_AFTER_COMMIT, settings.fault_point)
    try:
        # The committed objects keep their ids (expire_on_commit=False): no re-read.
        enqueue_items(services.celery, [item.id for item in items])
    except Exception:
        # The job is committed and stays Queued; the client's answer is still
        # true. Marking its items unpublished has the reconciler send them at
        # its next pass. (A process that dies here marks nothing; the
        # reconciler finds its items once the queue runs empty without them.)
        log.exception("could not publish job %s to the broker", job.id)
        session.execute(update(JobItem).where(JobItem.job_id == job.id).values(published_time=None))
        session.commit()
    return CreatedJob(job, items)


def owned_job(session: Session, project_id: int, job_id: int, *, for_update: bool = False) -> Job:
    query = select(Job).where(Job.id == job_id, Job.project_id == project_id)
    job = session.scalar(query.with_for_update() if for_update else query)
    # Another project's job is "not found", never "forbidden": no existence oracle.
    if job is None:
        raise ApiError(404, f"job {job_id} not found", missing=[{"jobId": job_id}])
    return job


def cancel_job(session: Session, services: Services, project_id: int, job_id: int) -> Job:
    """Cancel and commit: queued items never run; an item already running
    finishes, and no further item starts. Canceling a canceled job changes
    nothing; a finished one is 409. Requests waiting on the job hear of it."""
    job = owned_job(session, project_id, job_id, for_update=True)
    if job.status in (JobStatus.COMPLETED, JobStatus.FAILED):
        session.rollback()
        raise ApiError(409, f"job {job_id} has already finished ({job.status})")
    if job.status != JobStatus.CANCELED:
        now = now_ms()
        job.status = JobStatus.CANCELED
        job.status_time = now
        session.execute(
            update(JobItem)
            .where(JobItem.job_id == job.id, JobItem.status == ItemStatus.QUEUED)
            .values(status=ItemStatus.CANCELED, finished_time=now)
        )
        record_event(session, job, JOB_CANCELED, now, lambda: whole_job_data(session, job))
    session.commit()
    services.job_announcer.announce(job.id)
    return job


def _check_unfinished_jobs(session: Session, services: Services, project_id: int) -> None:
    """Bound the backlog a project can pile up; checked, not locked, so a
    burst may overshoot by its own size.

    Counting on every request costs a query; far from the bound it need not
    be exact. While this process's count of the last second, plus the jobs
    it was asked for since, is under half the bound, that count stands in.
    Nearer, every request counts anew, so the bound holds as before unless
    other API processes take more than half of it within one second."""
    limit = services.settings.max_unfinished_jobs
    counts = services.unfinished_jobs
    # This request's job counts in advance: one that fails later only makes
    # the estimate err high, which brings the next exact count sooner.
    recent = counts.recent(project_id)
    counts.add_one(project_id)
    if recent is not None and recent < limit // 2:
        return
    unfinished = (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.project_id == project_id,
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            )
        )
        or 0
    )
    counts.counted(project_id, unfinished + 1)
    if unfinished >= limit:
        raise ApiError(
            429,
            f"this project has {limit} unfinished jobs, the most allowed; retry when some finish",
            headers={"Retry-After": str(max(services.settings.poll_retry_after_seconds, 5))},
        )


def _check_semantics(
    segment_request: SegmentRequest, max_items: int, configured_model: str | None
) -> None:
    """What the schema cannot say: well-formed requests that cannot be run.
    ``configured_model``: SEGQ_MODEL where it is set; what its engine cannot
    do (the catalogue's capabilities) is refused here rather than failed by
    the worker."""
    if segment_request.model is not None:
        raise ApiError(422, "model selection is not supported: this server runs one engine")
    top_level_text = segment_request.text is not None or segment_request.boxes is not None
    if segment_request.mode == EVERYTHING:
        _check_everything(segment_request, configured_model)
    elif segment_request.everything is not None:
        raise ApiError(422, 'everything options are for "mode": "everything"')
    elif segment_request.prompts is None and top_level_text:
        _check_text_prompt(
            (),
            segment_request.text,
            segment_request.boxes,
            geometric=segment_request.points is not None or segment_request.boundingBox is not None,
        )
    elif segment_request.prompts is None:
        _check_prompt((), segment_request.points, segment_request.boundingBox)
    elif (
        segment_request.points is not None
        or segment_request.boundingBox is not None
        or top_level_text
    ):
        raise ApiError(
            400,
            "give either prompts or the top-level points/boundingBox/text, not both: "
            "this job has both",
        )
    else:
        for index, prompt_set in enumerate(segment_request.prompts):
            if prompt_set.text is not None or prompt_set.boxes is not None:
                _check_text_prompt(
                    ("prompts", index),
                    prompt_set.text,
                    prompt_set.boxes,
                    geometric=prompt_set.points is not None
                    or prompt_set.boundingBox is not None
                    or prompt_set.maskInput is not None,
                )
            else:
                _check_prompt(("prompts", index), prompt_set.points, prompt_set.boundingBox)
    if has_text_prompt(segment_request):
        # The API reads the same SEGQ_MODEL as the workers (an unset one
        # never chooses an engine that takes text): a job no worker could
        # serve is refused here, never queued.
        if lacks(configured_model, Capability.TEXT_PROMPTS):
            raise ApiError(422, concept_unsupported_message(configured_model))
    elif segment_request.textOptions is not None:
        raise ApiError(422, "textOptions are for text prompts: this job has none")
    if "logits" in (segment_request.outputs or ()):
        _check_capability(configured_model, Capability.LOGITS, "logits")
    if any(p.maskInput is not None for p in segment_request.prompts or ()):
        _check_capability(configured_model, Capability.MASK_INPUT, "maskInput")
    if len(segment_request.items) > max_items:
        raise ApiError(422, f"a job takes at most {max_items} items")
    for index, item in enumerate(segment_request.items):
        named = [
            field
            for field in ("fileId", "fileExternalId", "fileInstanceId", "fileUrl", "imageData")
            if getattr(item, field) is not None
        ]
        if len(named) != 1:
            raise ApiError(
                400,
                f"items[{index}] must have exactly one of fileId, fileExternalId, "
                "fileInstanceId, fileUrl, imageData",
            )


def has_text_prompt(segment_request: SegmentRequest) -> bool:
    """Whether the job has a text prompt (SAM 3's), top-level or in prompts."""
    return segment_request.text is not None or any(
        prompt_set.text is not None for prompt_set in segment_request.prompts or ()
    )


def _check_text_prompt(
    where: FieldPath, text: str | None, boxes: list[Exemplar] | None, *, geometric: bool
) -> None:
    """A text prompt: a phrase, with exemplar boxes or none, and nothing else."""
    if text is None:
        raise ApiError.about(
            (*where, "boxes"),
            422,
            " are exemplars of a text prompt's concept: give the text they are examples of",
        )
    if geometric:
        place = field_name(where) if where else "top level"
        raise ApiError(
            422,
            f"a text prompt takes exemplar boxes, not points, boundingBox or maskInput ({place}): "
            "give those in a prompt of their own",
        )
    for index, box in enumerate(boxes or ()):
        if box.xMin >= box.xMax or box.yMin >= box.yMax:
            raise ApiError.about(
                (*where, "boxes", index), 422, " must have xMin < xMax and yMin < yMax"
            )


def _check_everything(segment_request: SegmentRequest, configured_model: str | None) -> None:
    if (
        segment_request.prompts is not None
        or segment_request.points is not None
        or segment_request.boundingBox is not None
        or segment_request.text is not None
        or segment_request.boxes is not None
    ):
        raise ApiError(
            422, "segment everything takes no prompt: drop points, boundingBox, text and prompts"
        )
    if segment_request.textOptions is not None:
        raise ApiError(422, "textOptions are for text prompts, not segment everything")
    if "logits" in (segment_request.outputs or ()):
        raise ApiError(422, "logits are given for prompted segments only, not segment everything")
    _check_capability(configured_model, Capability.EVERYTHING, "segment everything")


def _check_capability(configured_model: str | None, capability: Capability, asked: str) -> None:
    """422 where the configured engine is known to lack ``capability``
    (what the request ``asked`` for needs it); an engine left to the
    worker's choice is not refused here."""
    if lacks(configured_model, capability):
        raise ApiError(
            422,
            f"{asked} needs an engine with {capability}; "
            f"this server runs {configured_model}, which has none",
        )


def _check_prompt(where: FieldPath, points: list[Point] | None, box: BoundingBox | None) -> None:
    """One object's prompt; ``where``: the path of its fields."""
    if not points and box is None:
        place = field_name(where) if where else "top level"
        raise ApiError(422, f"give at least one point or a boundingBox ({place})")
    if box is not None and (box.xMin >= box.xMax or box.yMin >= box.yMax):
        raise ApiError.about((*where, "boundingBox"), 422, " must have xMin < xMax and yMin < yMax")
    seen: set[tuple[float, float]] = set()
    for index, point in enumerate(points or []):
        if (point.x, point.y) in seen:
            raise ApiError.about((*where, "points", index), 422, " repeats an earlier point")
        seen.add((point.x, point.y))


def _stored_options(segment_request: SegmentRequest) -> StoredOptions:
    options: StoredOptions = {
        "multimaskOutput": segment_request.multimaskOutput,
        "outputs": list(segment_request.outputs or DEFAULT_OUTPUTS),
    }
    if segment_request.mode == EVERYTHING:
        options["mode"] = EVERYTHING
        # The schema's defaults are the contract's EVERYTHING_DEFAULTS.
        chosen = segment_request.everything or EverythingOptions()
        options["everything"] = cast(EverythingSettings, chosen.model_dump())
    if has_text_prompt(segment_request):
        chosen_text = segment_request.textOptions or TextOptions()
        options["textOptions"] = cast(TextSettings, chosen_text.model_dump())
    return options


def _stored_prompt(
    session: Session, project_id: int, segment_request: SegmentRequest
) -> dict[str, Any]:
    """The job's prompt as its row keeps it: the top-level one, or
    ``prompts`` with each ``maskInput`` resolved to the logits it names."""
    points = segment_request.points
    box = segment_request.boundingBox
    stored: dict[str, Any] = {
        "points": [p.model_dump() for p in points] if points else None,
        "boundingBox": box.model_dump() if box else None,
    }
    if segment_request.text is not None:
        stored["text"] = segment_request.text
        stored["boxes"] = _stored_exemplars(segment_request.boxes)
    if segment_request.prompts is not None:
        stored["prompts"] = [
            {
                "points": [p.model_dump() for p in prompt_set.points]
                if prompt_set.points
                else None,
                "boundingBox": (
                    prompt_set.boundingBox.model_dump() if prompt_set.boundingBox else None
                ),
                "maskInput": (
                    _resolved_mask_input(session, project_id, f"prompts[{index}]", mask_input)
                    if (mask_input := prompt_set.maskInput) is not None
                    else None
                ),
                # Kept only on text prompts, so other jobs' rows are as before.
                **(
                    {"text": prompt_set.text, "boxes": _stored_exemplars(prompt_set.boxes)}
                    if prompt_set.text is not None
                    else {}
                ),
            }
            for index, prompt_set in enumerate(segment_request.prompts)
        ]
    return stored


def _stored_exemplars(boxes: list[Exemplar] | None) -> list[dict[str, Any]] | None:
    return [box.model_dump() for box in boxes] if boxes else None


def _resolved_mask_input(
    session: Session, project_id: int, where: str, mask_input: MaskInput
) -> StoredMaskInput:
    """``mask_input`` with the storage key of the logits it names. Another
    project's job is answered as an unknown one: no existence oracle."""
    job_id, item_index, segment_index = (
        mask_input.jobId,
        mask_input.itemIndex,
        mask_input.segmentIndex,
    )
    job = session.scalar(select(Job).where(Job.id == job_id, Job.project_id == project_id))
    if job is None:
        raise ApiError(
            400, f"{where}.maskInput: job {job_id} not found", missing=[{"jobId": job_id}]
        )
    if "logits" not in (job.options.get("outputs") or ()):
        raise ApiError(
            422,
            f"{where}.maskInput: job {job_id} was not asked for logits; "
            'ask for them with "outputs": [..., "logits"]',
        )
    item = session.scalar(
        select(JobItem).where(JobItem.job_id == job.id, JobItem.position == item_index)
    )
    if item is None:
        raise ApiError(422, f"{where}.maskInput: job {job_id} has no item {item_index}")
    if item.status != ItemStatus.COMPLETED or item.result is None:
        raise ApiError(
            422,
            f"{where}.maskInput: item {item_index} of job {job_id} is {item.status}, "
            "not Completed: no logits stored",
        )
    segments = item.result["segments"]
    if segment_index >= len(segments):
        raise ApiError(
            422,
            f"{where}.maskInput: item {item_index} of job {job_id} has "
            f"{len(segments)} segments, no segment {segment_index}",
        )
    logits_key = segments[segment_index].get(LOGITS_KEY)
    if logits_key is None:
        raise ApiError(
            422,
            f"{where}.maskInput: segment {segment_index} of item {item_index} of job {job_id} "
            "has no logits stored",
        )
    return {
        "jobId": job_id,
        "itemIndex": item_index,
        "segmentIndex": segment_index,
        LOGITS_KEY: logits_key,
    }


def _checked_webhook(webhook: Webhook | None, policy: FetchPolicy) -> dict[str, object] | None:
    """The job's webhook as stored, with full event names. The URL passes
    the checks that need no DNS now; the worker checks its addresses at
    every delivery, as it does for image URLs."""
    if webhook is None:
        return None
    try:
        check_url(webhook.url, policy)
    except UrlRefused as exc:
        # 400, as for a refused fileUrl.
        raise ApiError.about(("webhook", "url"), 400, f": {exc}") from None
    return {"url": webhook.url, "events": subscribed_events(webhook.events)}


def _request_fingerprint(segment_request: SegmentRequest, webhook: dict[str, object] | None) -> str:
    """What an Idempotency-Key is compared on: the request as validated, with
    defaults filled in and numbers as numbers, so the same request spelt
    another way (``1`` or ``1.0``, a default written out, ``started`` or
    ``job.started``) is the same request."""
    normalized = segment_request.model_dump(mode="json")
    normalized["points"] = normalized["points"] or None
    normalized["outputs"] = sorted(set(segment_request.outputs or DEFAULT_OUTPUTS))
    normalized["webhook"] = webhook
    return hashlib.sha256(
        json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _checked_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key:
        raise ApiError(400, "Idempotency-Key is empty")
    return checked_text("Idempotency-Key", key, MAX_IDEMPOTENCY_KEY_LENGTH)


def _job_for_idempotency_key(
    session: Session, project_id: int, key: str, request_sha256: str
) -> Job | None:
    job = session.scalar(
        select(Job).where(Job.project_id == project_id, Job.idempotency_key == key)
    )
    if job is not None and job.request_sha256 != request_sha256:
        raise ApiError(409, "this Idempotency-Key was used with a different body")
    return job
