"""Ingestion throughput and per-item overhead, against Postgres and Redis.

Runs `segq serve` and `segq worker` processes with the
benchmark-only engine (a fixed mask: no model cost), submits items through the
HTTP API, and prints:

- items accepted per second, for jobs of 500 items and for jobs of 1 item
  (workers stopped, so only the API is measured);
- items finished per second while workers drain that backlog;
- per-item overhead at p50 and p99 with idle workers: from the job's creation
  (before the API commits) to the item's completion, which is queue wait plus
  pipeline time outside the engine;
- beside them, this machine's bare Celery round trip of an empty task over the
  same Redis, measured in the same run, so the figures read as ratios;
- what one accepted 1-item job costs in CPU, for the whole machine and for the
  API's processes (Linux /proc): the ceiling on jobs per second is the cores
  divided by that.

    make bench-ingest                 # = .venv/bin/python bench/ingest.py
    .venv/bin/python bench/ingest.py --items 2000 --single-jobs 500   # quicker

The machine is shared and noisy: compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery
from celery.contrib.testing.worker import start_worker
from PIL import Image
from sqlalchemy import func, select

from segq.models import ItemStatus, Job, JobItem

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.stack import Stack, add_service_arguments

PROMPT = {"boundingBox": {"xMin": 0.2, "yMin": 0.2, "xMax": 0.8, "yMax": 0.8}}


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Bench(Stack):
    """The stack with the benchmark-only engine, and what this benchmark asks of it."""

    def upload_images(self, count: int) -> list[int]:
        def upload(seed: int) -> int:
            pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            response = self.http.post(
                f"{self.base}/files", files={"file": ("i.png", buffer.getvalue())}
            )
            response.raise_for_status()
            return int(response.json()["id"])

        with ThreadPoolExecutor(self.args.client_threads) as pool:
            return list(pool.map(upload, range(count)))

    def submit(self, bodies: list[dict[str, Any]]) -> float:
        """POST every body from client threads; seconds taken."""

        def post(body: dict[str, Any]) -> None:
            response = self.http.post(f"{self.base}/context/vision/segment", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

        started = time.perf_counter()
        with ThreadPoolExecutor(self.args.client_threads) as pool:
            list(pool.map(post, bodies))
        return time.perf_counter() - started

    def unfinished(self) -> int:
        with self.sessions() as session:
            return (
                session.scalar(
                    select(func.count())
                    .select_from(JobItem)
                    .where(JobItem.status.in_([ItemStatus.QUEUED, ItemStatus.RUNNING]))
                )
                or 0
            )

    def drain(self, since_job: int) -> float:
        """Wait until every item is finished; seconds from the first item's
        start to the last one's finish (the workers' boot is not counted)."""
        while self.unfinished():
            time.sleep(0.2)
        with self.sessions() as session:
            first, last = session.execute(
                select(func.min(JobItem.started_time), func.max(JobItem.finished_time))
                .join(Job, Job.id == JobItem.job_id)
                .where(Job.id > since_job)
            ).one()
        if first is None or last is None:
            raise RuntimeError("no item ran")
        return float(last - first) / 1000

    def overheads(self, since_job: int) -> list[float]:
        """Seconds from job creation to item completion, for jobs after ``since_job``."""
        with self.sessions() as session:
            rows = session.execute(
                select(JobItem.finished_time - Job.created_time)
                .join(Job, Job.id == JobItem.job_id)
                .where(Job.id > since_job, JobItem.status == ItemStatus.COMPLETED)
            ).scalars()
            return [value / 1000 for value in rows if value is not None]

    def last_job(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.max(Job.id))) or 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float | None:
    """CPU seconds every core has spent busy since boot; None off Linux."""
    try:
        first_line = Path("/proc/stat").read_text().split("\n", 1)[0]
    except OSError:
        return None
    # user nice system idle iowait irq softirq (guest time is in user). Not
    # steal: time the hypervisor gave to other machines, not spent here.
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(value) for value in first_line.split()[1:8]
    )
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def process_tree_seconds(root: int) -> float:
    """CPU seconds used so far by process ``root`` and its live descendants."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The fields after the command name, which may hold spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    tree = {root}
    grew = True
    while grew:
        grown = tree | {pid for pid, parent in parents.items() if parent in tree}
        grew, tree = len(grown) > len(tree), grown
    return sum(used.get(pid, 0.0) for pid in tree)


