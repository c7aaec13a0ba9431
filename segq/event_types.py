"""The names of a job's events, as webhooks and event streams carry them.
Imports nothing: segq.client (which needs only requests, numpy and Pillow)
reads them too."""

from __future__ import annotations

JOB_STARTED = "job.started"
JOB_COMPLETED = "job.completed"
JOB_FAILED = "job.failed"
JOB_CANCELED = "job.canceled"
ITEM_COMPLETED = "item.completed"
ITEM_FAILED = "item.failed"

EVENT_TYPES = (JOB_STARTED, JOB_COMPLETED, JOB_FAILED, JOB_CANCELED, ITEM_COMPLETED, ITEM_FAILED)
#: The events that end a job: after one of them, its stream ends.
JOB_END_EVENTS = (JOB_COMPLETED, JOB_FAILED, JOB_CANCELED)
