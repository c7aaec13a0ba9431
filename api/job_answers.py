"""GET of a job: its body spliced from the items' stored renderings, its
ETag, and the pages of its items.

The body is what validating the whole job against JobResponse and
serializing it would write, byte for byte (tests/api/test_job_answers.py
checks both ways for every output kind and job state), but only the job's
own fields (a few, bounded by the prompt's limits) go through the model;
each item's result was rendered once, when it completed (segq/job_text.py).

The ETag is computed from what a client can see, before anything is
rendered: the job's row, how many items completed and failed (an item
finishes once, so the counts change exactly when the finished items do),
the signing window of the answer's links, and the page asked for. Items
claimed, retried or leased again change nothing a client sees, nor the tag.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from segq.api.process_caches import KeptItemTexts
from segq.api.request_integers import request_integer
from segq.api.schemas import MAX_LIST_LIMIT, JobResponse, cursor_after, encode_cursor
from segq.api.signed_links import SigningWindow
from segq.job_document import job_state, shown_options, shown_prompt
from segq.job_text import (
    Linker,
    fill_links,
    json_text,
    render_item_text,
    render_reference_text,
    render_result_text,
)
from segq.models import ItemStatus, Job, JobItem

#: Items on a page when ``itemsCursor`` comes without ``itemsLimit``.
DEFAULT_ITEMS_LIMIT = 100


@dataclass(frozen=True)
class ItemsPage:
    """The items a GET asks for: all of them (``limit`` None), or up to
    ``limit`` items from ``first_position`` on, in position order."""

    limit: int | None = None
    first_position: int = 0

    @classmethod
    def of(cls, items_limit: str | None, items_cursor: str | None) -> ItemsPage:
        """From the query's ``itemsLimit`` and ``itemsCursor``; 400 if either is not one."""
        if items_limit is None and items_cursor is None:
            return cls()
        limit = (
            DEFAULT_ITEMS_LIMIT
            if items_limit is None
            else request_integer("itemsLimit", items_limit, minimum=1, maximum=MAX_LIST_LIMIT)
        )
        # A cursor holds the position of the next item to show: never the
        # first (0), so always a positive id as cursors are.
        next_position = cursor_after(items_cursor)
        return cls(limit, 0 if next_position is None else next_position)


@dataclass(frozen=True)
class ItemTally:
    """What the job's items show of themselves, counted by one query."""

    total: int
    completed: int
    failed: int
    #: The last time an item completed or failed (epoch ms), if one did.
    last_finished_time: int | None

    @classmethod
    def of(cls, session: Session, job_id: int) -> ItemTally:
        counts: dict[str, int] = {}
        last_finished_time: int | None = None
        for status, number, finished_time in session.execute(
            select(JobItem.status, func.count(), func.max(JobItem.finished_time))
            .where(JobItem.job_id == job_id)
            .group_by(JobItem.status)
        ):
            counts[status] = number
            if status in (ItemStatus.COMPLETED, ItemStatus.FAILED) and finished_time is not None:
                last_finished_time = max(last_finished_time or 0, finished_time)
        return cls(
            total=sum(counts.values()),
            completed=counts.get(ItemStatus.COMPLETED, 0),
            failed=counts.get(ItemStatus.FAILED, 0),
            last_finished_time=last_finished_time,
        )

    def progress(self) -> dict[str, int]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed}


def entity_tag(
    job: Job,
    tally: ItemTally,
    window: SigningWindow,
    page: ItemsPage,
    view_url: str,
    waiting_for: str | None = None,
) -> str:
    """The answer's (weak) entity tag, unquoted: changes exactly when the
    answer a client would see does."""
    state = [
        job.id,
        # With the id, the job itself: SQLite may give a deleted job's id again.
        job.created_time,
        job.status,
        job.start_time,
        job.status_time,
        job.error_message,
        job.engine,
        tally.total,
        tally.completed,
        tally.failed,
        tally.last_finished_time,
        window.number,
        window.seconds,
        page.limit,
        page.first_position,
        view_url,
        waiting_for,
    ]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:32]


def last_modified_time(job: Job, tally: ItemTally) -> int:
    """Epoch ms of the last change a client can see in the job."""
    return max(
        job.created_time, job.start_time or 0, job.status_time, tally.last_finished_time or 0
    )


@dataclass(frozen=True)
class _ItemRow:
    position: int
    status: str
    file_ref: Mapping[str, Any]
    error_message: str | None


