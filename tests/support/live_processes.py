"""segq as users run it, in subprocesses: `segq serve` and `segq worker`
configured through SEGQ_* variables, and the helpers that start, probe and
stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from sqlalchemy.orm import Session, sessionmaker

from segq.db import make_engine, make_session_factory
from segq.projects import create_project
from segq.settings import Settings
from segq.storage import S3Storage
from tests.support.services import REDIS_URL, TEST_BUCKET, free_port

#: The repository, where subprocesses of the tests run.
REPO = Path(__file__).resolve().parents[2]


def segq_env(settings: Settings, storage: S3Storage, data_dir: Path) -> dict[str, str]:
    """The environment of a `segq` subprocess (API or worker) on this test's
    Postgres and Redis (``settings``) and its place in the test bucket
    (``storage``), keeping its own files under ``data_dir``."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SEGQ_DATA_DIR": str(data_dir),
        "SEGQ_DATABASE_URL": settings.database_url,
        "SEGQ_BROKER_URL": settings.broker_url,
        "SEGQ_STORAGE_URL": f"s3://{TEST_BUCKET}/{storage.prefix.rstrip('/')}",
        "SEGQ_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
    }


class Worker:
    """A `segq worker` process: Celery's main process and its pool, with its
    engine probed (tests/support/probed_worker.py)."""

    def __init__(
        self, env: dict[str, str], concurrency: int, log: Path, queues: str = "segment,webhooks"
    ) -> None:
        self.log_path = log
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.probed_worker",
                "worker",
                f"--concurrency={concurrency}",
                f"--queues={queues}",
                "--loglevel=WARNING",
            ],
            env=env,
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def pool_pids(self) -> list[int]:
        found = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [int(pid) for pid in found]

    def kill_pool(self) -> None:
        """SIGKILL the pool processes (Celery's main process forks new ones)."""
        for pid in self.pool_pids():
            # A pool process may exit between pgrep and kill.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        for pid in [*self.pool_pids(), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def wait_until_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 90
) -> None:
    """Until ``process`` (a `segq serve`) answers /healthz at ``url``; fails
    with the end of its ``log`` if it exits or takes over ``timeout`` s."""
    give_up = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < give_up, log.read_text()[-3000:]
        # Connections wait in the backlog while the processes build the app.
        with contextlib.suppress(requests.ConnectionError, requests.Timeout):
            if requests.get(f"{url}/healthz", timeout=2).ok:
                return
        time.sleep(0.2)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not exited within 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def loopback_env(
    folder: Path, database_url: str, s3_endpoint: str, settings: Mapping[str, str]
) -> dict[str, str]:
    """The environment of a `segq` subprocess on the tests' Postgres
    (``database_url``), Redis and moto (a fresh place in the test bucket),
    keeping its files under ``folder``: only ``settings`` added, no SEGQ_*
    variable of this process's own."""
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith("SEGQ_")},
        "PYTHONPATH": str(REPO),
        "SEGQ_DATA_DIR": str(folder / "data"),
        **services_env(database_url, s3_endpoint, folder.name),
        **settings,
    }


def services_env(database_url: str, s3_endpoint: str, prefix: str) -> dict[str, str]:
    """The SEGQ_* variables that put a `segq` process on the tests'
    Postgres, Redis and moto (a fresh place, named from ``prefix``, in the
    test bucket)."""
    return {
        "SEGQ_DATABASE_URL": database_url,
        "SEGQ_BROKER_URL": REDIS_URL,
        "SEGQ_STORAGE_URL": f"s3://{TEST_BUCKET}/{prefix}-{uuid.uuid4().hex[:8]}",
        "SEGQ_S3_ENDPOINT_URL": s3_endpoint,
    }


@dataclass(frozen=True)
class ServedApi:
    """A running `segq serve`: where it answers, its process and log, and
    the environment it was started with."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def served_api(
    env: dict[str, str], folder: Path, *, workers: int, threads: int | None = None
) -> Iterator[ServedApi]:
    """`segq serve` with ``workers`` processes (of ``threads`` threads, or
    its default), started with ``env``, its output in ``folder``/serve.log;
    yielded once it answers /healthz, stopped (SIGTERM) after."""
    port = free_port()
    log = folder / "serve.log"
    threads_option = [] if threads is None else ["--threads", str(threads)]
    with log.open("ab") as output:
        process = subprocess.Popen(
            [
                *[sys.executable, "-m", "segq.cli.main", "serve"],
                *["--port", str(port), "--workers", str(workers), *threads_option],
            ],
            env=env,
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    served = ServedApi(port, process, log, env)
    try:
        wait_until_healthy(served.url, process, log)
        yield served
    finally:
        stop_process(process)


class LiveSegq:
    """`segq serve` and `segq worker` as separate processes, as users run
    them, configured only through ``env`` (the SEGQ_* variables): its root
    URL is ``url``, projects are made in its database with ``new_project``."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = {
            **{name: value for name, value in os.environ.items() if not name.startswith("SEGQ_")},
            "PYTHONPATH": str(REPO),
            "SEGQ_DATA_DIR": str(folder / "data"),
            **env,
        }
        self.folder = folder
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        subprocess.run(
            [sys.executable, "-m", "segq.cli.main", "migrate"],
            env=self.env,
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.api_log = folder / "serve.log"
        with self.api_log.open("ab") as output:
            self.api = subprocess.Popen(
                [sys.executable, "-m", "segq.cli.main", "serve", f"--port={port}", "--workers=1"],
                env=self.env,
                cwd=REPO,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.worker = Worker(self.env, concurrency=1, log=folder / "worker.log")
        wait_until_healthy(self.url, self.api, self.api_log)

    @contextmanager
    def database(self) -> Iterator[sessionmaker[Session]]:
        """Sessions on the deployment's database."""
        from segq.settings import Settings

        engine = make_engine(Settings.from_env(self.env).database_url)
        try:
            yield make_session_factory(engine)
        finally:
            engine.dispose()

    def new_project(self, name: str) -> str:
        """Create project ``name`` in the deployment's database; its API key."""
        with self.database() as sessions, sessions.begin() as session:
            _, key = create_project(session, name)
        return key

    def stop(self) -> None:
        self.worker.stop()
        stop_process(self.api)
