"""The worker's Celery app, configured from the environment:
``celery -A worker.celery_app worker`` or ``segq worker``."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init

import worker.tasks  # noqa: F401  (registers the tasks on this app)
from core.queue import make_celery
from core.settings import Settings
from worker import runtime

settings = Settings.from_env()
app = make_celery(
    settings.broker_url, broker_folder=settings.broker_folder, lease_seconds=settings.lease_seconds
)


@worker_process_init.connect
def _load_model(**_kwargs: Any) -> None:
    # In each pool process after the fork: CUDA and database connections do
    # not survive a fork, so nothing of the sort is made in the parent.
    runtime.current()
