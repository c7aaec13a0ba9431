"""Requests that lock several files take their row locks in one order (by
id), whatever order they name the files in: concurrent updates naming the
same files in opposite orders, and jobs pinning those files meanwhile, wait
for each other instead of deadlocking in Postgres (a deadlock is a 503)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from segq.models import JobItem, StoredFile
from tests.support.images import png_bytes
from tests.support.tenants import Tenant

FILES = 4
UPDATES = 40
JOBS = 20


def _named(n: int, file_ids: list[int]) -> list[dict[str, Any]]:
    """The files, in id order for even n and the other way for odd n, each
    by id or by externalId in turn: every lookup path takes its locks."""
    order = file_ids if n % 2 == 0 else file_ids[::-1]
    return [
        {"id": file_id} if (n + position) % 2 == 0 else {"externalId": f"f{file_id}"}
        for position, file_id in enumerate(order)
    ]


def test_opposite_order_updates_and_jobs_all_succeed_as_if_serial(
    app: Flask, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    file_ids = [tenant.upload(png_bytes(seed=i)).json["id"] for i in range(FILES)]
    for file_id in file_ids:
        set_id = {"id": file_id, "update": {"externalId": {"set": f"f{file_id}"}}}
        response = tenant.client.post(
            tenant.url("/files/update"), json={"items": [set_id]}, headers=tenant.headers
        )
        assert response.status_code == 200, response.json
    start = threading.Barrier(UPDATES + JOBS)

    def update(n: int) -> int:
        items = [
            {**named, "update": {"metadata": {"add": {f"update-{n}": str(n)}}}}
            for named in _named(n, file_ids)
        ]
        client = app.test_client()
        start.wait()
        response = client.post(
            tenant.url("/files/update"), json={"items": items}, headers=tenant.headers
        )
        return int(response.status_code)

    def job(n: int) -> int:
        items = [
            {"fileId": named["id"]} if "id" in named else {"fileExternalId": named["externalId"]}
            for named in _named(n, file_ids)
        ]
        client = app.test_client()
        start.wait()
        response = client.post(
            tenant.url("/context/vision/segment"),
            json={"items": items, "points": [{"x": 0.5, "y": 0.5}]},
            headers=tenant.headers,
        )
        return int(response.status_code)

    with ThreadPoolExecutor(UPDATES + JOBS) as pool:
        updates = [pool.submit(update, n) for n in range(UPDATES)]
        jobs = [pool.submit(job, n) for n in range(JOBS)]
        update_statuses = [future.result() for future in updates]
        job_statuses = [future.result() for future in jobs]
    assert update_statuses == [200] * UPDATES
    assert job_statuses == [200] * JOBS

    # As if one after the other: every update's key on every file, and every
    # job's items on the files it named, in the order it named them.
    with sessions() as session:
        for stored in session.scalars(select(StoredFile)):
            assert stored.file_metadata == {f"update-{n}": str(n) for n in range(UPDATES)}
        items = list(session.scalars(select(JobItem).order_by(JobItem.job_id, JobItem.position)))
    assert len(items) == JOBS * FILES
    orders = {
        tuple(item.file_id for item in items[i : i + FILES]) for i in range(0, len(items), FILES)
    }
    assert orders == {tuple(file_ids), tuple(file_ids[::-1])}
