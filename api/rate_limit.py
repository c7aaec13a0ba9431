"""Per-key request rate limits: a fixed one-second window per API key,
counted in Redis when the broker is Redis (shared by every API process),
else in this process (the embedded default runs one)."""

from __future__ import annotations

import threading
import time
from typing import Protocol

import redis


class RateLimiter(Protocol):
    def allow(self, key: str) -> bool:
        """Count one request for ``key``; False once it is over the limit this second."""
        ...


#: Count one request in a window's key, which outlives its second by one.
#: A script, so the count and the key's expiry are set in one atomic
#: command and one round trip.
_COUNT_IN_WINDOW = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
    redis.call('EXPIRE', KEYS[1], 2)
end
return count
"""


class RedisRateLimiter:
    def __init__(self, url: str, per_second: int) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._count = self._redis.register_script(_COUNT_IN_WINDOW)
        self.per_second = per_second

    def allow(self, key: str) -> bool:
        window = f"segq:rate:{key}:{int(time.time())}"
        try:
            count = self._count(keys=[window])
        except redis.RedisError:
            # A limiter that cannot count lets requests through: losing the
            # limit for a moment is better than refusing every client.
            return True
        return int(count) <= self.per_second


class LocalRateLimiter:
    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._lock = threading.Lock()
        self._window = 0
        self._counts: dict[str, int] = {}

    def allow(self, key: str) -> bool:
        now = int(time.time())
        with self._lock:
            if now != self._window:
                self._window, self._counts = now, {}
            self._counts[key] = self._counts.get(key, 0) + 1
            return self._counts[key] <= self.per_second


def make_rate_limiter(broker_url: str, per_second: int) -> RateLimiter:
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisRateLimiter(broker_url, per_second)
    return LocalRateLimiter(per_second)
