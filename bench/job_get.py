"""What a GET of a finished 1,000-item job costs, before and after the
answers were spliced from stored renderings, in the same run.

Builds, on Postgres and S3 (moto's server on loopback), a job of
``--items`` items (160x120 images, one smooth elliptical mask each, the
default outputs: polygons and a PNG mask), each finished through the
worker's own code (encode_result stores the mask, finish_item completes
the item and stores its rendering). Then times, in this process through the
Flask app (routing, the key check, the database, rendering; not the socket):

- before: the answer as segq wrote it until now, the whole job rendered
  as a dict, every link signed, validated against JobResponse, serialized;
- after: GET of the job as it answers now (links signed once per window,
  so the first GET of a window is timed apart);
- a conditional GET that answers 304, and a page of 100 items.

    make bench-job-get               # = .venv/bin/python bench/job_get.py
    .venv/bin/python bench/job_get.py --items 200 --rounds 5

The machine is shared and noisy: compare ratios of one run, not figures of two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import percentile  # noqa: E402
from bench.stack import add_service_arguments  # noqa: E402


def smooth_mask(index: int, width: int = 160, height: int = 120) -> np.ndarray[Any, Any]:
    """An ellipse that differs a little from item to item."""
    rows, columns = np.mgrid[0:height, 0:width]
    a, b = 40 + index % 17, 30 + index % 11
    inside = ((columns - width / 2) / a) ** 2 + ((rows - height / 2) / b) ** 2 <= 1
    return np.asarray(inside, dtype=bool)


def timed(run: Callable[[], Any], rounds: int) -> list[float]:
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20, help="GETs timed of each kind")
    add_service_arguments(parser)
    args = parser.parse_args()

    import logging

    import boto3
    from moto.server import ThreadedMotoServer
    from sqlalchemy import create_engine, text

    from bench.stack import free_port
    from segq.api.answers import json_document
    from segq.api.app import create_app
    from segq.api.job_items import items_of
    from segq.api.job_views import view_links
    from segq.api.public_links import public_link
    from segq.api.schemas import JobResponse
    from segq.clock import now_ms
    from segq.db import make_engine, make_session_factory
    from segq.job_document import render_job
    from segq.models import Job, JobItem
    from segq.projects import create_project
    from segq.schema_migrations import upgrade_to_head
    from segq.settings import Settings
    from segq.storage import S3Storage
    from segq.worker.claims import claim_item, finish_item
    from segq.worker.engines.base import Candidate
    from segq.worker.results import encode_result

    # moto's server logs each request it serves.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{moto_port}"
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    storage = S3Storage("bench", endpoint_url=endpoint)

    database = f"segq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{database}"'))
    database_url = args.postgres.rsplit("/", 1)[0] + f"/{database}"
    engine = make_engine(database_url)
    try:
        upgrade_to_head(engine)
        sessions = make_session_factory(engine)
        with sessions.begin() as session:
            project, key = create_project(session, "bench")
            project_id = project.id
            now = now_ms()
            job = Job(
                project_id=project_id,
                status="Queued",
                created_time=now,
                status_time=now,
                prompt={"points": [{"x": 0.5, "y": 0.5, "label": 1}], "boundingBox": None},
                options={"multimaskOutput": False},
                webhook=None,
            )
            session.add(job)
            session.flush()
            job_id = job.id
            session.add_all(
                JobItem(
                    job_id=job_id,
                    position=position,
                    file_ref={"fileId": position + 1},
                    status="Queued",
                    attempt=0,
                )
                for position in range(args.items)
            )
        with sessions() as session:
            item_ids = list(
                session.scalars(
                    text("SELECT id FROM job_items WHERE job_id = :j ORDER BY position"),
                    {"j": job_id},
                )
            )
        started = time.perf_counter()
        vertices = 0
        for position, item_id in enumerate(item_ids):
            claim = claim_item(
                sessions, item_id, lease_seconds=600, engine_name="grabcut", max_attempts=3
            )
            assert claim is not None
            candidate = Candidate(mask=smooth_mask(position), score=0.9, logits=None)
            result = encode_result(claim, [(0, [candidate])], storage, 160, 120)
            vertices += sum(
                len(ring["vertices"]) for s in result["segments"] for ring in s["polygons"]
            )
            assert finish_item(sessions, claim, result=result)
        print(
            f"{args.items} items finished through the worker's code in "
            f"{time.perf_counter() - started:.1f} s; {vertices / args.items:.0f} polygon "
            "vertices an item on average"
        )

        with tempfile.TemporaryDirectory() as data:
            base = Settings.from_env({"SEGQ_DATA_DIR": data})
            settings = replace(
                base,
                database_url=database_url,
                broker_url=args.redis,
                storage_url="s3://bench",
                s3_endpoint_url=endpoint,
                rate_limit_per_second=1_000_000,
            )
            app = create_app(settings, storage=storage)
            client = app.test_client()
            headers = {"Authorization": f"Bearer {key}"}
            path = f"/api/v1/projects/bench/context/vision/segment/{job_id}"

            def before() -> bytes:
                """The answer as api/jobs.py wrote it before this change."""
                expires_in = settings.url_expires_seconds

                def link_mask(key: str) -> tuple[str, int]:
                    expires_time = (now_ms() // 1000 + expires_in) * 1000
                    url = storage.presigned_get_url(key, expires_in)
                    return public_link(settings.public_url, url), expires_time

                with app.test_request_context(), sessions() as session:
                    job = session.get(Job, job_id)
                    assert job is not None
                    document = render_job(job, items_of(session, job), link_mask)
                    document["viewUrl"] = view_links().page_url("bench", project_id, job_id)
                    return bytes(json_document(JobResponse, document).get_data())

            def after(query: str = "", **extra: str) -> Any:
                response = client.get(path + query, headers={**headers, **extra})
                assert response.status_code in (200, 304), response.status_code
                return response

            links = app.extensions["segq"].signed_links
            body = after().get_data()
            old_body = before()
            print(
                f"answer: {len(body) / 1e6:.2f} MB now, {len(old_body) / 1e6:.2f} MB before "
                "(the same but for the links' signatures and expiry)"
            )
            rounds = args.rounds
            old = timed(before, max(3, rounds // 4))

            answers = app.extensions["segq"].job_answers

            def first_of_window() -> None:
                links._kept.clear()  # as when a window begins: every link signed
                answers._kept.clear()
                app.extensions["segq"].item_texts._kept.clear()  # kept by window too
                after()

            def rendered(query: str = "") -> Callable[[], None]:
                def run() -> None:
                    answers._kept.clear()  # as after a change: the answer spliced again
                    after(query)

                return run

            def unkept() -> None:
                # As after a change before finished items' texts were kept:
                # every item read from the database and its links filled again.
                answers._kept.clear()
                app.extensions["segq"].item_texts._kept.clear()
                after()

            cold = timed(first_of_window, max(3, rounds // 4))
            changed_unkept = timed(unkept, rounds)
            changed = timed(rendered(), rounds)
            warm = timed(after, rounds)
            tag = after().headers["ETag"]
            unchanged = timed(lambda: after(**{"If-None-Match": tag}), rounds)
            page = timed(rendered("?itemsLimit=100"), rounds)

            def line(name: str, seconds: list[float]) -> str:
                p50 = statistics.median(seconds)
                return (
                    f"  {name:<44} p50 {p50 * 1000:8.1f} ms  p95 "
                    f"{percentile(seconds, 95) * 1000:8.1f} ms  "
                    f"(x{statistics.median(old) / p50:,.0f} faster than before)"
                )

            print(f"GET of a finished {args.items}-item job with polygons, Postgres, S3 (moto):")
            print(line("before: render, sign, validate, serialize", old))
            print(line("now: first GET of a signing window", cold))
            print(line("GET after a change, every item read again", changed_unkept))
            print(line("now: GET after a change (items' texts kept)", changed))
            print(line("now: GET of an unchanged job (kept answer)", warm))
            print(line("now: GET with If-None-Match (304)", unchanged))
            print(line("now: a page of 100 items (spliced)", page))
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{database}" WITH (FORCE)'))
        admin.dispose()
        moto.stop()


if __name__ == "__main__":
    main()
