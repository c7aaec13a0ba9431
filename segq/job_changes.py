"""Announcing that a job changed (it started, an item finished, it ended):
a wake-up call on a Redis pub/sub channel for the API processes that hold
requests waiting on the job (api/job_waiting.py).

Like the broker's messages, an announcement carries only the job's id and
may be lost (Redis restarts, a process dies between its commit and the
announcement): waiters read the job's state from Postgres, and look again
at intervals whatever they hear. An announcement is sent only after the
change is committed, so whoever it wakes finds the change.
"""

from __future__ import annotations

import logging
from typing import Protocol

import redis

log = logging.getLogger(__name__)

#: The pub/sub channel; a message's data is the job's id in decimal.
JOB_CHANGES_CHANNEL = "segq:job-changes"


class JobChangeAnnouncer(Protocol):
    def announce(self, job_id: int) -> None:
        """Tell the waiters of ``job_id`` to look at it again; never raises."""
        ...


class RedisJobChangeAnnouncer:
    def __init__(self, url: str) -> None:
        # Short timeouts: announcing happens on a worker's path after each
        # item, and a lost announcement costs a waiter one re-check interval.
        self._redis = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)

    def announce(self, job_id: int) -> None:
        try:
            self._redis.publish(JOB_CHANGES_CHANNEL, str(job_id))
        except redis.RedisError as exc:
            log.warning("could not announce a change of job %s: %s", job_id, exc)


class SilentJobChangeAnnouncer:
    """Where there is no Redis (the embedded default): waiters only re-check."""

    def announce(self, job_id: int) -> None:
        return None


def pubsub_url(broker_url: str) -> str | None:
    """The Redis that carries announcements: the broker's, when it is Redis."""
    return broker_url if broker_url.startswith(("redis://", "rediss://")) else None


def make_announcer(broker_url: str) -> JobChangeAnnouncer:
    url = pubsub_url(broker_url)
    return SilentJobChangeAnnouncer() if url is None else RedisJobChangeAnnouncer(url)
