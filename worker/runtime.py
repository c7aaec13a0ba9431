"""What a worker process holds for its whole life: one engine (the model is
loaded once per process, never per task), one storage client, one
database session factory; and, apart, what webhook delivery needs, so a
worker that only delivers webhooks loads no model."""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from segq.db import make_engine, make_session_factory
from segq.settings import Settings
from segq.storage import ObjectStorage, open_storage
from worker.engines import load_engine, resolve_engine
from worker.engines.base import SegmentationEngine
from worker.pipeline import ImageLimits
from worker.webhook_delivery import DeliveryRules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerRuntime:
    sessions: sessionmaker[Session]
    storage: ObjectStorage
    engine: SegmentationEngine
    lease_seconds: int
    limits: ImageLimits
    max_attempts: int = 5


@dataclass(frozen=True)
class DeliveryRuntime:
    sessions: sessionmaker[Session]
    rules: DeliveryRules


_runtime: WorkerRuntime | None = None
_delivery_runtime: DeliveryRuntime | None = None
_lock = threading.Lock()


@functools.cache
def _sessions_for(database_url: str) -> sessionmaker[Session]:
    """One engine, and so one connection pool, per database and process:
    a process that segments and delivers webhooks shares it between both.
    First used in a pool process, after the fork, never in the parent."""
    return make_session_factory(make_engine(database_url))


def build_runtime(settings: Settings) -> WorkerRuntime:
    choice = resolve_engine(
        settings.model, settings.model_checkpoint, settings.data_dir / "weights"
    )
    engine = load_engine(choice, settings.device)
    log.info("engine %s ready", engine.name)
    return WorkerRuntime(
        sessions=_sessions_for(settings.database_url),
        storage=open_storage(
            settings.storage_url,
            s3_endpoint_url=settings.s3_endpoint_url,
            secret_key=settings.secret_key,
        ),
        engine=engine,
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        limits=ImageLimits(settings.max_image_pixels, settings.fetch_policy()),
    )


def install(runtime: WorkerRuntime | None) -> None:
    """Use ``runtime`` in this process (tests pass theirs; None forgets it)."""
    global _runtime
    _runtime = runtime


def current() -> WorkerRuntime:
    """This process's runtime, built from the environment on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(Settings.from_env())
        return _runtime


def install_delivery(delivery_runtime: DeliveryRuntime | None) -> None:
    """Use ``delivery_runtime`` for webhook deliveries in this process."""
    global _delivery_runtime
    _delivery_runtime = delivery_runtime


def delivery() -> DeliveryRuntime:
    """This process's webhook delivery runtime, built on first use."""
    global _delivery_runtime
    with _lock:
        if _delivery_runtime is None:
            settings = Settings.from_env()
            _delivery_runtime = DeliveryRuntime(
                sessions=_sessions_for(settings.database_url),
                rules=DeliveryRules(settings.webhook_policy(), settings.webhook_retry_delays),
            )
        return _delivery_runtime
