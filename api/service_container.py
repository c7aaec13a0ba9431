"""The services an API process builds once and every request uses."""

from __future__ import annotations

from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from segq.api.job_event_stream import JobEventFanOut
from segq.api.job_waiting import (
    JobChangeFeed,
    NoWaitingSlot,
    WaitingRequests,
    wait_in_thread_until_finished,
)
from segq.api.process_caches import (
    KeptItemTexts,
    KeptJobAnswers,
    ProjectsByKey,
    UnfinishedJobCounts,
)
from segq.api.rate_limit import RateLimiter
from segq.api.signed_links import SignedLinks
from segq.job_changes import JobChangeAnnouncer
from segq.settings import Settings
from segq.storage import ObjectStorage


@dataclass(frozen=True)
class Services:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: ObjectStorage
    celery: Celery
    rate_limiter: RateLimiter
    job_changes: JobChangeFeed
    job_events: JobEventFanOut
    job_announcer: JobChangeAnnouncer
    waiting_requests: WaitingRequests
    signed_links: SignedLinks
    projects_by_key: ProjectsByKey = field(default_factory=ProjectsByKey)
    unfinished_jobs: UnfinishedJobCounts = field(default_factory=UnfinishedJobCounts)
    job_answers: KeptJobAnswers = field(default_factory=KeptJobAnswers)
    item_texts: KeptItemTexts = field(default_factory=KeptItemTexts)

    def wait_until_finished(self, job_id: int, timeout_s: float) -> bool:
        """Block the calling thread until the job reaches a final status
        (True) or ``timeout_s`` passes (False; also for a job that does not
        exist). It holds no database connection while it waits; the caller
        should not either: commit or close the request's session first. It
        holds its thread, so it takes a place among the process's waiting
        requests that may block (``WaitingRequests``): with none free it
        raises NoWaitingSlot at once. A route waits with api/route_waits.py's
        ``wait_for_job`` instead, which parks where the server can."""
        place = self.waiting_requests.reserve(parkable=False)
        if place is None:
            raise NoWaitingSlot(self.waiting_requests.refusal())
        try:
            return wait_in_thread_until_finished(self.job_changes, self.sessions, job_id, timeout_s)
        finally:
            place.release()
