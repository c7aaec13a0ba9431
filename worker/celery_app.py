"""The worker's Celery app, configured from the environment:
``celery -A worker.celery_app worker`` or ``segq worker``."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown

import worker.tasks  # noqa: F401  (registers the tasks on this app)
from segq.db import make_engine, make_session_factory
from segq.queue import (
    SEGMENT_QUEUE,
    enqueue_deliveries,
    enqueue_items,
    make_celery,
    messages_waiting,
)
from segq.settings import Settings
from worker import runtime
from worker.reconciler import PeriodicPass, reconcile
from worker.webhook_delivery import dispatch_due

settings = Settings.from_env()
app = make_celery(
    settings.broker_url,
    broker_folder=settings.broker_folder,
    time_limit_seconds=settings.item_time_limit_seconds,
)


def _consumes_segment_queue() -> bool:
    # None: no -Q given, every queue is consumed.
    consumed = app.amqp.queues.consume_from
    return consumed is None or SEGMENT_QUEUE in consumed


@worker_process_init.connect
def _load_model(**_kwargs: Any) -> None:
    # In each pool process after the fork: CUDA and database connections do
    # not survive a fork, so nothing of the sort is made in the parent. A
    # worker that only delivers webhooks loads no model.
    if _consumes_segment_queue():
        runtime.current()


_passes: list[PeriodicPass] = []


@worker_ready.connect
def _start_passes(**_kwargs: Any) -> None:
    # In the worker's main process, which loads no model. Every worker runs
    # these: an advisory lock makes reconcilers take turns, and dispatchers
    # skip the rows another one has locked.
    sessions = make_session_factory(make_engine(settings.database_url))
    _passes.append(
        PeriodicPass(
            "segq-reconciler",
            lambda: reconcile(
                sessions,
                lambda ids: enqueue_items(app, ids),
                lambda: messages_waiting(app),
                republish_after_seconds=settings.republish_after_seconds,
                max_attempts=settings.max_attempts,
            ),
            interval=settings.reconcile_interval_seconds,
        )
    )
    _passes.append(
        PeriodicPass(
            "segq-webhook-dispatcher",
            lambda: dispatch_due(
                sessions,
                lambda ids: enqueue_deliveries(app, ids),
                republish_after_seconds=settings.republish_after_seconds,
            ),
            interval=settings.webhook_poll_seconds,
        )
    )
    for periodic in _passes:
        periodic.start()


@worker_shutdown.connect
def _stop_passes(**_kwargs: Any) -> None:
    for periodic in _passes:
        periodic.stop()
