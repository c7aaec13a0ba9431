"""The services an API process builds once and every request uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

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

if TYPE_CHECKING:
    # api/job_waiting.py reaches the services through api/context.py.
    from segq.api.job_event_stream import JobEventFanOut
    from segq.api.job_waiting import JobChangeFeed, WaitingRequests


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
