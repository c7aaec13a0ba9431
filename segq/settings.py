"""The one place segq reads its environment.

With nothing set, segq runs embedded: SQLite, a filesystem broker, local-disk
storage and the classical engine, all under ``SEGQ_DATA_DIR``. Production sets
the URLs to Postgres, Redis and S3.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from segq.fault_points import FAULT_POINTS
from segq.url_guard import FetchPolicy, parse_networks

#: What _parsed reads: an int or a float setting.
Number = TypeVar("Number", int, float)

#: The Standard Webhooks reference schedule: after the first attempt, retries
#: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h later: about 27 hours in all.
DEFAULT_WEBHOOK_RETRY_DELAYS = (5, 300, 1800, 7200, 18000, 36000, 36000)

#: 32 MiB: the shipped API pod (1 GiB) runs 2 processes of 4 request threads;
#: 2 x 150 MiB + 8 x (two copies of a 25 MiB body + 32 MiB) = 956 MiB.
DEFAULT_MAX_DECODE_BYTES = 32 * 1024 * 1024

#: What SEGQ_PRECISION may say.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class SettingsError(ValueError):
    """An environment variable holds a value segq cannot use."""


#: Long enough for an ordinary S3 or MinIO restart, or a rolling upgrade of
#: a MinIO cluster, with room to spare; short enough that a dead bucket is
#: noticed within the hour by the jobs that wait on it.
DEFAULT_DEPENDENCY_OUTAGE_SECONDS = 900


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: str
    storage_url: str
    s3_endpoint_url: str | None
    model: str | None
    model_checkpoint: str | None
    device: str
    secret_key: str
    max_upload_bytes: int
    max_image_pixels: int
    max_items_per_job: int
    #: The most memory checking one upload's image may take (segq/images.py's
    #: check_cost, from its header); an image that would need more gets 413.
    max_decode_bytes: int
    #: The largest answer of Livepeer's route (its masks as JSON text, from
    #: the image's size); a request whose answer could be larger gets 413.
    max_answer_bytes: int
    url_expires_seconds: int
    lease_seconds: int
    item_time_limit_seconds: int
    max_attempts: int
    #: How long items wait for a dependency that is down (storage) before they
    #: fail for it, counted from when the outage began: worker/dependency_breaker.py.
    dependency_outage_seconds: int
    republish_after_seconds: int
    reconcile_interval_seconds: int
    poll_retry_after_seconds: int
    rate_limit_per_second: int
    max_unfinished_jobs: int
    fetch_allowed_networks: str
    fetch_timeout_seconds: int
    webhook_timeout_seconds: int
    webhook_allowed_networks: str
    #: Seconds to wait after each failed delivery attempt; one more attempt
    #: follows each entry, then the delivery is given up.
    webhook_retry_delays: tuple[int, ...]
    webhook_poll_seconds: float
    #: How long the HTTP server waits for a request to arrive whole, headers
    #: and body, from its first byte; also how long an idle connection stays.
    request_deadline_seconds: int
    #: Each worker process's in-memory embedding cache (tier 1), in MiB.
    embedding_cache_mb: int = 512
    #: How long a shared embedding (tier 2, in object storage) is used and
    #: kept: a week.
    embedding_ttl_seconds: int = 7 * 24 * 3600
    #: The API's root as clients reach it (``https://segq.example``), for the
    #: links it hands out to local-disk objects. Never taken from a request.
    public_url: str | None = None
    #: When set, /metrics answers only to ``Authorization: Bearer <token>``.
    metrics_token: str | None = None
    #: How often the API looks at the jobs that requests wait on, in case
    #: the announcement of a change was lost (api/job_waiting.py).
    wait_recheck_seconds: float = 2.0
    #: How long a synchronous peer route (Livepeer's, Moondream's) waits for
    #: its job before answering 504; the job itself runs on.
    peer_wait_seconds: int = 60
    #: How many requests of one API process may wait for a job at once
    #: (``Prefer: wait``, the peers' synchronous routes), parked by the
    #: server, each holding a connection and no thread; beyond it a peer's
    #: call is refused (503) before its job is made, and a Prefer: wait is
    #: answered at once. At most ``segq serve --connections`` are open.
    max_waiting_requests: int = 500
    #: How long a peer's synchronous call repeated as it was (a client's
    #: retry) gets the job the first call made instead of another
    #: (api/peers/synchronous_jobs.py says what counts as the same call).
    peer_retry_window_seconds: int = 300
    #: Test-only (segq/fault_points.py): where this process dies on purpose.
    fault_point: str | None = None
    #: Finished jobs older than this many days are deleted with their masks;
    #: None keeps them forever.
    job_retention_days: int | None = None
    #: Files older than this many days are deleted with their bytes (jobs
    #: that used them keep their results); None keeps them forever.
    file_retention_days: int | None = None
    #: "json" (one object a line, for a log collector) or "text"; None:
    #: text (the deploy files set json).
    log_format: str | None = None
    #: Pre-signed URLs in answers are signed once per window of this many
    #: seconds and reused within it, so an unchanged job answers polls with
    #: the same body (and 304) and signs nothing; a URL handed out stays
    #: valid for at least SEGQ_URL_EXPIRES_SECONDS minus this.
    url_signing_window_seconds: int = 300
    #: Where a worker's main process serves its Prometheus metrics; None: not served.
    metrics_port: int | None = None
    #: Items whose images a worker process encodes as one batch; None: the
    #: device's default (1 on a CPU, 8 on a CUDA GPU).
    engine_batch: int | None = None
    #: How long an item waits for others to share its batch.
    engine_batch_wait_ms: int = 10
    #: One of PRECISIONS (worker/engines/torch_support.py says what each means).
    precision: str = "auto"
    #: torch.compile the image encoder at worker start.
    compile_encoder: bool = False
    #: How long a stopping API process may take to finish the requests it
    #: holds (gunicorn's graceful timeout); deploy/k8s's
    #: terminationGracePeriodSeconds covers it and the preStop pause.
    shutdown_grace_seconds: int = 30

    def fetch_policy(self) -> FetchPolicy:
        """How workers may fetch images from URLs that clients give."""
        return FetchPolicy(
            max_bytes=self.max_upload_bytes,
            timeout_seconds=self.fetch_timeout_seconds,
            allowed_networks=parse_networks(self.fetch_allowed_networks),
        )

    def webhook_policy(self) -> FetchPolicy:
        """How workers may POST to the webhook URLs that clients give: the
        same guard as image URLs, with its own exceptions, and no redirects."""
        return FetchPolicy(
            max_bytes=0,
            timeout_seconds=self.webhook_timeout_seconds,
            max_redirects=0,
            allowed_networks=parse_networks(self.webhook_allowed_networks),
        )

    @property
    def broker_folder(self) -> Path:
        """Where the embedded filesystem broker keeps its messages."""
        return self.data_dir / "broker"

    def __post_init__(self) -> None:
        if self.url_signing_window_seconds * 2 > self.url_expires_seconds:
            raise SettingsError(
                f"SEGQ_URL_SIGNING_WINDOW_SECONDS ({self.url_signing_window_seconds}) must be at "
                f"most half of SEGQ_URL_EXPIRES_SECONDS ({self.url_expires_seconds})"
            )
        # The items a batch claims first hold leases that are renewed only
        # once the batch runs: waiting for company must leave them most of
        # their lease.
        if self.engine_batch_wait_ms * 2 > self.lease_seconds * 1000:
            raise SettingsError(
                f"SEGQ_ENGINE_BATCH_WAIT_MS ({self.engine_batch_wait_ms}) must be at most half "
                f"of SEGQ_LEASE_SECONDS ({self.lease_seconds} s)"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        data_dir = Path(
            env.get("SEGQ_DATA_DIR") or Path.home() / ".local" / "share" / "segq"
        ).expanduser()
        return cls(
            data_dir=data_dir,
            database_url=env.get("SEGQ_DATABASE_URL") or f"sqlite:///{data_dir / 'segq.db'}",
            broker_url=env.get("SEGQ_BROKER_URL") or "filesystem://",
            storage_url=env.get("SEGQ_STORAGE_URL") or (data_dir / "objects").as_uri(),
            s3_endpoint_url=env.get("SEGQ_S3_ENDPOINT_URL") or None,
            model=env.get("SEGQ_MODEL") or None,
            model_checkpoint=env.get("SEGQ_MODEL_CHECKPOINT") or None,
            device=env.get("SEGQ_DEVICE") or "auto",
            secret_key=env.get("SEGQ_SECRET_KEY") or _persistent_secret(data_dir),
            max_upload_bytes=_int(env, "SEGQ_MAX_UPLOAD_BYTES", 25 * 1024 * 1024),
            max_image_pixels=_int(env, "SEGQ_MAX_IMAGE_PIXELS", 40_000_000),
            max_items_per_job=_int(env, "SEGQ_MAX_ITEMS_PER_JOB", 1000),
            max_decode_bytes=_int(env, "SEGQ_MAX_DECODE_BYTES", DEFAULT_MAX_DECODE_BYTES),
            # Three SAM masks as logits for a 1920x1080 image: 150 MiB of
            # JSON; as 0.0/1.0 masks, 11 megapixels.
            max_answer_bytes=_int(env, "SEGQ_MAX_ANSWER_BYTES", 160 * 1024 * 1024),
            url_expires_seconds=_int(env, "SEGQ_URL_EXPIRES_SECONDS", 3600),
            url_signing_window_seconds=_int(env, "SEGQ_URL_SIGNING_WINDOW_SECONDS", 300),
            lease_seconds=_int(env, "SEGQ_LEASE_SECONDS", 60),
            item_time_limit_seconds=_int(env, "SEGQ_ITEM_TIME_LIMIT_SECONDS", 600),
            max_attempts=_int(env, "SEGQ_MAX_ATTEMPTS", 5),
            dependency_outage_seconds=_int(
                env, "SEGQ_DEPENDENCY_OUTAGE_SECONDS", DEFAULT_DEPENDENCY_OUTAGE_SECONDS
            ),
            republish_after_seconds=_int(env, "SEGQ_REPUBLISH_AFTER_SECONDS", 300),
            reconcile_interval_seconds=_int(env, "SEGQ_RECONCILE_INTERVAL_SECONDS", 15),
            poll_retry_after_seconds=_int(env, "SEGQ_POLL_RETRY_AFTER_SECONDS", 1),
            rate_limit_per_second=_int(env, "SEGQ_RATE_LIMIT_PER_SECOND", 1000),
            max_unfinished_jobs=_int(env, "SEGQ_MAX_UNFINISHED_JOBS", 10000),
            fetch_allowed_networks=env.get("SEGQ_FETCH_ALLOWED_NETWORKS", ""),
            fetch_timeout_seconds=_int(env, "SEGQ_FETCH_TIMEOUT_SECONDS", 10),
            webhook_timeout_seconds=_int(env, "SEGQ_WEBHOOK_TIMEOUT_SECONDS", 10),
            webhook_allowed_networks=env.get("SEGQ_WEBHOOK_ALLOWED_NETWORKS", ""),
            webhook_retry_delays=_ints(
                env, "SEGQ_WEBHOOK_RETRY_DELAYS", DEFAULT_WEBHOOK_RETRY_DELAYS
            ),
            webhook_poll_seconds=_float(env, "SEGQ_WEBHOOK_POLL_SECONDS", 1.0),
            embedding_cache_mb=_int(env, "SEGQ_EMBEDDING_CACHE_MB", 512),
            embedding_ttl_seconds=_int(env, "SEGQ_EMBEDDING_TTL_SECONDS", 7 * 24 * 3600),
            public_url=_public_url(env, "SEGQ_PUBLIC_URL"),
            metrics_token=env.get("SEGQ_METRICS_TOKEN") or None,
            peer_wait_seconds=_int(env, "SEGQ_PEER_WAIT_SECONDS", 60),
            max_waiting_requests=_int(env, "SEGQ_MAX_WAITING_REQUESTS", 500),
            peer_retry_window_seconds=_int(env, "SEGQ_PEER_RETRY_WINDOW_SECONDS", 300),
            # Long enough for the largest upload (25 MiB) at about 2 Mbit/s.
            request_deadline_seconds=_int(env, "SEGQ_REQUEST_DEADLINE_SECONDS", 120),
            wait_recheck_seconds=_float(env, "SEGQ_WAIT_RECHECK_SECONDS", 2.0),
            fault_point=_fault_point(env),
            job_retention_days=_optional_int(env, "SEGQ_JOB_RETENTION_DAYS"),
            file_retention_days=_optional_int(env, "SEGQ_FILE_RETENTION_DAYS"),
            log_format=_choice(env, "SEGQ_LOG_FORMAT", ("json", "text")),
            metrics_port=_port(env, "SEGQ_METRICS_PORT"),
            engine_batch=_optional_int(env, "SEGQ_ENGINE_BATCH"),
            engine_batch_wait_ms=_milliseconds(env, "SEGQ_ENGINE_BATCH_WAIT_MS", 10),
            precision=_choice(env, "SEGQ_PRECISION", PRECISIONS) or "auto",
            compile_encoder=_flag(env, "SEGQ_COMPILE"),
            shutdown_grace_seconds=_int(env, "SEGQ_SHUTDOWN_GRACE_SECONDS", 30),
        )


def _parsed(
    env: Mapping[str, str], name: str, parse: Callable[[str], Number], kind: str
) -> Number | None:
    """``name``'s value read by ``parse``, or None when unset. The callers
    check the range, and only of a value set (their defaults are valid)."""
    raw = env.get(name)
    if not raw:
        return None
    try:
        return parse(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {kind}, got {raw!r}") from None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _parsed(env, name, int, "an integer")
    if value is None:
        return default
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    """A positive integer, or None when unset (the feature is off)."""
    return _int(env, name, 0) or None


def _port(env: Mapping[str, str], name: str) -> int | None:
    port = _optional_int(env, name)
    if port is not None and port > 65535:
        raise SettingsError(f"{name} must be a TCP port (1-65535), got {port}")
    return port


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    raw = env.get(name) or None
    if raw is not None and raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _ints(env: Mapping[str, str], name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """A comma-separated list of positive integers."""
    raw = env.get(name)
    if not raw:
        return default
    values = tuple(_int({name: part.strip()}, name, 0) for part in raw.split(","))
    if not values or 0 in values:
        raise SettingsError(f"{name} must be positive integers separated by commas, got {raw!r}")
    return values


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    value = _parsed(env, name, float, "a number")
    if value is None:
        return default
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{name} must be positive, got {env[name]!r}")
    return value


def _milliseconds(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number of milliseconds, 0 allowed, at most a minute."""
    value = _parsed(env, name, int, "an integer")
    if value is None:
        return default
    if not 0 <= value <= 60_000:
        raise SettingsError(f"{name} must be between 0 and 60000, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be 1 or 0, got {raw!r}")


