"""The worker's Celery app: ``create_worker_app(settings)``, run by
``segq worker``; ``celery -A worker.celery_app worker`` finds ``app``, made
from the environment when Celery first asks for it, not at import.

A worker's settings are read once, in its main process. The runtime that
tasks use (``worker.runtime``) is built from them in each process that runs
tasks, after the fork: CUDA and database connections do not survive a
fork, so the main process of a prefork pool makes none of either for its
children. The main process runs the reconciler and the webhook dispatcher.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from typing import Any

from celery import Celery, bootsteps, current_app
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown
from sqlalchemy.orm import Session, sessionmaker

import segq.worker.tasks  # noqa: F401  (registers the tasks on every app)
from segq.db import make_engine, make_session_factory
from segq.file_objects import sweep_orphaned_file_objects
from segq.logs import configure_logging
from segq.queue import (
    SEGMENT_QUEUE,
    enqueue_deliveries,
    enqueue_items,
    make_celery,
    messages_waiting,
)
from segq.settings import Settings
from segq.storage import ObjectStorage, open_storage
from segq.worker.engines.embedding_cache import sweep_expired_embeddings
from segq.worker.heartbeat import record_start_failure
from segq.worker.metrics import RECONCILER_ACTIONS, RETENTION_DELETED, serve_metrics
from segq.worker.periodic import PeriodicPass
from segq.worker.reconciler import Pass, reconcile
from segq.worker.retention import Sweep, sweep_expired
from segq.worker.runtime import attach_runtime, build_runtime, runtime_of
from segq.worker.webhook_delivery import dispatch_due

log = logging.getLogger(__name__)

#: The attribute of a worker's Celery app that holds its settings.
_SETTINGS_ATTRIBUTE = "segq_settings"
#: The attribute that holds the pipe on which pool processes report their start.
_STARTS_ATTRIBUTE = "segq_pool_starts"
#: The longest the main process waits for its pool processes to build their
#: engines (a large model read from a slow disk, compiled) before it gives up.
ENGINE_START_TIMEOUT_SECONDS = 900


class WorkerCannotServe(RuntimeError):
    """The engine could not be built: the worker exits before it consumes
    anything, so an orchestrator shows a crash loop, not a worker that
    takes items it cannot run."""


def create_worker_app(settings: Settings) -> Celery:
    """A Celery app that, run as a worker, builds its runtime from ``settings``."""
    app = make_celery(
        settings.broker_url,
        broker_folder=settings.broker_folder,
        time_limit_seconds=settings.item_time_limit_seconds,
    )
    setattr(app, _SETTINGS_ATTRIBUTE, settings)
    # Made before the pool forks, so each pool process inherits the sending end.
    setattr(app, _STARTS_ATTRIBUTE, multiprocessing.Pipe(duplex=False))
    app.steps["worker"].add(WorkerProcessStep)
    return app


def run_worker(app: Celery, argv: list[str]) -> int:
    """Run ``celery worker`` with ``argv`` until it stops; its exit status,
    which Celery's own entry points drop (a worker whose engine cannot be
    built must exit non-zero, so that an orchestrator shows a crash loop)."""
    statuses: list[int] = []

    def keep_status(sender: Any, **_kwargs: Any) -> None:
        statuses.append(int(getattr(sender, "exitcode", 0) or 0))

    worker_shutdown.connect(keep_status, weak=False)
    try:
        app.worker_main(argv)
    finally:
        worker_shutdown.disconnect(keep_status)
    return max(statuses, default=0)


def settings_of(app: Celery) -> Settings | None:
    """The settings ``app`` was made with; None for an app made elsewhere
    (a test's, the API's), whose runtime its maker attaches."""
    found: Settings | None = getattr(app, _SETTINGS_ATTRIBUTE, None)
    return found


def _sessions(settings: Settings) -> sessionmaker[Session]:
    db_engine = make_engine(settings.database_url)
    return make_session_factory(db_engine)


def _consumes_segment_queue(app: Celery) -> bool:
    # None: no -Q given, every queue is consumed.
    consumed = app.amqp.queues.consume_from
    return consumed is None or SEGMENT_QUEUE in consumed


def _build_runtime_here(app: Celery, settings: Settings, sessions: sessionmaker[Session]) -> None:
    """Build this process's runtime; WorkerCannotServe, recorded where the
    API reads it (a job's waitingFor, /readyz), naming the model and the
    file, when its engine cannot be built."""
    if runtime_of(app) is not None:
        return
    try:
        runtime = build_runtime(settings, sessions, segments=_consumes_segment_queue(app))
    except Exception as exc:
        model = settings.model or "the default engine"
        checkpoint = settings.model_checkpoint or "its default checkpoint"
        message = f"could not build {model} from {checkpoint}: {exc}"[:2000]
        record_start_failure(sessions, settings.model or "default", message)
        raise WorkerCannotServe(message) from exc
    attach_runtime(app, runtime)


def _pool_starts(app: Celery) -> tuple[Connection, Connection] | None:
    found: tuple[Connection, Connection] | None = getattr(app, _STARTS_ATTRIBUTE, None)
    return found


@worker_process_init.connect
def _build_runtime_in_pool_process(**_kwargs: Any) -> None:
    # Sent in each prefork pool process, after the fork, with the worker's
    # app made current there.
    app = current_app._get_current_object()
    settings = settings_of(app)
    if settings is not None:
        if settings.log_format is not None:
            # Celery set up a pool process's logging in its own format.
            configure_logging(settings.log_format)
        failure = None
        try:
            _build_runtime_here(app, settings, _sessions(settings))
        except WorkerCannotServe as exc:
            log.critical("%s", exc)
            failure = str(exc)
        starts = _pool_starts(app)
        if starts is not None:
            # Short: one write under PIPE_BUF, which the kernel keeps whole
            # however many pool processes write at once.
            starts[1].send((os.getpid(), None if failure is None else failure[:800]))


@worker_process_shutdown.connect
def _stop_heartbeat_in_pool_process(**_kwargs: Any) -> None:
    runtime = runtime_of(current_app._get_current_object())
    if runtime is not None and runtime.segment is not None:
        runtime.segment.stop()


def _await_pool_engines(app: Celery, processes: int) -> None:
    """Until each of the pool's ``processes`` has built its engine; raises
    WorkerCannotServe when one could not (before the consumer starts: the
    worker takes no message it cannot run)."""
    starts = _pool_starts(app)
    assert starts is not None
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_SECONDS
    for _ in range(processes):
        if not starts[0].poll(max(0.0, deadline - time.monotonic())):
            raise WorkerCannotServe(
                f"the pool's processes did not build their engines within "
                f"{ENGINE_START_TIMEOUT_SECONDS} s"
            )
        _pid, failure = starts[0].recv()
        if failure is not None:
            raise WorkerCannotServe(failure)


# Celery ships no type information, so its base classes are Any.
class WorkerProcessStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """The worker's main process: once its pool has started, its runtime
    where tasks run in this process (solo, threads), and the passes that
    every worker runs. An advisory lock makes reconcilers take turns, and
    dispatchers skip the rows another one has locked."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._passes: list[PeriodicPass] = []

    def start(self, parent: Any) -> None:
        app: Celery = parent.app
        settings = settings_of(app)
        assert settings is not None
        sessions = _sessions(settings)
        # Before the consumer starts (it is the worker's last step): a worker
        # whose engine cannot be built exits non-zero, having taken nothing.
        if not _forks(parent.pool_cls):
            _build_runtime_here(app, settings, sessions)
        elif _consumes_segment_queue(app):
            _await_pool_engines(app, parent.concurrency)
        if settings.log_format is not None:
            configure_logging(settings.log_format)
        if settings.metrics_port is not None:
            serve_metrics(settings.metrics_port)
        self._passes = [
            PeriodicPass(
                "segq-reconciler",
                lambda: _counted_reconcile(
                    reconcile(
                        sessions,
                        lambda ids: enqueue_items(app, ids),
                        lambda: messages_waiting(app),
                        max_attempts=settings.max_attempts,
                    )
                ),
                interval=settings.reconcile_interval_seconds,
            ),
            PeriodicPass(
                "segq-webhook-dispatcher",
                lambda: dispatch_due(
                    sessions,
                    lambda ids: enqueue_deliveries(app, ids),
                    republish_after_seconds=settings.republish_after_seconds,
                ),
                interval=settings.webhook_poll_seconds,
            ),
        ]
        if _consumes_segment_queue(app):
            self._passes.append(_embedding_sweeper(settings))
            self._passes.append(_orphan_sweeper(settings, sessions))
        if settings.job_retention_days is not None or settings.file_retention_days is not None:
            self._passes.append(_retention_sweeper(settings, sessions))
        for periodic in self._passes:
            periodic.start()

    def stop(self, parent: Any) -> None:
        for periodic in self._passes:
            periodic.stop()
        runtime = runtime_of(parent.app)
        if runtime is not None and runtime.segment is not None:
            # Tasks ran in this process (solo, threads): its row goes with it.
            runtime.segment.stop()

    def terminate(self, parent: Any) -> None:
        self.stop(parent)


#: The sweeper's longest pause: expired embeddings are never used, so this
#: bounds only how long their bytes stay.
EMBEDDING_SWEEP_SECONDS = 3600


def _sweepers_storage(settings: Settings) -> ObjectStorage:
    return open_storage(
        settings.storage_url,
        s3_endpoint_url=settings.s3_endpoint_url,
        secret_key=settings.secret_key,
    )


def _embedding_sweeper(settings: Settings) -> PeriodicPass:
    """Deletes shared embeddings older than their TTL. Every segmenting
    worker sweeps; deleting twice is harmless, and a listing per hour is
    cheap. An S3 lifecycle rule on ``embeddings/`` can do this instead."""
    storage = _sweepers_storage(settings)
    return PeriodicPass(
        "segq-embedding-sweeper",
        lambda: sweep_expired_embeddings(storage, settings.embedding_ttl_seconds),
        interval=min(EMBEDDING_SWEEP_SECONDS, settings.embedding_ttl_seconds),
    )


#: How often segmenting workers sweep files' orphaned objects.
ORPHAN_SWEEP_SECONDS = 3600
#: The youngest an orphan may be to be swept: older than any request that
#: may still commit a row naming it, and the time a multipart upload has to
#: be completed (its upload URLs may live longer: see _orphan_sweeper).
ORPHAN_MIN_AGE_SECONDS = 24 * 3600


def _orphan_sweeper(settings: Settings, sessions: sessionmaker[Session]) -> PeriodicPass:
    """Deletes the objects under files that nothing holds any more
    (segq/file_objects.py). Every segmenting worker sweeps; deleting twice
    is harmless."""
    storage = _sweepers_storage(settings)
    # A part may be PUT as long as its upload URL lives: never sweep it sooner.
    min_age = max(ORPHAN_MIN_AGE_SECONDS, 2 * settings.url_expires_seconds)
    return PeriodicPass(
        "segq-orphan-sweeper",
        lambda: sweep_orphaned_file_objects(sessions, storage, min_age),
        interval=ORPHAN_SWEEP_SECONDS,
    )


def _retention_sweeper(settings: Settings, sessions: sessionmaker[Session]) -> PeriodicPass:
    """Deletes finished jobs and files past their retention (worker/retention.py).
    A thread of its own, not a step of the reconciler's pass: a slow bucket
    must never delay the re-publishing of lost items."""
    storage = _sweepers_storage(settings)
    return PeriodicPass(
        "segq-retention-sweeper",
        lambda: _counted_sweep(
            sweep_expired(
                sessions,
                storage,
                job_retention_days=settings.job_retention_days,
                file_retention_days=settings.file_retention_days,
            )
        ),
        interval=settings.reconcile_interval_seconds,
    )


def _counted_reconcile(done: Pass) -> None:
    RECONCILER_ACTIONS.labels("republished").inc(done.republished)
    RECONCILER_ACTIONS.labels("requeued").inc(done.requeued)
    RECONCILER_ACTIONS.labels("failed").inc(done.failed)


def _counted_sweep(done: Sweep) -> None:
    RETENTION_DELETED.labels("jobs").inc(done.jobs)
    RETENTION_DELETED.labels("files").inc(done.files)
    RETENTION_DELETED.labels("objects").inc(done.objects)


def _forks(pool_cls: Any) -> bool:
    """Whether tasks run in processes forked from this one."""
    return isinstance(pool_cls, type) and issubclass(pool_cls, PreforkPool)


@functools.cache
def _app_from_env() -> Celery:
    return create_worker_app(Settings.from_env())


def __getattr__(name: str) -> Any:
    # ``celery -A worker.celery_app`` looks ``app`` up here.
    if name == "app":
        return _app_from_env()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
