"""Where the tests' loopback services are: Redis (its database from
SEGQ_TEST_REDIS_URL), the S3 bucket, a free port; what waits in the broker."""

from __future__ import annotations

import os
import socket

import redis

REDIS_URL = os.environ.get("SEGQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


TEST_BUCKET = "segq-test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def queued_messages() -> int:
    """Item messages waiting in the broker's segment queue."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.llen("segq.segment"))
    finally:
        client.close()
