"""What a worker process holds for its whole life, kept on its Celery app
as the API keeps its services on the Flask app: for segmenting, one engine
(the model is loaded once per process, never per task), one storage client
and the database's session factory; and, apart, what webhook delivery
needs, so a worker that only delivers webhooks loads no model.

``worker.celery_app`` builds it from the worker's settings in each process
that runs tasks, after the fork; a test attaches one of its own."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from segq.job_changes import JobChangeAnnouncer, SilentJobChangeAnnouncer, make_announcer
from segq.settings import DEFAULT_DEPENDENCY_OUTAGE_SECONDS, Settings
from segq.storage import ObjectStorage, open_storage
from segq.worker.dependency_breaker import DependencyBreaker
from segq.worker.engines import load_engine, resolve_engine
from segq.worker.engines.base import SegmentationEngine
from segq.worker.engines.embedding_cache import EmbeddingCache
from segq.worker.engines.encoder_options import EncoderOptions, Precision
from segq.worker.heartbeat import WorkerHeartbeat
from segq.worker.item_inputs import ImageLimits
from segq.worker.webhook_delivery import DeliveryRules

log = logging.getLogger(__name__)

#: The attribute of the Celery app that holds its runtime in this process.
_APP_ATTRIBUTE = "segq_runtime"


@dataclass(frozen=True)
class SegmentRuntime:
    """What ``segment_item`` runs an item with."""

    sessions: sessionmaker[Session]
    storage: ObjectStorage
    engine: SegmentationEngine
    lease_seconds: int
    limits: ImageLimits
    max_attempts: int = 5
    #: Wakes the API's requests that wait on a job (segq/job_changes.py).
    job_changes: JobChangeAnnouncer = field(default_factory=SilentJobChangeAnnouncer)
    #: How long an item waits for others to share its encoder batch (an
    #: engine that batches images only: worker.pipeline).
    batch_wait_ms: int = 0
    #: Open while storage is down: the process takes no items meanwhile.
    #: None: a breaker around ``storage`` with the default bound, telling nobody.
    breaker: DependencyBreaker | None = None
    #: Renews this process's row for the API (segq/worker_processes.py).
    heartbeat: WorkerHeartbeat | None = None
    #: Open while the database is down: the process takes no items, and
    #: items cannot fail meanwhile (their rows are out of reach).
    database_breaker: DependencyBreaker = field(init=False)

    def stop(self) -> None:
        """The process stops: its row goes (a clean stop leaves nothing to explain)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def __post_init__(self) -> None:
        if self.breaker is None:
            object.__setattr__(
                self,
                "breaker",
                storage_breaker(self.storage, DEFAULT_DEPENDENCY_OUTAGE_SECONDS),
            )
        sessions = self.sessions

        def ping() -> None:
            with sessions() as session:
                session.execute(text("SELECT 1"))

        object.__setattr__(
            self,
            "database_breaker",
            DependencyBreaker(
                "the database",
                ping,
                outage_seconds=DEFAULT_DEPENDENCY_OUTAGE_SECONDS,
                fails_waiting_items=False,
            ),
        )

    @property
    def storage_breaker(self) -> DependencyBreaker:
        assert self.breaker is not None  # set in __post_init__
        return self.breaker


def storage_breaker(
    storage: ObjectStorage, outage_seconds: int, heartbeat: WorkerHeartbeat | None = None
) -> DependencyBreaker:
    """The breaker a segmenting process keeps around its storage, probing it
    as /readyz does; ``heartbeat`` records its pauses where the API reads them."""
    return DependencyBreaker(
        "storage",
        storage.check,
        outage_seconds=outage_seconds,
        on_change=None if heartbeat is None else heartbeat.paused,
    )


@dataclass(frozen=True)
class DeliveryRuntime:
    """What ``deliver_webhook`` makes an attempt with."""

    sessions: sessionmaker[Session]
    rules: DeliveryRules


@dataclass(frozen=True)
class WorkerRuntime:
    #: None in a process that serves no segment queue: no model is loaded.
    segment: SegmentRuntime | None = None
    #: None only where a test runs no deliveries.
    delivery: DeliveryRuntime | None = None


def build_runtime(
    settings: Settings, sessions: sessionmaker[Session], *, segments: bool
) -> WorkerRuntime:
    """The runtime of one process; ``segments``: load the engine. Both parts
    share ``sessions``, so a process has one connection pool per database."""
    segment = None
    if segments:
        choice = resolve_engine(
            settings.model, settings.model_checkpoint, settings.data_dir / "weights"
        )
        storage = open_storage(
            settings.storage_url,
            s3_endpoint_url=settings.s3_endpoint_url,
            secret_key=settings.secret_key,
        )
        embeddings = EmbeddingCache(
            storage,
            max_bytes=settings.embedding_cache_mb * 1024 * 1024,
            ttl_seconds=settings.embedding_ttl_seconds,
        )
        engine = load_engine(
            choice,
            settings.device,
            embeddings,
            EncoderOptions(
                precision=Precision(settings.precision),
                batch_size=settings.engine_batch,
                compile=settings.compile_encoder,
            ),
        )
        log.info("engine %s ready", engine.name)
        heartbeat = WorkerHeartbeat(sessions, engine.name)
        heartbeat.start()
        segment = SegmentRuntime(
            sessions=sessions,
            storage=storage,
            engine=engine,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            limits=ImageLimits(settings.max_image_pixels, settings.fetch_policy()),
            job_changes=make_announcer(settings.broker_url),
            batch_wait_ms=settings.engine_batch_wait_ms,
            breaker=storage_breaker(storage, settings.dependency_outage_seconds, heartbeat),
            heartbeat=heartbeat,
        )
    delivery = DeliveryRuntime(
        sessions=sessions,
        rules=DeliveryRules(settings.webhook_policy(), settings.webhook_retry_delays),
    )
    return WorkerRuntime(segment=segment, delivery=delivery)


def attach_runtime(app: Celery, runtime: WorkerRuntime | None) -> None:
    """Run ``app``'s tasks in this process with ``runtime`` (None detaches it)."""
    setattr(app, _APP_ATTRIBUTE, runtime)


def runtime_of(app: Celery) -> WorkerRuntime | None:
    found: WorkerRuntime | None = getattr(app, _APP_ATTRIBUTE, None)
    return found


def segment_runtime_of(app: Celery) -> SegmentRuntime:
    runtime = runtime_of(app)
    if runtime is None or runtime.segment is None:
        raise RuntimeError("this worker process has no runtime for segmenting items")
    return runtime.segment


def delivery_runtime_of(app: Celery) -> DeliveryRuntime:
    runtime = runtime_of(app)
    if runtime is None or runtime.delivery is None:
        raise RuntimeError("this worker process has no runtime for delivering webhooks")
    return runtime.delivery
