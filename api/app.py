"""The segq HTTP API: a Flask app factory. Never imports the worker or torch."""

from __future__ import annotations

import logging
import time
import uuid

from celery import Celery
from flask import Flask, Response, g, request

from segq.api.content_encoding import inflate_request_body
from segq.api.context import close_db
from segq.api.error_envelope import register_error_handlers
from segq.api.files import file_uploads, files
from segq.api.health_routes import service
from segq.api.job_event_stream import JobEventFanOut
from segq.api.job_views import job_views
from segq.api.job_waiting import JobChangeFeed, WaitingRequests, blocking_wait_slots
from segq.api.jobs import jobs
from segq.api.json_body import max_job_body_bytes
from segq.api.openapi import register_api_explorer
from segq.api.peers.livepeer import livepeer
from segq.api.peers.moondream import moondream
from segq.api.peers.openai_chat import OPENAI_PREFIX, openai_chat
from segq.api.peers.replicate import REPLICATE_PREFIX, replicate
from segq.api.rate_limit import make_rate_limiter
from segq.api.request_integers import IdConverter
from segq.api.request_paths import MergedSlashes
from segq.api.response_policies import apply_response_policies
from segq.api.service_container import Services
from segq.api.signed_links import SignedLinks
from segq.api.token import token
from segq.api.webhooks import webhooks
from segq.db import make_engine, make_session_factory
from segq.job_changes import make_announcer, pubsub_url
from segq.logs import bind_context, reset_context
from segq.queue import make_celery
from segq.settings import Settings
from segq.storage import ObjectStorage, open_storage

log = logging.getLogger(__name__)
#: One line per request, in JSON mode (SEGQ_LOG_FORMAT=json).
access_log = logging.getLogger("segq.access")

# Room for the multipart framing around the largest allowed file.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def max_request_bytes(settings: Settings) -> int:
    """The largest body any route reads, for the HTTP server's own bound: an
    upload with its multipart framing, or a job body with an inline image."""
    return max(
        settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        max_job_body_bytes(settings.max_upload_bytes),
    )


def create_app(
    settings: Settings | None = None,
    *,
    storage: ObjectStorage | None = None,
    celery: Celery | None = None,
    request_threads: int | None = None,
) -> Flask:
    """Build the app. Everything it talks to comes from ``settings`` unless
    given (tests pass their own storage or Celery app). ``request_threads``:
    how many threads of this process run requests (`segq serve` says), of
    which half at most may block waiting for jobs."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    # Routes that read more (a job body with an inline image) raise it.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    sessions = make_session_factory(make_engine(settings.database_url))
    job_changes = JobChangeFeed(
        sessions, pubsub_url(settings.broker_url), settings.wait_recheck_seconds
    )
    storage = storage or open_storage(
        settings.storage_url,
        s3_endpoint_url=settings.s3_endpoint_url,
        secret_key=settings.secret_key,
    )
    app.extensions["segq"] = Services(
        settings=settings,
        sessions=sessions,
        storage=storage,
        celery=celery
        or make_celery(
            settings.broker_url,
            broker_folder=settings.broker_folder,
            time_limit_seconds=settings.item_time_limit_seconds,
        ),
        rate_limiter=make_rate_limiter(settings.broker_url, settings.rate_limit_per_second),
        job_changes=job_changes,
        job_events=JobEventFanOut(sessions, job_changes),
        job_announcer=make_announcer(settings.broker_url),
        waiting_requests=WaitingRequests(
            settings.max_waiting_requests, blocking_wait_slots(request_threads)
        ),
        signed_links=SignedLinks(
            storage,
            public_url=settings.public_url,
            expires_seconds=settings.url_expires_seconds,
            window_seconds=settings.url_signing_window_seconds,
        ),
    )
    app.url_map.converters["id"] = IdConverter
    # Replicate's client reads its own problem documents for unknown routes
    # under /v1/ (Moondream's one route there keeps its own shape).
    # The longer prefix first: the first that a path starts with answers it.
    register_error_handlers(
        app,
        unknown_routes={OPENAI_PREFIX: openai_chat.name, REPLICATE_PREFIX: replicate.name},
    )
    app.register_blueprint(service)
    app.register_blueprint(files)
    app.register_blueprint(file_uploads)
    app.register_blueprint(jobs)
    app.register_blueprint(job_views)
    app.register_blueprint(webhooks)
    app.register_blueprint(token)
    app.register_blueprint(livepeer)
    app.register_blueprint(moondream)
    app.register_blueprint(replicate)
    app.register_blueprint(openai_chat)
    register_api_explorer(app)
    app.teardown_appcontext(close_db)
    app.after_request(apply_response_policies)
    app.wsgi_app = MergedSlashes(app.wsgi_app)  # type: ignore[method-assign]

    @app.before_request
    def _request_id() -> None:
        incoming = request.headers.get("X-Request-Id", "")
        # Keep a caller's id only if it is short and printable: it goes into logs.
        g.request_id = (
            incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else (uuid.uuid4().hex)
        )
        g.request_started = time.monotonic()
        # The project the URL names (api/auth.py took it from the route's
        # values), and the job, for routes of one job.
        job_id = (request.view_args or {}).get("job_id")
        g.log_context = bind_context(
            request_id=g.request_id,
            project=g.get("project_name"),
            job_id=job_id if isinstance(job_id, int) else None,
        )

    @app.teardown_request
    def _log_request(_exc: BaseException | None = None) -> None:
        token = g.pop("log_context", None)
        if token is not None:
            reset_context(token)

    @app.before_request
    def _inflate_body() -> None:
        # Before anything reads the body, so every bound counts inflated bytes.
        inflate_request_body(request.environ)

    @app.after_request
    def _tag_response(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id") or uuid.uuid4().hex
        if settings.log_format == "json":
            # waitress writes no access log; in JSON mode the app does, one line a request.
            started = g.get("request_started")
            access_log.info(
                "%s %s %s",
                request.method,
                request.path,
                response.status_code,
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "duration_ms": (
                        None if started is None else round((time.monotonic() - started) * 1000, 1)
                    ),
                },
            )
        return response

    return app
