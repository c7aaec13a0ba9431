"""Calling the API as a tenant: a project with its key on Flask's test
client, and the app served over real HTTP in a thread of this process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import make_server

from segq.projects import create_project


@contextmanager
def serving(app: Flask, port: int = 0) -> Iterator[str]:
    """``app`` served by werkzeug in a thread of this process on ``port`` of
    127.0.0.1 (0: any free one), for clients that need a real server:
    browsers, requests, the CLI, peers' SDKs. Yields its root URL."""
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


class Tenant:
    """A project with its key, and helpers to call the API as it."""

    def __init__(self, client: FlaskClient, name: str, key: str) -> None:
        self.client = client
        self.name = name
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"}

    def url(self, path: str) -> str:
        return f"/api/v1/projects/{self.name}{path}"

    def upload(self, data: bytes, filename: str = "image.png", **fields: str) -> Any:
        from io import BytesIO

        return self.client.post(
            self.url("/files"),
            data={"file": (BytesIO(data), filename), **fields},
            headers=self.headers,
            content_type="multipart/form-data",
        )

    def post_job(self, body: Any, headers: dict[str, str] | None = None) -> Any:
        return self.client.post(
            self.url("/context/vision/segment"),
            json=body,
            headers={**self.headers, **(headers or {})},
        )

    def get_job(self, job_id: int) -> Any:
        return self.client.get(self.url(f"/context/vision/segment/{job_id}"), headers=self.headers)


def make_tenant(client: FlaskClient, sessions: sessionmaker[Session], name: str) -> Tenant:
    with sessions.begin() as session:
        _, key = create_project(session, name)
    return Tenant(client, name, key)
