"""A Python client of segq's HTTP API: synchronous, on requests.

    client = SegqClient("http://localhost:8080", "acme", api_key)
    image = client.upload("photo.jpg")
    job = client.create_job({"items": [{"fileId": image["id"]}], "points": [...]})
    job = client.wait(job["jobId"])
    mask = client.mask_array(job["items"][0]["segments"][0])  # bool (H, W)

Jobs and files are the JSON documents of the contract (dicts, camelCase keys).
Answers 429 and 503 are retried as their ``Retry-After`` says; every job
creation carries an ``Idempotency-Key``, so a retried POST never makes a
second job."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np
import numpy.typing as npt
import requests
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

#: What an image to upload may be: a path, encoded JPEG/PNG bytes, or a PIL image.
ImageSource = str | Path | bytes | Image.Image

#: Statuses that mean "not now": retried after the answer's Retry-After.
RETRIED_STATUSES = (429, 503)
#: Job statuses after which nothing changes.
FINISHED_STATUSES = frozenset({"Completed", "Failed", "Canceled"})
#: The most seconds one request asks the server to hold it (``Prefer: wait``).
MAX_PREFER_WAIT_SECONDS = 60
#: Answers to job GETs kept (with their ETags) to ask again conditionally.
KEPT_JOB_ANSWERS = 16


class SegqError(RuntimeError):
    """segq answered with an error: ``status`` and the envelope's message."""

    def __init__(self, status: int, message: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.body: Mapping[str, Any] = body or {}


class WaitTimeout(RuntimeError):
    """The job had not finished when the caller stopped waiting."""

    def __init__(self, job: Mapping[str, Any], waited: float) -> None:
        super().__init__(f"job {job['jobId']} is still {job['status']} after {waited:.0f} s")
        self.job = job


def is_finished(job: Mapping[str, Any]) -> bool:
    return job["status"] in FINISHED_STATUSES


class SegqClient:
    """One project of one segq server, reached with one API key."""

    def __init__(
        self,
        base_url: str,
        project: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retries: int = 5,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.project = project
        self.timeout = timeout
        self._http = requests.Session()
        self._http.headers["Authorization"] = f"Bearer {api_key}"
        # urllib3 retries 429/503 after their Retry-After (for POST too: a
        # job POST carries its Idempotency-Key, an upload of the same bytes
        # makes at worst a second file). Connection errors are not retried
        # here: a POST may have been received.
        retry = Retry(
            total=retries,
            connect=0,
            read=0,
            status=retries,
            status_forcelist=RETRIED_STATUSES,
            allowed_methods=None,
            respect_retry_after_header=True,
            backoff_factor=0.5,
            raise_on_status=False,
        )
        adapter = HTTPAdapter(max_retries=retry)
        self._http.mount("http://", adapter)
        self._http.mount("https://", adapter)
        # Pre-signed URLs carry their own authorization; they are fetched
        # without the API key, which must not travel to storage.
        self._plain = requests.Session()
        self._plain.mount("http://", adapter)
        self._plain.mount("https://", adapter)
        # (path, query) -> (ETag, body) of the latest answers to job GETs:
        # asked again with If-None-Match, an unchanged job answers 304 and
        # sends nothing.
        self._job_answers: OrderedDict[tuple[str, str], tuple[str, bytes]] = OrderedDict()

    def close(self) -> None:
        self._http.close()
        self._plain.close()

    def __enter__(self) -> SegqClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------

    def url(self, path: str) -> str:
        """The absolute URL of a route under this project."""
        return f"{self.base_url}/api/v1/projects/{self.project}{path}"

    def absolute(self, url: str) -> str:
        """``url`` as segq handed it out (local storage and the viewer hand
        out links relative to the API's root when no public URL is set)."""
        return urljoin(self.base_url + "/", url.lstrip("/")) if url.startswith("/") else url

    def _request(
        self, method: str, path: str, *, waiting: int = 0, **kwargs: Any
    ) -> requests.Response:
        """``waiting``: the seconds the server may hold the answer (Prefer:
        wait), added to the read timeout so a long wait is not cut off."""
        response = self._http.request(
            method, self.url(path), timeout=self.timeout + waiting, **kwargs
        )
        if not response.ok:
            raise _error_of(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self._request(method, path, **kwargs).json()
        return body

    # -- files -----------------------------------------------------------

    def upload(
        self, image: ImageSource, *, external_id: str | None = None, name: str | None = None
    ) -> dict[str, Any]:
        """Upload a JPEG or PNG (a path, its bytes, or a PIL image, sent as
        PNG) and answer the file's document."""
        data, default_name = _encoded(image)
        fields = {
            key: value
            for key, value in (("externalId", external_id), ("name", name))
            if value is not None
        }
        return self._json(
            "POST", "/files", files={"file": (name or default_name, data)}, data=fields
        )

    def file_by_external_id(self, external_id: str) -> dict[str, Any] | None:
        found = self._json("GET", "/files", params={"externalId": external_id})["items"]
        return found[0] if found else None

    # -- jobs ------------------------------------------------------------

    def create_job(
        self,
        body: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        wait: float | None = None,
    ) -> dict[str, Any]:
        """POST a segmentation job (the contract's body). Without a key a
        random one is sent, so the retries of this call are one job; give
        your own to make a repeated call (another process, a rerun) answer
        the first job. ``wait``: seconds the server may hold the answer
        until the job finishes (``Prefer: wait``; servers without it answer
        at once)."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        waiting = 0 if wait is None else _prefer_seconds(wait)
        if wait is not None:
            headers["Prefer"] = f"wait={waiting}"
        return self._json(
            "POST", "/context/vision/segment", json=dict(body), headers=headers, waiting=waiting
        )

    def _get_job(
        self,
        job_id: int,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        waiting: int = 0,
    ) -> tuple[dict[str, Any], requests.Response]:
        """GET the job, conditionally when an answer to the same GET is
        kept: a 304 reuses the kept body."""
        path = f"/context/vision/segment/{job_id}"
        place = (path, json.dumps(params or {}, sort_keys=True))
        kept = self._job_answers.get(place)
        sent = dict(headers or {})
        if kept is not None:
            sent["If-None-Match"] = kept[0]
        response = self._request("GET", path, params=params, headers=sent, waiting=waiting)
        if response.status_code == 304 and kept is not None:
            self._job_answers.move_to_end(place)
            body = kept[1]
        else:
            body = response.content
            tag = response.headers.get("ETag")
            if tag:
                self._job_answers[place] = (tag, body)
                self._job_answers.move_to_end(place)
                while len(self._job_answers) > KEPT_JOB_ANSWERS:
                    self._job_answers.popitem(last=False)
        job: dict[str, Any] = json.loads(body)
        return job, response

    def get_job(
        self, job_id: int, *, items_limit: int | None = None, items_cursor: str | None = None
    ) -> dict[str, Any]:
        """The job; with ``items_limit`` or ``items_cursor``, a page of its
        items (``nextItemsCursor`` leads to the next), the whole job's state
        and progress on each. Asked again, an unchanged job costs a 304."""
        params: dict[str, Any] = {}
        if items_limit is not None:
            params["itemsLimit"] = items_limit
        if items_cursor is not None:
            params["itemsCursor"] = items_cursor
        return self._get_job(job_id, params)[0]

    def job_items(self, job_id: int, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Each page of the job's items in turn (``items`` and
        ``failedItems`` of its part), fetched as the iteration goes."""
        cursor: str | None = None
        while True:
            page = self.get_job(job_id, items_limit=page_size, items_cursor=cursor)
            yield page
            cursor = page.get("nextItemsCursor")
            if not cursor:
                return

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        return self._json("POST", f"/context/vision/segment/{job_id}/cancel")

    def jobs(
        self, *, status: str | None = None, created_after: int | None = None, page_size: int = 100
    ) -> Iterator[dict[str, Any]]:
        """Every job of the project, newest first (summaries: state and
        progress), fetched a page at a time as the iteration goes."""
        params: dict[str, Any] = {"limit": page_size}
        if status is not None:
            params["status"] = status
        if created_after is not None:
            params["createdAfter"] = created_after
        while True:
            page = self._json("GET", "/context/vision/segment", params=params)
            yield from page["items"]
            if not page.get("nextCursor"):
                return
            params["cursor"] = page["nextCursor"]

    def wait(self, job_id: int, *, timeout: float = 300.0) -> dict[str, Any]:
        """The job once it has finished; WaitTimeout after ``timeout`` seconds.

        Each GET asks the server to hold it until the job finishes
        (``Prefer: wait``); an answer without ``Preference-Applied`` comes
        from a server that does not wait, and the job is polled as its
        ``Retry-After`` says."""
        started = time.monotonic()
        while True:
            left = timeout - (time.monotonic() - started)
            waiting = _prefer_seconds(left) if left >= 1 else 0
            headers = {"Prefer": f"wait={waiting}"} if waiting else {}
            job, response = self._get_job(job_id, headers=headers, waiting=waiting)
            if is_finished(job):
                return job
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                raise WaitTimeout(job, timeout)
            if "Preference-Applied" not in response.headers:
                time.sleep(min(_retry_after(response), left))

    def view_url(self, job: Mapping[str, Any]) -> str:
        """The absolute link to the job's viewer page (signed: opens in a
        browser without the API key)."""
        return self.absolute(str(job["viewUrl"]))

    # -- results ---------------------------------------------------------

    def download(self, url: str) -> bytes:
        """The object behind a pre-signed URL (a mask, logits)."""
        response = self._plain.get(self.absolute(url), timeout=self.timeout)
        if not response.ok:
            raise SegqError(response.status_code, f"fetching {url}")
        return response.content

    def mask_image(self, segment: Mapping[str, Any]) -> Image.Image:
        """The segment's mask as a PIL image, mode "L": 255 object, 0 background."""
        image = Image.open(io.BytesIO(self.download(segment["mask"]["url"])))
        return image.convert("L")

    def mask_array(self, segment: Mapping[str, Any]) -> npt.NDArray[np.bool_]:
        """The segment's mask as a (height, width) bool array, True on the object."""
        return np.asarray(self.mask_image(segment)) > 127


def _encoded(image: ImageSource) -> tuple[bytes, str]:
    """The bytes to upload and a file name for them."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "image.png"
    if isinstance(image, bytes):
        return image, "image"
    path = Path(image)
    return path.read_bytes(), path.name


def _prefer_seconds(seconds: float) -> int:
    return max(1, min(MAX_PREFER_WAIT_SECONDS, int(seconds)))


def _retry_after(response: requests.Response, default: float = 1.0) -> float:
    try:
        return max(0.1, float(response.headers.get("Retry-After", default)))
    except ValueError:
        return default


def _error_of(response: requests.Response) -> SegqError:
    try:
        body = response.json()
        message = str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        body, message = None, response.text[:200] or response.reason
    return SegqError(response.status_code, message, body if isinstance(body, dict) else None)
