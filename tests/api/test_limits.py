"""429s: a per-key request rate (counted in Redis) and a per-project bound on unfinished jobs."""

from __future__ import annotations

import time
from dataclasses import replace

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from segq.api.app import create_app
from segq.api.parking import RESUMED_ENVIRON_KEY
from segq.api.rate_limit import LocalRateLimiter, RedisRateLimiter
from segq.settings import Settings
from segq.storage import S3Storage
from tests.support.database import count_jobs
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.services import REDIS_URL
from tests.support.tenants import make_tenant


def test_requests_over_the_key_rate_get_429(
    settings: Settings, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> None:
    app = create_app(replace(settings, rate_limit_per_second=5), storage=storage, celery=celery_app)
    assert isinstance(app.extensions["segq"].rate_limiter, RedisRateLimiter)
    tenant = make_tenant(app.test_client(), sessions, "acme")
    other = make_tenant(app.test_client(), sessions, "globex")
    # Start at the top of a second so the window does not roll over mid-burst.
    time.sleep(1 - time.time() % 1)
    statuses = [
        tenant.client.get(tenant.url("/files"), headers=tenant.headers).status_code
        for _ in range(8)
    ]
    assert statuses[:5] == [200] * 5
    assert statuses[5:] == [429] * 3
    limited = tenant.client.get(tenant.url("/files"), headers=tenant.headers)
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"
    assert limited.json["error"]["code"] == 429
    # Another key has its own budget.
    assert other.client.get(other.url("/files"), headers=other.headers).status_code == 200
    time.sleep(1.1)
    assert tenant.client.get(tenant.url("/files"), headers=tenant.headers).status_code == 200
    # Counted in Redis, where every API process sees the same count, in
    # windows that expire by themselves.
    counts = redis.Redis.from_url(REDIS_URL)
    windows = counts.keys("segq:rate:*")
    assert windows
    # PTTL is -1 for a key without expiry (-2 if it expired meanwhile).
    assert all(counts.pttl(window) != -1 for window in windows)


def test_a_parked_requests_later_runs_are_not_counted_again(
    settings: Settings, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> None:
    """A request parked by `segq serve` (Prefer: wait, event streams) runs
    the app again when it wakes: the same request, counted once, so a POST
    that created its job is never answered 429 (api/parking.py)."""
    app = create_app(replace(settings, rate_limit_per_second=1), storage=storage, celery=celery_app)
    tenant = make_tenant(app.test_client(), sessions, "acme")
    time.sleep(1 - time.time() % 1)
    assert tenant.client.get(tenant.url("/files"), headers=tenant.headers).status_code == 200
    assert tenant.client.get(tenant.url("/files"), headers=tenant.headers).status_code == 429
    resumed = tenant.client.get(
        tenant.url("/files"), headers=tenant.headers, environ_overrides={RESUMED_ENVIRON_KEY: 1}
    )
    assert resumed.status_code == 200


def test_local_limiter_counts_per_second() -> None:
    limiter = LocalRateLimiter(2)
    time.sleep(1 - time.time() % 1)
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b")


def test_unfinished_jobs_are_bounded_per_project(
    settings: Settings, sessions: sessionmaker[Session], storage: S3Storage, celery_app: Celery
) -> None:
    app = create_app(replace(settings, max_unfinished_jobs=2), storage=storage, celery=celery_app)
    tenant = make_tenant(app.test_client(), sessions, "acme")
    other = make_tenant(app.test_client(), sessions, "globex")
    file_id = tenant.upload(png_bytes()).json["id"]
    assert [tenant.post_job(scene_prompt_body(file_id)).status_code for _ in range(2)] == [200, 200]
    refused = tenant.post_job(scene_prompt_body(file_id))
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert "unfinished" in refused.json["error"]["message"]
    assert count_jobs(sessions) == (2, 2)
    other_file = other.upload(png_bytes()).json["id"]
    assert other.post_job(scene_prompt_body(other_file)).status_code == 200
    # Once one finishes there is room again.
    first = tenant.client.post(
        tenant.url("/context/vision/segment/1/cancel"), headers=tenant.headers
    )
    assert first.status_code == 200
    assert tenant.post_job(scene_prompt_body(file_id)).status_code == 200
