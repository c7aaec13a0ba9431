"""The worker's Celery app, configured from the environment:
``celery -A worker.celery_app worker`` or ``segq worker``."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown

import worker.tasks  # noqa: F401  (registers the tasks on this app)
from core.db import make_engine, make_session_factory
from core.queue import enqueue_items, make_celery
from core.settings import Settings
from worker import runtime
from worker.reconciler import ReconcilerThread, reconcile

settings = Settings.from_env()
app = make_celery(
    settings.broker_url,
    broker_folder=settings.broker_folder,
    time_limit_seconds=settings.item_time_limit_seconds,
)


@worker_process_init.connect
def _load_model(**_kwargs: Any) -> None:
    # In each pool process after the fork: CUDA and database connections do
    # not survive a fork, so nothing of the sort is made in the parent.
    runtime.current()


_reconciler: ReconcilerThread | None = None


@worker_ready.connect
def _start_reconciler(**_kwargs: Any) -> None:
    # In the worker's main process, which loads no model: every worker runs
    # one, and an advisory lock makes them take turns.
    global _reconciler
    sessions = make_session_factory(make_engine(settings.database_url))
    _reconciler = ReconcilerThread(
        lambda: reconcile(
            sessions,
            lambda ids: enqueue_items(app, ids),
            republish_after_seconds=settings.republish_after_seconds,
            max_attempts=settings.max_attempts,
        ),
        interval=settings.reconcile_interval_seconds,
    )
    _reconciler.start()


@worker_shutdown.connect
def _stop_reconciler(**_kwargs: Any) -> None:
    if _reconciler is not None:
        _reconciler.stop()
