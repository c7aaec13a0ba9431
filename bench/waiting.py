"""Many requests waiting on a job at once (``Prefer: wait=N``), against
`segq serve`, Postgres and Redis on this machine.

Starts `segq serve` (no worker: the job stays queued), opens ``--waiters``
connections that each GET the job with ``Prefer: wait=60``, and prints:

- a plain GET of the job at p50 and p99 with the waiters parked, beside the
  same GET measured before they came (same run): the ratio says what the
  waiters cost everyone else;
- the API processes' threads and resident memory, and the database
  connections open, before and with the waiters, and the CPU the API
  uses while they wait;
- once the job is canceled through the API (its change announced on
  Redis), how long until every waiter has its answer.

    make bench-waiting                # = .venv/bin/python bench/waiting.py
    .venv/bin/python bench/waiting.py --waiters 200

The machine is shared and noisy: compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests
from sqlalchemy import text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import PROMPT, Bench, percentile, process_tree_seconds  # noqa: E402
from bench.stack import add_service_arguments  # noqa: E402


def plain_gets(http: requests.Session, url: str, count: int) -> list[float]:
    """Seconds each of ``count`` GETs of the job took, one after another."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        response = http.get(url, timeout=30)
        seconds.append(time.perf_counter() - started)
        response.raise_for_status()
    return seconds


def process_figures(root: int) -> tuple[int, float]:
    """Threads and resident MiB of ``root``'s children (the API processes)."""
    threads, rss_kib = 0, 0
    for child in Path(f"/proc/{root}/task/{root}/children").read_text().split():
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "Threads":
                threads += int(value)
            elif name == "VmRSS":
                rss_kib += int(value.split()[0])
    return threads, rss_kib / 1024


def database_connections(bench: Bench) -> int:
    with bench.sessions() as session:
        return int(
            session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            or 0
        )


async def open_waiter(
    port: int, path: str, key: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with its request sent; the writer is kept, since one
    that is collected closes the connection (the server then drops the wait)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            "Prefer: wait=60\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader) -> tuple[float, str]:
    """When the answer came (perf_counter) and the job's status in it."""
    raw = await reader.read()
    arrived = time.perf_counter()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    return arrived, str(json.loads(body)["status"])


async def measure(args: argparse.Namespace, bench: Bench, server_pid: int) -> None:
    http = bench.http
    [file_id] = bench.upload_images(1)
    job = http.post(
        f"{bench.base}/context/vision/segment", json={"items": [{"fileId": file_id}], **PROMPT}
    ).json()
    job_url = f"{bench.base}/context/vision/segment/{job['jobId']}"
    path = job_url.removeprefix(f"http://127.0.0.1:{bench.port}")

    plain_gets(http, job_url, 20)  # warm both processes' pools and caches
    alone = plain_gets(http, job_url, args.samples)
    threads_alone, rss_alone = process_figures(server_pid)
    connections_alone = database_connections(bench)

    started = time.perf_counter()
    connections = await asyncio.gather(
        *(open_waiter(bench.port, path, bench.key) for _ in range(args.waiters))
    )
    sent = time.perf_counter() - started
    answers = [asyncio.ensure_future(read_answer(reader)) for reader, _ in connections]
    await asyncio.sleep(3)  # every request read and parked
    # CPU the API spends on parked requests (event loop, re-checks), over a
    # quiet stretch of the wait.
    cpu_before = process_tree_seconds(server_pid)
    await asyncio.sleep(args.quiet_seconds)
    parked_cpu = (process_tree_seconds(server_pid) - cpu_before) / args.quiet_seconds
    early = [answer for answer in answers if answer.done()]
    if early:
        raise RuntimeError(f"{len(early)} waiters were answered before the job changed")
    crowded = await asyncio.to_thread(plain_gets, http, job_url, args.samples)
    threads_crowded, rss_crowded = process_figures(server_pid)
    connections_crowded = database_connections(bench)

    canceled = time.perf_counter()
    http.post(f"{job_url}/cancel").raise_for_status()
    results = await asyncio.gather(*answers)
    for _, writer in connections:
        writer.close()
    last = max(arrived for arrived, _ in results) - canceled
    statuses = {status for _, status in results}

    def ms(values: Sequence[float], fraction: float) -> str:
        return f"{percentile(values, fraction) * 1000:7.1f} ms"

    print(f"{args.waiters} waiting requests, {args.api_processes} API processes")
    print(f"  of {args.api_threads} threads each; sent in {sent:.2f} s")
    print(f"plain GET of the job, {args.samples} one after another:")
    print(f"  alone:        p50 {ms(alone, 0.5)}  p99 {ms(alone, 0.99)}")
    print(f"  with waiters: p50 {ms(crowded, 0.5)}  p99 {ms(crowded, 0.99)}")
    ratio = statistics.median(crowded) / statistics.median(alone)
    print(f"  p50 ratio (with / alone): {ratio:.2f}")
    print(f"API threads:           {threads_alone} alone, {threads_crowded} with waiters")
    print(f"API resident memory:   {rss_alone:.0f} MiB alone, {rss_crowded:.0f} MiB with waiters")
    print(
        f"database connections:  {connections_alone} alone, {connections_crowded} with waiters"
        " (all clients of the database, this script's included)"
    )
    print(f"API CPU while they wait: {parked_cpu * 100:.1f} % of one core")
    print(f"every waiter answered {last * 1000:.0f} ms after the cancel; statuses {statuses}")


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="segq-bench-waiting-") as folder:
        bench = Bench(args, Path(folder))
        try:
            with bench.api() as server:
                bench.wait_ready()
                asyncio.run(measure(args, bench, server.pid))
        finally:
            bench.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--waiters", type=int, default=500)
    parser.add_argument("--samples", type=int, default=200, help="plain GETs timed")
    parser.add_argument("--quiet-seconds", type=float, default=10.0)
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--api-threads", type=int, default=4)
    add_service_arguments(parser)
    args = parser.parse_args(argv)
    # What bench/ingest.py's harness reads and this benchmark does not use.
    args.worker_processes, args.client_threads = 1, 1
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