def _public_url(env: Mapping[str, str], name: str) -> str | None:
    """An http(s) root URL without a trailing slash, or None when unset."""
    raw = env.get(name)
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise SettingsError(
            f"{name} must be an http(s) URL such as https://segq.example, got {raw!r}"
        )
    return raw.rstrip("/")


def _fault_point(env: Mapping[str, str]) -> str | None:
    raw = env.get("SEGQ_TEST_FAULT_POINT") or None
    # A misspelt point would leave a test's fault silently unarmed.
    if raw is not None and raw not in FAULT_POINTS:
        raise SettingsError(f"SEGQ_TEST_FAULT_POINT must be one of {sorted(FAULT_POINTS)}")
    return raw


def _persistent_secret(data_dir: Path) -> str:
    """A signing key kept in the data directory, so every process of one
    embedded installation (API, worker, restarts) agrees on it."""
    path = data_dir / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    staged = data_dir / f".secret_key.{os.getpid()}"
    staged.write_text(secrets.token_urlsafe(32))
    staged.chmod(0o600)
    try:
        # link() is atomic and fails if the name exists: when two processes
        # start at once, one key wins and both read it.
        os.link(staged, path)
    except FileExistsError:
        pass
    finally:
        staged.unlink()
    return path.read_text().strip()
