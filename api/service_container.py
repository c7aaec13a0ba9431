"""The services an API process builds once and every request uses."""

from __future__ import annotations

from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from segq.api.job_event_stream import JobEventFanOut
from segq.api.job_waiting import BlockingWaits, JobChangeFeed, wait_in_thread_until_finished
from segq.api.process_caches import KeptJobAnswers, ProjectsByKey, UnfinishedJobCounts
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
    blocking_waits: BlockingWaits
    signed_links: SignedLinks
    projects_by_key: ProjectsByKey = field(default_factory=ProjectsByKey)
    unfinished_jobs: UnfinishedJobCounts = field(default_factory=UnfinishedJobCounts)
    job_answers: KeptJobAnswers = field(default_factory=KeptJobAnswers)

    def wait_until_finished(self, job_id: int, timeout_s: float) -> bool:
        """Block the calling thread until the job reaches a final status
        (True) or ``timeout_s`` passes (False; also for a job that does not
        exist), holding no database connection meanwhile (commit or close
        the request's session first). Only ``blocking_waits``' share of the
        process's threads may wait at once: beyond that it raises
        NoWaitingSlot at once."""
        with self.blocking_waits.slot():
            return wait_in_thread_until_finished(self.job_changes, self.sessions, job_id, timeout_s)
