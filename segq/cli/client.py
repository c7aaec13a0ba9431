"""A small client of segq's HTTP API (used by ``segq submit`` and ``segq demo``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from segq.models import JobStatus


class ClientError(RuntimeError):
    pass


@dataclass
class SegqClient:
    base_url: str
    project: str
    api_key: str
    timeout: float = 30.0

    def __post_init__(self) -> None:
        self._http = requests.Session()
        self._http.headers["Authorization"] = f"Bearer {self.api_key}"

    def _url(self, path: str) -> str:
        return f"{self.base_url.rstrip('/')}/api/v1/projects/{self.project}{path}"

    def _json(self, response: requests.Response) -> dict[str, Any]:
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            body = {}
        if not response.ok:
            message = body.get("error", {}).get("message", response.text[:200])
            raise ClientError(f"{response.status_code}: {message}")
        return body

    def upload(self, image: Path, external_id: str | None = None) -> dict[str, Any]:
        with image.open("rb") as handle:
            data = {"externalId": external_id} if external_id else {}
            response = self._http.post(
                self._url("/files"),
                files={"file": (image.name, handle)},
                data=data,
                timeout=self.timeout,
            )
        return self._json(response)

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self._http.post(
            self._url("/context/vision/segment"), json=body, timeout=self.timeout
        )
        return self._json(response)

    def get_job(self, job_id: int) -> dict[str, Any]:
        response = self._http.get(
            self._url(f"/context/vision/segment/{job_id}"), timeout=self.timeout
        )
        return self._json(response)

    def wait(self, job_id: int, *, timeout: float = 300.0) -> dict[str, Any]:
        """Poll until the job finishes, pausing as its Retry-After says."""
        deadline = time.monotonic() + timeout
        while True:
            response = self._http.get(
                self._url(f"/context/vision/segment/{job_id}"), timeout=self.timeout
            )
            job = self._json(response)
            if JobStatus(job["status"]).finished:
                return job
            if time.monotonic() > deadline:
                raise ClientError(f"job {job_id} is still {job['status']} after {timeout:.0f} s")
            time.sleep(min(float(response.headers.get("Retry-After", "1")), 5.0) / 2)

    def download(self, url: str) -> bytes:
        # Pre-signed URLs carry their own authorization: send no API key along.
        response = requests.get(url, timeout=self.timeout)
        if not response.ok:
            raise ClientError(f"{response.status_code} fetching {url}")
        return response.content
