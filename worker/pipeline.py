"""The work of one item, as plain functions: claim, segment, store, complete.

Delivery is at least once, so every step is safe to repeat: a claim names
its attempt and takes a lease (``worker.claims``), objects go to keys of
their attempt (``worker.results``), and a completion lands only while its
attempt still holds the lease.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from segq.db import once_more_if_disconnected
from segq.storage import ObjectStorage, StorageError
from worker.claims import Claim, claim_item, finish_item, release_item
from worker.engines.base import (
    Candidate,
    EverythingUnsupported,
    MaskInputUnsupported,
    SegmentationEngine,
    segment_everything,
    segment_prompts,
)
from worker.engines.item_metrics import recording_item_metrics
from worker.item_inputs import (
    ImageLimits,
    ItemFailure,
    everything_options,
    item_prompts,
    load_image,
)
from worker.lease_keeper import lease_kept
from worker.results import (
    discard_objects,
    encode_result,
    objects_of_earlier_attempts,
    objects_of_result,
)

log = logging.getLogger(__name__)


class StorageUnavailable(Exception):
    """Storage failed this attempt; the item was put back in the queue."""


class ItemOutcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    #: Nothing to do: the item is finished, canceled, or another attempt holds it.
    SKIPPED = "skipped"
    #: This attempt lost its lease before completing; its result was dropped.
    LEASE_LOST = "lease_lost"


def process_item(
    sessions: sessionmaker[Session],
    storage: ObjectStorage,
    engine: SegmentationEngine,
    item_id: int,
    *,
    lease_seconds: int,
    max_attempts: int,
    limits: ImageLimits,
) -> ItemOutcome:
    """Run one item end to end.

    Problems of the item itself fail it. A storage error puts it back in
    the queue and raises StorageUnavailable (the caller schedules a retry),
    until ``max_attempts`` attempts have been made; then the item fails.
    Database errors propagate: the lease runs out and the item is run again.
    """
    # Each transaction runs once more if its pooled connection had died
    # (segq/db.py): all three are guarded by the attempt, so a repeat after a
    # commit that did land finds the work done.
    claim = once_more_if_disconnected(
        lambda: claim_item(
            sessions,
            item_id,
            lease_seconds=lease_seconds,
            engine_name=engine.name,
            max_attempts=max_attempts,
        )
    )
    if claim is None:
        return ItemOutcome.SKIPPED
    result: dict[str, Any] | None = None
    error_message: str | None = None
    try:
        with lease_kept(sessions, claim, lease_seconds):
            result = segment_claimed_item(storage, engine, claim, limits)
    except ItemFailure as failure:
        error_message = str(failure)
    except StorageError as exc:
        if claim.attempt < max_attempts:
            once_more_if_disconnected(lambda: release_item(sessions, claim))
            raise StorageUnavailable(str(exc)) from exc
        error_message = f"storage was unavailable for {claim.attempt} attempts: {exc}"
    except Exception as exc:
        # An engine or encoder bug would fail again on every attempt: fail
        # the item now, with what went wrong, and keep the worker serving.
        log.exception("item %s failed in the pipeline", claim.item_id)
        error_message = f"segmentation failed: {type(exc).__name__}: {str(exc)[:300]}"
    landed = once_more_if_disconnected(
        lambda: finish_item(sessions, claim, result=result, error_message=error_message)
    )
    if not landed:
        log.warning(
            "item %s: attempt %s lost its lease before completing; its result is dropped",
            claim.item_id,
            claim.attempt,
        )
        discard_objects(storage, objects_of_result(result))
        return ItemOutcome.LEASE_LOST
    if claim.attempt > 1:
        # Only retried items pay for this: one delete per key that an
        # earlier attempt may have written.
        discard_objects(storage, objects_of_earlier_attempts(claim))
    return ItemOutcome.COMPLETED if result is not None else ItemOutcome.FAILED


def segment_claimed_item(
    storage: ObjectStorage, engine: SegmentationEngine, claim: Claim, limits: ImageLimits
) -> dict[str, Any]:
    """Read the item's image, segment it with each of the job's prompts (or
    find every object in it), and store the masks: the item's result, with
    what the engine's work cost (raises ItemFailure, StorageError)."""
    image = load_image(storage, claim, limits)
    height, width = image.shape[:2]
    everything = everything_options(claim.options)
    answers: list[tuple[int | None, list[Candidate]]]
    with recording_item_metrics() as metrics:
        try:
            if everything is not None:
                answers = [(None, segment_everything(engine, image, everything))]
            else:
                per_prompt = segment_prompts(
                    engine,
                    image,
                    item_prompts(storage, claim.prompt, width, height),
                    multimask=bool(claim.options.get("multimaskOutput")),
                )
                answers = list(enumerate(per_prompt))
        except (MaskInputUnsupported, EverythingUnsupported) as exc:
            raise ItemFailure(str(exc)) from None
    result = encode_result(claim, answers, storage, width, height)
    result["metrics"] = metrics.as_result()
    return result
