"""The work of one item, as plain functions: claim, segment, store, complete.

Delivery is at least once, so every step is safe to repeat: a claim names
its attempt and takes a lease (``worker.claims``), objects go to keys of
their attempt (``worker.results``), and a completion lands only while its
attempt still holds the lease.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

import numpy as np
import numpy.typing as npt
from sqlalchemy.orm import Session, sessionmaker

from segq.contract import StoredMetrics, StoredResult, objects_named_by_result
from segq.db import once_more_if_disconnected
from segq.storage import ObjectStorage, StorageError, StorageUnreachable
from segq.worker.claims import (
    Claim,
    claim_item,
    claim_next_item,
    finish_item,
    queued_company,
    release_item,
)
from segq.worker.dependency_breaker import DependencyBreaker
from segq.worker.engines.base import (
    Candidate,
    ConceptUnsupported,
    EverythingUnsupported,
    ImageBatchEngine,
    MaskInputUnsupported,
    SegmentationEngine,
    segment_everything,
    segment_prompts,
)
from segq.worker.engines.item_metrics import recording_item_metrics
from segq.worker.item_inputs import (
    ImageLimits,
    ItemFailure,
    everything_options,
    item_prompts,
    load_image,
)
from segq.worker.item_stages import ItemStages, Stage, timed_stage
from segq.worker.lease_keeper import lease_kept
from segq.worker.metrics import STORAGE_ERRORS
from segq.worker.results import (
    discard_objects,
    discard_objects_of_earlier_attempts,
    encode_result,
)

log = logging.getLogger(__name__)


class StorageUnavailable(Exception):
    """Storage failed this attempt; the item was put back in the queue, to
    be run again in ``retry_in_seconds``."""

    def __init__(self, message: str, retry_in_seconds: int) -> None:
        super().__init__(message)
        self.retry_in_seconds = retry_in_seconds


MAX_RETRY_DELAY_SECONDS = 60


def storage_retry_delay(attempt: int) -> int:
    """Seconds before an item whose storage failed at ``attempt`` (1, 2, ...)
    is run again: 2, 4, 8, ... capped at a minute (the attempts themselves
    are bounded by ``max_attempts``)."""
    return int(min(2**attempt, MAX_RETRY_DELAY_SECONDS))


class ItemOutcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    #: Nothing to do: the item is finished, canceled, or another attempt holds it.
    SKIPPED = "skipped"
    #: This attempt lost its lease before completing; its result was dropped.
    LEASE_LOST = "lease_lost"
    #: Storage failed; the item is back in the queue for a later attempt.
    RELEASED = "released"
    #: Storage is down: the item is back in the queue with its attempt
    #: given back, and this worker takes no items until storage answers.
    PAUSED = "paused"


@dataclass(frozen=True)
class ItemRun:
    """What one attempt at an item came to, with what the worker's metrics
    and log need of it, so nothing reads the item again to report it."""

    outcome: ItemOutcome
    #: The item run: the one queued first, which may not be the one the
    #: wake-up message named.
    item_id: int
    #: None where nothing was claimed (SKIPPED).
    claim: Claim | None = None
    #: The engine's name, as the item records it.
    engine: str = ""
    #: A completed item's result ``metrics`` (what the engine's work cost).
    metrics: StoredMetrics | None = None


#: How often a lone item looks again for company while it may wait.
_COMPANY_POLL_SECONDS = 0.002


def process_item(
    sessions: sessionmaker[Session],
    storage: ObjectStorage,
    engine: SegmentationEngine,
    item_id: int,
    *,
    lease_seconds: int,
    max_attempts: int,
    limits: ImageLimits,
    batch_wait_ms: int = 0,
    taken_along: Callable[[ItemRun], None] | None = None,
    announce_job_change: Callable[[int], None] | None = None,
    breaker: DependencyBreaker | None = None,
) -> ItemRun:
    """Run one item end to end: the queued item queued first, which the
    wake-up message for ``item_id`` claims (``claim_next_item``); with an
    engine that encodes images in
    batches, run up to its batch size of queued items with it (its job's,
    then others', waiting up to ``batch_wait_ms`` for them), each claimed
    and finished exactly as a lone item is. ``announce_job_change`` is told
    the job's id after each committed change a client may be waiting for
    (the job started, an item finished). Returns the run of the item
    claimed (which may not be ``item_id``).

    Problems of an item itself fail it. A storage error puts the item back
    in the queue until ``max_attempts`` attempts have been made; then it
    fails. For the item the message claimed, StorageUnavailable is raised
    (the caller schedules a retry). Storage that is down (StorageUnreachable)
    costs no attempt: the item is PAUSED, back in the queue with its attempt
    given back, and ``breaker`` is tripped so the caller takes no more items
    until storage answers; items of the batch that come after skip
    storage at once. Each item taken along goes to ``taken_along`` as its
    run: the caller counts it and sends a RELEASED one again (the
    reconciler does when nobody does). Database errors propagate: the
    leases run out and the items are run again.
    """
    # Each transaction runs once more if its pooled connection had died
    # (segq/db.py): all three are guarded by the attempt, so a repeat after a
    # commit that did land finds the work done.
    stages = ItemStages()
    claim = once_more_if_disconnected(
        lambda: claim_next_item(
            sessions,
            item_id,
            lease_seconds=lease_seconds,
            engine_name=engine.name,
            max_attempts=max_attempts,
        )
    )
    if claim is None:
        return ItemRun(ItemOutcome.SKIPPED, item_id, engine=engine.name)
    stages.add(Stage.CLAIM, stages.elapsed())
    claims = [(claim, stages)]
    if isinstance(engine, ImageBatchEngine) and engine.batch_size > 1:
        claims += _claim_company(
            sessions,
            claim,
            engine.batch_size - 1,
            engine_name=engine.name,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            wait_seconds=batch_wait_ms / 1000,
        )
    announce = announce_job_change or _nobody_listens
    started_jobs = {taken.job_id for taken, _ in claims if taken.attempt == 1}
    with stages.timing(Stage.NOTIFY):
        for started in started_jobs:
            # The first attempt of an item may have started its job.
            announce(started)
    outcomes = _run_claimed(
        sessions,
        storage,
        engine,
        claims,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
        limits=limits,
        announce_job_change=announce,
        breaker=breaker,
    )
    runs = [
        ItemRun(outcome, taken.item_id, taken, engine.name, metrics)
        for (taken, _), (outcome, _, metrics) in zip(claims, outcomes, strict=True)
    ]
    if taken_along is not None:
        for run in runs[1:]:
            taken_along(run)
    outcome, storage_error, _ = outcomes[0]
    if outcome == ItemOutcome.RELEASED:
        raise StorageUnavailable(storage_error, storage_retry_delay(claim.attempt))
    return runs[0]


def _nobody_listens(job_id: int) -> None:
    pass


def _claim_company(
    sessions: sessionmaker[Session],
    claim: Claim,
    count: int,
    *,
    engine_name: str,
    lease_seconds: int,
    max_attempts: int,
    wait_seconds: float,
) -> list[tuple[Claim, ItemStages]]:
    """Up to ``count`` more items claimed for ``claim``'s batch, each with
    its stages from its own claim on, looking again until ``wait_seconds``
    have passed while the batch is not full."""
    deadline = time.monotonic() + wait_seconds
    taken: list[tuple[Claim, ItemStages]] = []
    while True:
        candidates = once_more_if_disconnected(
            lambda: queued_company(
                sessions,
                claim,
                count - len(taken),
                engine_name=engine_name,
                max_attempts=max_attempts,
            )
        )
        for candidate in candidates:
            # Claimed by id as its own message would claim it: one another
            # worker took meanwhile is not ours, and nothing changes.
            extra_stages = ItemStages()
            extra = once_more_if_disconnected(
                functools.partial(
                    claim_item,
                    sessions,
                    candidate,
                    lease_seconds=lease_seconds,
                    engine_name=engine_name,
                    max_attempts=max_attempts,
                )
            )
            if extra is not None:
                extra_stages.add(Stage.CLAIM, extra_stages.elapsed())
                taken.append((extra, extra_stages))
        if len(taken) >= count or time.monotonic() >= deadline:
            return taken
        time.sleep(min(_COMPANY_POLL_SECONDS, max(deadline - time.monotonic(), 0)))


@dataclass
class _Attempt:
    """One claimed item on its way through a batch."""

    claim: Claim
    stages: ItemStages
    image: npt.NDArray[np.uint8] | None = None
    result: StoredResult | None = None
    error_message: str | None = None
    storage_error: str | None = None
    #: The storage error said storage is down, not that this item is at fault.
    storage_down: bool = False


#: An item's outcome, its storage error (released, paused) and its
#: result's metrics (completed).
_Finished = tuple[ItemOutcome, str, StoredMetrics | None]


def _run_claimed(
    sessions: sessionmaker[Session],
    storage: ObjectStorage,
    engine: SegmentationEngine,
    claims: list[tuple[Claim, ItemStages]],
    *,
    lease_seconds: int,
    max_attempts: int,
    limits: ImageLimits,
    announce_job_change: Callable[[int], None],
    breaker: DependencyBreaker | None,
) -> list[_Finished]:
    """Load, encode together, segment and finish each claimed item; each
    item's outcome, with the storage error of one that was released and
    the metrics of one that completed."""
    attempts = [_Attempt(claim, stages) for claim, stages in claims]
    with contextlib.ExitStack() as leases:
        for attempt in attempts:
            leases.enter_context(lease_kept(sessions, attempt.claim, lease_seconds))
        for attempt in attempts:
            _guarded(attempt, functools.partial(_load, attempt, storage, limits), breaker)
        loaded = [attempt.image for attempt in attempts if attempt.image is not None]
        if len(loaded) > 1 and isinstance(engine, ImageBatchEngine):
            try:
                # The batch's encoding is the engine's time of the item that
                # ran it; its companions count it as time spent on company.
                with attempts[0].stages.timing(Stage.ENGINE):
                    engine.encode_images(loaded)
            except Exception:
                # Each item then encodes its own image, and fails alone if
                # that fails too: one bad image must not fail its company.
                log.exception("encoding a batch of %s images failed", len(loaded))
        for attempt in attempts:
            if attempt.image is not None:
                _guarded(attempt, functools.partial(_segment, attempt, storage, engine), breaker)
        return [
            _finish(
                sessions,
                storage,
                attempt,
                max_attempts=max_attempts,
                announce_job_change=announce_job_change,
                breaker=breaker,
                in_batch=len(attempts) > 1,
            )
            for attempt in attempts
        ]


def _load(attempt: _Attempt, storage: ObjectStorage, limits: ImageLimits) -> None:
    with attempt.stages.timing(Stage.IMAGE_READ):
        attempt.image = load_image(storage, attempt.claim, limits)


def _segment(attempt: _Attempt, storage: ObjectStorage, engine: SegmentationEngine) -> None:
    assert attempt.image is not None
    # Its stages (engine, encodings, storage writes) are timed inside.
    with attempt.stages.recording():
        attempt.result = segment_image(storage, engine, attempt.claim, attempt.image)
    attempt.image = None  # the masks are stored: the pixels are not needed any more


def _guarded(
    attempt: _Attempt, step: Callable[[], None], breaker: DependencyBreaker | None
) -> None:
    """Run one step of an item; what goes wrong is the item's alone, but
    for storage being down, which trips ``breaker`` (and then spares the
    rest of the batch a wait on each of its requests)."""
    pause = None if breaker is None else breaker.pause
    if pause is not None:
        attempt.storage_error, attempt.storage_down = pause.reason, True
        attempt.image = None
        return
    try:
        step()
    except ItemFailure as failure:
        attempt.error_message = str(failure)
    except StorageUnreachable as exc:
        attempt.storage_error, attempt.storage_down = str(exc), True
        if breaker is not None:
            breaker.trip(str(exc))
    except StorageError as exc:
        attempt.storage_error = str(exc)
    except Exception as exc:
        # An engine or encoder bug would fail again on every attempt: fail
        # the item now, with what went wrong, and keep the worker serving.
        log.exception("item %s failed in the pipeline", attempt.claim.item_id)
        attempt.error_message = f"segmentation failed: {type(exc).__name__}: {str(exc)[:300]}"
    if attempt.error_message is not None or attempt.storage_error is not None:
        attempt.image = None


def _finish(
    sessions: sessionmaker[Session],
    storage: ObjectStorage,
    attempt: _Attempt,
    *,
    max_attempts: int,
    announce_job_change: Callable[[int], None],
    breaker: DependencyBreaker | None,
    in_batch: bool,
) -> _Finished:
    claim = attempt.claim
    stages = attempt.stages
    error_message = attempt.error_message
    if attempt.storage_error is not None:
        # Counted here, once per attempt, the last one that fails the item too.
        STORAGE_ERRORS.inc()
        if attempt.storage_down:
            # Not the item's fault: it waits, its attempt given back, until
            # storage answers (or the outage outlasts its bound: worker/tasks.py).
            once_more_if_disconnected(lambda: release_item(sessions, claim, give_back_attempt=True))
            return ItemOutcome.PAUSED, attempt.storage_error, None
        if claim.attempt < max_attempts:
            delay = storage_retry_delay(claim.attempt)
            once_more_if_disconnected(lambda: release_item(sessions, claim, delay))
            return ItemOutcome.RELEASED, attempt.storage_error, None
        error_message = f"storage failed each of {claim.attempt} attempts: {attempt.storage_error}"
    result = attempt.result
    if result is not None:
        # Kept with the item: its stages up to this commit (module item_stages).
        result["metrics"] = stages.stored_in(result["metrics"])
    with stages.timing(Stage.COMPLETION):
        landed = once_more_if_disconnected(
            lambda: finish_item(sessions, claim, result=result, error_message=error_message)
        )
    if landed:
        with stages.timing(Stage.NOTIFY):
            announce_job_change(claim.job_id)
        log.debug(
            "item %s attempt %s: stages",
            claim.item_id,
            claim.attempt,
            extra={"item_id": claim.item_id, **stages.observe(in_batch=in_batch)},
        )
    if not landed:
        log.warning(
            "item %s: attempt %s lost its lease before completing; its result is dropped",
            claim.item_id,
            claim.attempt,
        )
        discard_objects(storage, objects_named_by_result(result))
        return ItemOutcome.LEASE_LOST, "", None
    if claim.attempt > 1:
        # Only retried items pay for this: one listing of the item's
        # objects, and one delete of those no attempt but this one wrote.
        discard_objects_of_earlier_attempts(storage, claim, result)
    if result is not None and breaker is not None:
        breaker.confirm()  # its masks were stored: storage works
    if result is None:
        return ItemOutcome.FAILED, "", None
    return ItemOutcome.COMPLETED, "", result.get("metrics")


def segment_claimed_item(
    storage: ObjectStorage, engine: SegmentationEngine, claim: Claim, limits: ImageLimits
) -> StoredResult:
    """Read the item's image, then ``segment_image`` (raises ItemFailure,
    StorageError)."""
    return segment_image(storage, engine, claim, load_image(storage, claim, limits))


def segment_image(
    storage: ObjectStorage,
    engine: SegmentationEngine,
    claim: Claim,
    image: npt.NDArray[np.uint8],
) -> StoredResult:
    """Segment the item's ``image`` ((H, W, 3) uint8 RGB) with each of the
    job's prompts (or find every object in it), and store the masks: the
    item's result, with what the engine's work cost (raises ItemFailure,
    StorageError)."""
    height, width = image.shape[:2]
    everything = everything_options(claim.options)
    answers: list[tuple[int | None, list[Candidate]]]
    with timed_stage(Stage.ENGINE), recording_item_metrics() as metrics:
        try:
            if everything is not None:
                answers = [(None, segment_everything(engine, image, everything))]
            else:
                per_prompt = segment_prompts(
                    engine,
                    image,
                    item_prompts(storage, claim.prompt, width, height, claim.options),
                    multimask=bool(claim.options.get("multimaskOutput")),
                )
                answers = list(enumerate(per_prompt))
        except (MaskInputUnsupported, EverythingUnsupported, ConceptUnsupported) as exc:
            raise ItemFailure(str(exc)) from None
    result = encode_result(claim, answers, storage, width, height)
    # The engines' recorder gives the contract's StoredMetrics as a plain dict.
    result["metrics"] = cast(StoredMetrics, metrics.as_result())
    return result
