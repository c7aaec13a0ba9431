"""A segq deployment for a benchmark: a fresh Postgres database with a
project, a Redis database flushed for the run, and `segq serve` / `segq worker`
processes started from this checkout with the run's environment.

The benchmark scripts share it so that each measures its own question, not
how to boot segq.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import create_engine, text

from segq.cli.demo import wait_ready
from segq.db import make_engine, make_session_factory
from segq.projects import create_project
from segq.schema_migrations import upgrade_to_head

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """--postgres and --redis: where a bench's deployment keeps its jobs and
    messages (SEGQ_BENCH_POSTGRES_URL and SEGQ_BENCH_REDIS_URL by default)."""
    parser.add_argument(
        "--postgres", default=os.environ.get("SEGQ_BENCH_POSTGRES_URL", DEFAULT_POSTGRES)
    )
    parser.add_argument("--redis", default=os.environ.get("SEGQ_BENCH_REDIS_URL", DEFAULT_REDIS))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Stack:
    def __init__(
        self,
        args: Any,
        workdir: Path,
        environment: dict[str, str] | None = None,
        repo: Path = REPO,
    ) -> None:
        """``args`` carries postgres, redis, api_processes, api_threads and
        worker_processes; ``environment`` overrides segq's settings;
        ``repo``: the checkout whose code the processes run (another
        commit's, to compare; its schema must be this one's)."""
        self.args = args
        self.repo = repo
        self.workdir = workdir
        self.database = f"segq_bench_{uuid.uuid4().hex[:8]}"
        admin_url = args.postgres
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.database}"'))
        self.database_url = admin_url.rsplit("/", 1)[0] + f"/{self.database}"
        engine = make_engine(self.database_url)
        upgrade_to_head(engine)
        self.sessions = make_session_factory(engine)
        with self.sessions.begin() as session:
            _, self.key = create_project(session, "bench")
        redis.Redis.from_url(args.redis).flushdb()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/api/v1/projects/bench"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(repo),
            "SEGQ_DATA_DIR": str(workdir / "data"),
            "SEGQ_DATABASE_URL": self.database_url,
            "SEGQ_BROKER_URL": args.redis,
            "SEGQ_STORAGE_URL": (workdir / "objects").as_uri(),
            "SEGQ_MODEL": "benchmark_fixed_mask",
            **(environment or {}),
            "SEGQ_RATE_LIMIT_PER_SECOND": "1000000",
            "SEGQ_MAX_UNFINISHED_JOBS": "1000000",
        }
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.key}"

    def close(self) -> None:
        self.sessions.kw["bind"].dispose()
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{self.database}" WITH (FORCE)'))
        self.admin.dispose()

    @contextmanager
    def process(self, *arguments: str) -> Iterator[subprocess.Popen[bytes]]:
        log = (self.workdir / f"{arguments[0]}.log").open("ab")
        child = subprocess.Popen(
            [sys.executable, "-m", "segq.cli.main", *arguments],
            env=self.env,
            cwd=self.repo,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield child
        finally:
            child.terminate()
            child.wait(timeout=60)
            log.close()

    def api(self) -> Any:
        return self.process(
            "serve",
            "--port",
            str(self.port),
            "--workers",
            str(self.args.api_processes),
            "--threads",
            str(self.args.api_threads),
        )

    def workers(self) -> Any:
        return self.process(
            "worker", f"--concurrency={self.args.worker_processes}", "--loglevel=WARNING"
        )

    def wait_ready(self) -> None:
        wait_ready(f"http://127.0.0.1:{self.port}", timeout=60)
