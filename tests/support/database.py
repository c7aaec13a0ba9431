"""What the tests read straight from the database: counts of rows, a job's
items."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from segq.models import Job, JobItem, StoredFile
from tests.support.tenants import Tenant


def item_ids(tenant: Tenant, job_id: int) -> list[int]:
    """The ids of job ``job_id``'s items, in item order."""
    sessions = tenant.client.application.extensions["segq"].sessions
    with sessions() as session:
        return list(
            session.scalars(
                select(JobItem.id).where(JobItem.job_id == job_id).order_by(JobItem.position)
            )
        )


def count_files(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(StoredFile)) or 0


def count_jobs(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with sessions() as session:
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
        items = session.scalar(select(func.count()).select_from(JobItem)) or 0
        return jobs, items
