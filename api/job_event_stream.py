"""A job's progress as server-sent events: which events a job has had, in
what order, and how each is framed.

The events are read from the job's rows, not stored: ``job.started`` once
the job started, an ``item.completed`` or ``item.failed`` per finished item
in the order they finished, and the job's end (``job.completed``,
``job.failed``, ``job.canceled``). Bodies are the webhooks' (the job as GET
shows it, without mask URLs; an item event has only its item, beside the
progress it made). Events are in the order of their times, and an event's
id is its place in that order, from 1, so a client that reconnects with
``Last-Event-ID: n`` gets the events after the n-th. Items of a job finish
one at a time (each takes the job's row lock) and their ``finishedTime`` is
read under the lock, so a later event never lands before one already sent:
not even an item that was running when its job was canceled, which
finishes after ``job.canceled``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.orm import Session

from api.errors import ApiError
from api.job_service import items_of
from segq.job_document import render_item_event, render_job
from segq.models import ItemStatus, Job, JobStatus
from segq.webhook_events import (
    ITEM_COMPLETED,
    ITEM_FAILED,
    JOB_CANCELED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_STARTED,
    event_body,
)

#: A comment line sent when nothing happened for this long, so proxies keep
#: the stream open and the server learns of clients that left.
KEEPALIVE_SECONDS = 15.0
#: What a stream sends while it has nothing else to send.
KEEPALIVE_FRAME = ": keepalive\n\n"
#: How long a client waits before reconnecting after the stream breaks.
RETRY_FRAME = "retry: 2000\n\n"

_END_EVENTS = {
    JobStatus.COMPLETED: JOB_COMPLETED,
    JobStatus.FAILED: JOB_FAILED,
    JobStatus.CANCELED: JOB_CANCELED,
}


@dataclass(frozen=True)
class StreamedEvent:
    number: int
    type: str
    timestamp: int
    render_data: Callable[[], dict[str, Any]]

    def frame(self) -> str:
        body = event_body(self.type, self.timestamp, self.render_data())
        return f"id: {self.number}\nevent: {self.type}\ndata: {body}\n\n"


def job_events(session: Session, job: Job) -> list[StreamedEvent]:
    """Every event ``job`` has had so far, in order; bodies are rendered
    only when framed."""
    items = items_of(session, job)
    # (time, then rank among events of the same millisecond, type, body)
    found: list[tuple[tuple[int, int], str, Callable[[], dict[str, Any]]]] = []

    def whole_job() -> dict[str, Any]:
        return render_job(job, items, None)

    if job.start_time is not None:
        found.append(((job.start_time, 0), JOB_STARTED, whole_job))
    finished = sorted(
        (
            item
            for item in items
            if item.status in (ItemStatus.COMPLETED, ItemStatus.FAILED)
            and item.finished_time is not None
        ),
        key=lambda item: (item.finished_time, item.position),
    )
    counts: dict[str, int] = {
        ItemStatus.COMPLETED: 0,
        ItemStatus.FAILED: 0,
        ItemStatus.RUNNING: len(items),
    }
    for item in finished:
        counts[item.status] += 1
        counts[ItemStatus.RUNNING] -= 1
        # The progress as it was when this item finished.
        progress = dict(counts)
        event = ITEM_COMPLETED if item.status == ItemStatus.COMPLETED else ITEM_FAILED
        assert item.finished_time is not None
        render = partial(render_item_event, job, item, progress)
        found.append(((item.finished_time, 2), event, render))
    end = _END_EVENTS.get(JobStatus(job.status))
    if end is not None:
        # A job completes or fails with its last item (after it, in the same
        # millisecond); a cancel comes before what finishes after it.
        rank = 1 if end == JOB_CANCELED else 3
        found.append(((job.status_time, rank), end, whole_job))
    found.sort(key=lambda event: event[0])  # stable: items keep their order
    return [
        StreamedEvent(number, event_type, timestamp, render)
        for number, ((timestamp, _), event_type, render) in enumerate(found, start=1)
    ]


def last_event_id(header: str | None) -> int:
    """How many events the client has had: its ``Last-Event-ID``, 0 without one."""
    if header is None or header == "":
        return 0
    if not header.isascii() or not header.isdigit() or len(header) > 9:
        raise ApiError(400, "Last-Event-ID must be the id of an event of this stream")
    return int(header)


def frames_after(events: list[StreamedEvent], sent: int) -> Iterable[str]:
    return (event.frame() for event in events[sent:])
