"""Reading a job's items: below both the job service and the job event
stream, which the services container holds."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from segq.models import Job, JobItem


def items_of(session: Session, job: Job) -> list[JobItem]:
    """The job's items, in position order."""
    return list(
        session.scalars(select(JobItem).where(JobItem.job_id == job.id).order_by(JobItem.position))
    )
