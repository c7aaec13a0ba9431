"""Reloads and stops of `segq serve`'s processes drop no connection: a live
server on Postgres and Redis, clients in threads, three SIGHUP reloads and
a SIGTERM of every serving process in turn (gunicorn replaces each)."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import requests
from sqlalchemy.orm import Session, sessionmaker

from segq.client import SegqClient
from segq.projects import create_project
from segq.settings import Settings
from segq.storage import S3Storage
from tests.support.images import png_bytes, scene_prompt_body
from tests.support.live_processes import REPO, segq_env, stop_process, wait_until_healthy
from tests.support.services import free_port

pytestmark = pytest.mark.slow

#: Clients of each kind, each in its own thread.
SEGQ_CLIENTS = 3
PLAIN_CLIENTS = 4
RELOADS = 3
#: The drain's bound in the server under test (production's is 30 s).
GRACE_SECONDS = 20


def serving_pids(arbiter: subprocess.Popen[bytes]) -> set[int]:
    """gunicorn's worker processes: the arbiter's children."""
    found = subprocess.run(
        ["pgrep", "-P", str(arbiter.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    return {int(pid) for pid in found}


def wait_for(condition: Callable[[set[int]], bool], arbiter: subprocess.Popen[bytes]) -> None:
    """Until ``condition`` holds of the serving processes (30 s at most)."""
    give_up = time.monotonic() + 30
    while not condition(serving_pids(arbiter)):
        assert time.monotonic() < give_up, f"the serving processes stayed {serving_pids(arbiter)}"
        time.sleep(0.05)


def replaced(stopped: int, others: set[int], serving: set[int]) -> bool:
    return stopped not in serving and len(serving - others) == 1


@pytest.fixture
def server(
    settings: Settings, storage: S3Storage, celery_app: object, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "segq.cli.main",
                "serve",
                "--port",
                str(port),
                "--workers",
                "2",
                "--threads",
                "8",
            ],
            env={
                **segq_env(settings, storage, tmp_path / "data"),
                "SEGQ_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
            },
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log, timeout=60)
        yield url, process
    finally:
        stop_process(process)


def test_reloads_and_a_rolling_stop_drop_no_request(
    server: tuple[str, subprocess.Popen[bytes]], sessions: sessionmaker[Session]
) -> None:
    url, arbiter = server
    with sessions.begin() as session:
        _, api_key = create_project(session, "acme")
    with SegqClient(url, "acme", api_key) as setup:
        file_id = setup.upload(png_bytes())["id"]
    body = scene_prompt_body(file_id)
    port = int(url.rsplit(":", 1)[1])

    stop = threading.Event()
    errors: list[str] = []
    answered = {"segq": 0, "plain": 0}
    lock = threading.Lock()

    def segq_client() -> None:
        # Keep-alive connections, as any requests.Session keeps them.
        with SegqClient(url, "acme", api_key, timeout=30) as client:
            while not stop.is_set():
                try:
                    job = client.create_job(body)
                    client.get_job(job["jobId"])
                except Exception as exc:
                    with lock:
                        errors.append(f"segq.client: {exc!r}")
                    return
                with lock:
                    answered["segq"] += 2

    def plain_client() -> None:
        # A connection per request, retried only when it is refused: every
        # connection the server accepted must be answered, whole.
        while not stop.is_set():
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                connection.request("GET", "/healthz", headers={"Connection": "close"})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"answered {response.status}")
            except ConnectionRefusedError:
                time.sleep(0.05)
                continue
            except Exception as exc:
                with lock:
                    errors.append(f"plain: {exc!r}")
                return
            finally:
                connection.close()
            with lock:
                answered["plain"] += 1
            # Busy, not flat out: the machine runs the server too.
            time.sleep(0.005)

    threads = [threading.Thread(target=segq_client) for _ in range(SEGQ_CLIENTS)]
    threads += [threading.Thread(target=plain_client) for _ in range(PLAIN_CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(RELOADS):
            before = serving_pids(arbiter)
            arbiter.send_signal(signal.SIGHUP)
            # The old processes go once the new ones are forked; the new ones
            # then build the app and serve.
            wait_for(before.isdisjoint, arbiter)
            time.sleep(1.5)
        for pid in sorted(serving_pids(arbiter)):
            others = serving_pids(arbiter) - {pid}
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            # Gone, and replaced by one new process.
            wait_for(partial(replaced, pid, others), arbiter)
            time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    print(f"answered through {RELOADS} reloads and a rolling stop: {answered}")
    assert errors == [], (errors, answered)
    # The clients were busy throughout, not idle at the moments that count.
    assert answered["segq"] >= 50 and answered["plain"] >= 200, answered


def test_a_stopping_process_answers_its_waits_and_ends_its_streams(
    server: tuple[str, subprocess.Popen[bytes]], sessions: sessionmaker[Session]
) -> None:
    """A request parked for up to 60 s would outlast the drain's bound: the
    drain answers it with the job as it is, and ends an event stream (its
    client reconnects), well within the clients' 15 s read timeout."""
    url, arbiter = server
    with sessions.begin() as session:
        _, api_key = create_project(session, "acme")
    with SegqClient(url, "acme", api_key) as client:
        file_id = client.upload(png_bytes())["id"]
        job_id = client.create_job(scene_prompt_body(file_id))["jobId"]  # no worker: Queued
    headers = {"Authorization": f"Bearer {api_key}"}
    job_url = f"{url}/api/v1/projects/acme/context/vision/segment/{job_id}"
    answers: dict[str, requests.Response] = {}

    def wait() -> None:
        prefer = {**headers, "Prefer": "wait=60"}
        answers["wait"] = requests.get(job_url, headers=prefer, timeout=15)

    waiting = threading.Thread(target=wait)
    waiting.start()
    with requests.get(f"{job_url}/events", headers=headers, stream=True, timeout=15) as stream:
        frames = stream.iter_content(chunk_size=None)
        assert b"retry:" in next(frames)  # the stream is open, and parked
        time.sleep(0.5)  # the wait, sent first, is parked by now too
        arbiter.send_signal(signal.SIGHUP)
        # The stream ends, whole (a read timeout or a reset would raise).
        for _ in frames:
            pass
    waiting.join(timeout=30)
    assert answers["wait"].status_code == 200
    assert answers["wait"].json()["status"] == "Queued"
    assert answers["wait"].headers["Connection"] == "close"