def _item_rows(session: Session, job_id: int, page: ItemsPage) -> list[_ItemRow]:
    """The page's items (one more than its limit, to tell whether more
    follow), without their results: those are read by ``_result_texts``
    for the completed items whose text is not kept."""
    query = (
        select(JobItem.position, JobItem.status, JobItem.file_ref, JobItem.error_message)
        .where(JobItem.job_id == job_id, JobItem.position >= page.first_position)
        .order_by(JobItem.position)
    )
    if page.limit is not None:
        query = query.limit(page.limit + 1)
    return [_ItemRow(*row) for row in session.execute(query)]


def _result_texts(session: Session, job_id: int, positions: Sequence[int]) -> dict[int, str]:
    """The stored renderings of the completed items at ``positions``; an
    item completed before they were stored is rendered here."""
    if not positions:
        return {}
    texts: dict[int, str] = {}
    for position, rendered, result in session.execute(
        select(JobItem.position, JobItem.rendered_result, JobItem.result).where(
            JobItem.job_id == job_id,
            JobItem.position.in_(positions),
            JobItem.status == ItemStatus.COMPLETED,
        )
    ):
        if rendered is not None:
            texts[position] = rendered
        elif result is not None:
            texts[position] = render_result_text(result)
    return texts


def render_job_answer(
    session: Session,
    job: Job,
    tally: ItemTally,
    page: ItemsPage,
    link: Linker,
    view_url: str,
    *,
    waiting_for: str | None = None,
    kept_items: KeptItemTexts | None = None,
    links_key: Hashable = None,
) -> str:
    """The answer's body: JobResponse's JSON as Flask writes it;
    ``waiting_for``: why an unfinished job's items wait, where no live
    worker takes them. ``kept_items``: where completed items' texts, links
    filled in by ``link``, are kept and found under ``links_key`` (what
    names ``link``'s signing window), so that a GET after a change reads
    and fills only the items that completed since."""
    rows = _item_rows(session, job.id, page)
    next_cursor: str | None = None
    if page.limit is not None and len(rows) > page.limit:
        rows = rows[: page.limit]
        next_cursor = encode_cursor(rows[-1].position + 1)

    def kept_key(position: int) -> tuple[object, ...]:
        # With the id, the job itself: SQLite may give a deleted job's id again.
        return (job.id, job.created_time, position, links_key)

    kept_texts: dict[int, str] = {}
    if kept_items is not None:
        for row in rows:
            if row.status == ItemStatus.COMPLETED:
                text = kept_items.get(kept_key(row.position))
                if text is not None:
                    kept_texts[row.position] = text
    result_texts = _result_texts(
        session,
        job.id,
        [
            r.position
            for r in rows
            if r.status == ItemStatus.COMPLETED and r.position not in kept_texts
        ],
    )
    items: list[str] = []
    failures: dict[str, list[str]] = {}
    for row in rows:
        if row.status == ItemStatus.FAILED:
            failures.setdefault(row.error_message or "failed", []).append(
                "{" + render_reference_text(row.file_ref) + "}"
            )
            continue
        text = kept_texts.get(row.position)
        if text is None:
            text = fill_links(render_item_text(row.file_ref, result_texts.get(row.position)), link)
            if kept_items is not None and row.position in result_texts:
                kept_items.keep(kept_key(row.position), text)
        items.append(text)
    document: dict[str, Any] = {
        **job_state(job),
        "items": [],
        "prompt": shown_prompt(job.prompt),
        **shown_options(job.options),
        "progress": tally.progress(),
        "engine": job.engine,
        "viewUrl": view_url,
    }
    if waiting_for is not None:
        document["waitingFor"] = waiting_for
    if failures:
        document["failedItems"] = []
    if page.limit is not None:
        document["nextItemsCursor"] = next_cursor
    # The job's own fields through the model: they are few, and the model
    # writes them as the contract says.
    shown = JobResponse.model_validate(document).model_dump(
        mode="json", by_alias=True, exclude_unset=True
    )
    spliced: dict[str, Callable[[], str]] = {
        "items": lambda: "[" + ",".join(items) + "]",
        "failedItems": lambda: _failed_items_text(failures),
    }
    members = [
        f"{json_text(name)}:{spliced[name]() if name in spliced else json_text(value)}"
        for name, value in shown.items()
    ]
    # Flask ends a JSON answer with a newline.
    return "{" + ",".join(members) + "}\n"


def _failed_items_text(failures: Mapping[str, Sequence[str]]) -> str:
    groups = [
        f'{{"errorMessage":{json_text(message)},"items":[{",".join(references)}]}}'
        for message, references in failures.items()
    ]
    return "[" + ",".join(groups) + "]"