def celery_round_trips(redis_url: str, count: int) -> list[float]:
    """An empty task sent and its result read back, one at a time, through a
    solo worker on the same Redis: the floor any Celery pipeline stands on."""
    app = Celery("bench", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(task_default_queue="bench.noop", worker_prefetch_multiplier=1)

    @app.task(name="bench.noop")  # type: ignore[untyped-decorator]
    def noop() -> None:
        return None

    times = []
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        for _ in range(count):
            started = time.perf_counter()
            noop.delay().get(timeout=10)
            times.append(time.perf_counter() - started)
    return times


def sequential_overheads(bench: Bench, ids: list[int], count: int) -> list[float]:
    """Idle workers, one 1-item job at a time, each waited for."""
    since = bench.last_job()
    for index in range(count):
        bench.submit([{"items": [{"fileId": ids[index % len(ids)]}], **PROMPT}])
        while bench.unfinished():
            time.sleep(0.002)
    return bench.overheads(since)


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="segq-bench-") as workdir:
        bench = Bench(args, Path(workdir))
        try:
            with bench.api() as api:
                bench.wait_ready()
                ids = bench.upload_images(args.job_size)
                jobs = [
                    {"items": [{"fileId": i} for i in ids], **PROMPT}
                    for _ in range(max(1, args.items // args.job_size))
                ]
                big_items = len(jobs) * args.job_size
                before_big = bench.last_job()
                big_seconds = bench.submit(jobs)
                with bench.workers():
                    big_drain = bench.drain(before_big)
                singles = [
                    {"items": [{"fileId": ids[n % len(ids)]}], **PROMPT}
                    for n in range(args.single_jobs)
                ]
                before_singles = bench.last_job()
                busy_before, api_before = machine_busy_seconds(), process_tree_seconds(api.pid)
                single_seconds = bench.submit(singles)
                busy_after, api_after = machine_busy_seconds(), process_tree_seconds(api.pid)
                with bench.workers():
                    single_drain = bench.drain(before_singles)
                    time.sleep(2)  # workers settle before latency is measured
                    overhead = sequential_overheads(bench, ids, args.latency_samples)
        finally:
            bench.close()
    trips = celery_round_trips(args.redis, args.latency_samples)
    bare = statistics.median(trips)
    p50, p99 = statistics.median(overhead), percentile(overhead, 0.99)
    size = args.job_size
    rows = [
        (
            f"accepted, {size}-item jobs",
            f"{big_items / big_seconds:.0f} items/s",
            f"{big_items} items in {big_seconds:.1f} s",
        ),
        (
            "accepted, 1-item jobs",
            f"{args.single_jobs / single_seconds:.0f} jobs/s",
            f"{args.single_jobs} jobs in {single_seconds:.1f} s",
        ),
        (
            f"finished, {size}-item jobs",
            f"{big_items / big_drain:.0f} items/s",
            f"first start to last finish {big_drain:.1f} s",
        ),
        (
            "finished, 1-item jobs",
            f"{args.single_jobs / single_drain:.0f} items/s",
            f"first start to last finish {single_drain:.1f} s",
        ),
        (
            "bare Celery round trip",
            f"p50 {bare * 1000:.1f} ms",
            f"p99 {percentile(trips, 0.99) * 1000:.1f} ms",
        ),
        (
            "per-item overhead",
            f"p50 {p50 * 1000:.1f} ms",
            f"p99 {p99 * 1000:.1f} ms; p50 is {p50 / bare:.1f}x the bare round trip",
        ),
    ]
    if busy_before is not None and busy_after is not None:
        machine_ms = (busy_after - busy_before) / args.single_jobs * 1000
        api_ms = (api_after - api_before) / args.single_jobs * 1000
        cores = os.cpu_count() or 1
        rows.append(
            (
                "CPU per 1-item job",
                f"{machine_ms:.1f} ms",
                f"whole machine; API processes {api_ms:.1f} ms; "
                f"{cores} cores allow {cores * 1000 / machine_ms:.0f} jobs/s at that cost",
            )
        )
    print(
        f"{os.cpu_count()} cores; API {args.api_processes} processes x {args.api_threads} threads, "
        f"worker concurrency {args.worker_processes}, {args.client_threads} client threads"
    )
    for name, figure, detail in rows:
        print(f"{name:<26} {figure:>16}   ({detail})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=10_000, help="items in large jobs")
    parser.add_argument("--job-size", type=int, default=500)
    parser.add_argument("--single-jobs", type=int, default=10_000, help="1-item jobs")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--api-threads", type=int, default=8)
    parser.add_argument("--worker-processes", type=int, default=2)
    parser.add_argument("--client-threads", type=int, default=16)
    add_service_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
