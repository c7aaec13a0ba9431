"""What a request handler reaches: the services built once per process, and
the database session opened for this one request."""

from __future__ import annotations

from dataclasses import dataclass, field

from celery import Celery
from flask import current_app, g
from sqlalchemy.orm import Session, sessionmaker

from api.process_caches import ProjectsByKey, UnfinishedJobCounts
from api.rate_limit import RateLimiter
from segq.models import Project
from segq.settings import Settings
from segq.storage import ObjectStorage


@dataclass(frozen=True)
class Services:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: ObjectStorage
    celery: Celery
    rate_limiter: RateLimiter
    projects_by_key: ProjectsByKey = field(default_factory=ProjectsByKey)
    unfinished_jobs: UnfinishedJobCounts = field(default_factory=UnfinishedJobCounts)


def services() -> Services:
    found: Services = current_app.extensions["segq"]
    return found


def db() -> Session:
    """This request's session, opened on first use and closed at teardown."""
    if "db" not in g:
        g.db = services().sessions()
    session: Session = g.db
    return session


def close_db(_exc: BaseException | None = None) -> None:
    session: Session | None = g.pop("db", None)
    if session is not None:
        session.close()


def current_project() -> Project:
    project: Project = g.project
    return project
