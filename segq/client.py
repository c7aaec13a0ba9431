"""A Python client of segq's HTTP API: synchronous, on requests.

    client = SegqClient("http://localhost:8080", "acme", api_key)
    image = client.upload("photo.jpg")
    job = client.create_job({"items": [{"fileId": image["id"]}], "points": [...]})
    job = client.wait(job["jobId"])
    mask = client.mask_array(job["items"][0]["segments"][0])  # bool (H, W)
    # Every person and every dog (a server with SEGQ_MODEL=sam3):
    job = client.segment_text([image["id"]], "person", "dog", wait=60)
    people = prompt_segments(job["items"][0], 0)
    for event in client.events(job_id):  # server-sent events, until the job ends
        print(event.type, event.data)

Jobs and files are the JSON documents of the contract (dicts, camelCase keys).
Answers 429 and 503 are retried as their ``Retry-After`` says; every job
creation carries an ``Idempotency-Key``, so a retried POST never makes a
second job. A connection refused or reset (a server restarting, a process
of it stopping) is retried, with capped backoff, for every request that is
safe to repeat: reads, and writes that carry an ``Idempotency-Key``."""

from __future__ import annotations

import io
import json
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict
from urllib.parse import urljoin

import numpy as np
import numpy.typing as npt
import requests
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from segq.event_types import JOB_END_EVENTS

#: What an image to upload may be: a path, encoded JPEG/PNG bytes, or a PIL image.
ImageSource = str | Path | bytes | Image.Image

#: Statuses that mean "not now": retried after the answer's Retry-After.
RETRIED_STATUSES = (429, 503)
#: Job statuses after which nothing changes.
FINISHED_STATUSES = frozenset({"Completed", "Failed", "Canceled"})
#: The most seconds one request asks the server to hold it (``Prefer: wait``).
MAX_PREFER_WAIT_SECONDS = 60
#: Methods whose request may be sent again after a connection error: the
#: server may have received it, and repeating it changes nothing.
REPEATABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The header that makes a write safe to repeat (the server answers a repeat
#: with the first request's result).
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
#: Backoff between retries after a connection error: doubling from the
#: first, at most the cap, each drawn at random from its upper half.
CONNECTION_RETRY_FIRST_SECONDS = 0.25
CONNECTION_RETRY_MAX_SECONDS = 4.0
#: How long to wait before reconnecting to an event stream that ended
#: early, until the stream names its own (its ``retry`` field).
DEFAULT_STREAM_RETRY_SECONDS = 2.0
#: Answers to job GETs kept (with their ETags) to ask again conditionally.
KEPT_JOB_ANSWERS = 16


class ExemplarBox(TypedDict):
    """A box around an example of a text prompt's concept (``label`` 1) or
    of something that is not one (0); normalized like ``boundingBox``."""

    xMin: float
    yMin: float
    xMax: float
    yMax: float
    label: Literal[0, 1]


class TextPrompt(TypedDict):
    """A text prompt: every instance of what ``text`` names (SAM 3), with
    optional exemplar ``boxes``."""

    text: str
    boxes: NotRequired[list[ExemplarBox]]


class TextOptions(TypedDict, total=False):
    """How a job's text prompts keep their instances; what is left out
    takes SAM 3's defaults (the job's GET shows them filled in)."""

    scoreThreshold: float
    maskThreshold: float
    maxSegments: int


#: What names an image in a job: a fileId, or the item as the contract
#: writes it (``{"fileExternalId": …}``, ``{"fileUrl": …}``).
ItemReference = int | Mapping[str, Any]


def text_job_body(
    items: Iterable[ItemReference],
    prompts: Iterable[str | TextPrompt],
    *,
    text_options: TextOptions | None = None,
    outputs: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The job body that finds every instance of each prompt in each item:
    one text prompt per entry of ``prompts`` (a phrase, or a TextPrompt
    with exemplar boxes), their segments' ``promptIndex`` its place there."""
    body: dict[str, Any] = {
        "items": [{"fileId": item} if isinstance(item, int) else dict(item) for item in items],
        "prompts": [
            {"text": prompt} if isinstance(prompt, str) else dict(prompt) for prompt in prompts
        ],
    }
    if text_options is not None:
        body["textOptions"] = dict(text_options)
    if outputs is not None:
        body["outputs"] = list(outputs)
    return body


def prompt_segments(item: Mapping[str, Any], prompt_index: int) -> list[dict[str, Any]]:
    """An item's segments of one prompt (for a text prompt: its instances,
    best first)."""
    return [s for s in item.get("segments") or [] if s.get("promptIndex") == prompt_index]


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


@dataclass(frozen=True)
class JobEvent:
    """One event of a job's stream: what a webhook gets for it."""

    #: Its place in the job's stream, from 1 (``events(after=id)`` resumes there).
    id: int
    #: "job.started", "item.completed", "item.failed", "job.completed", …
    type: str
    #: When it happened, milliseconds since the epoch.
    timestamp: int
    #: The job as GET shows it, without mask URLs; for an item event, the
    #: item, with the job's progress as it was when the item finished.
    data: dict[str, Any]

    @property
    def ends_job(self) -> bool:
        return self.type in JOB_END_EVENTS


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
        self.retries = retries
        self._http = requests.Session()
        self._http.headers["Authorization"] = f"Bearer {api_key}"
        # urllib3 retries 429/503 after their Retry-After (for POST too: a
        # job POST carries its Idempotency-Key, an upload of the same bytes
        # makes at worst a second file). Connection errors are retried in
        # _send, which sees the request's headers: only a request that is
        # safe to repeat, since one that was reset may have been received.
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
        repeatable = kwargs.pop("repeatable", False)
        response = self._send(
            self._http,
            method,
            self.url(path),
            repeatable=repeatable,
            timeout=self.timeout + waiting,
            **kwargs,
        )
        if not response.ok:
            raise _error_of(response)
        return response

    def _send(
        self,
        session: requests.Session,
        method: str,
        url: str,
        *,
        repeatable: bool = False,
        **kwargs: Any,
    ) -> requests.Response:
        """One request, sent again after a refused or reset connection when
        it is safe to repeat (``repeatable``: the caller knows it is, as for
        a cancel): up to ``retries`` times, backing off."""
        headers = kwargs.get("headers") or {}
        repeatable = repeatable or method in REPEATABLE_METHODS or IDEMPOTENCY_KEY_HEADER in headers
        for retry in range(self.retries + 1):
            try:
                return session.request(method, url, **kwargs)
            except requests.ConnectionError:
                if not repeatable or retry == self.retries:
                    raise
            ceiling = min(CONNECTION_RETRY_MAX_SECONDS, CONNECTION_RETRY_FIRST_SECONDS * 2**retry)
            time.sleep(random.uniform(ceiling / 2, ceiling))
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self._request(method, path, **kwargs).json()
        return body

    # -- files -----------------------------------------------------------

    def upload(
        self, image: ImageSource, *, external_id: str | None = None, name: str | None = None
    ) -> dict[str, Any]:
        """Upload a JPEG or PNG (a path, its bytes, or a PIL image, sent as
        PNG) and answer the file's document. The file's ``name`` is
        ``name``, else the path's name, else ``external_id``, else "image"
        (for bytes and PIL images: give them a name)."""
        data, default_name = _encoded(image)
        if default_name is None:
            default_name = external_id or "image"
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

    def files(
        self, *, filter: Mapping[str, Any] | None = None, page_size: int = 100
    ) -> Iterator[dict[str, Any]]:
        """Every file of the project that matches ``filter`` (Cognite's file
        filter, e.g. ``{"mimeType": "image/png"}`` or ``{"uploaded": True}``),
        fetched a page at a time as the iteration goes."""
        body: dict[str, Any] = {"limit": page_size}
        if filter is not None:
            body["filter"] = dict(filter)
        while True:
            # A listing changes nothing: safe to send again.
            page = self._json("POST", "/files/list", json=body, repeatable=True)
            yield from page["items"]
            if not page.get("nextCursor"):
                return
            body["cursor"] = page["nextCursor"]

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

    def segment_text(
        self,
        items: Iterable[ItemReference],
        *prompts: str | TextPrompt,
        text_options: TextOptions | None = None,
        outputs: Iterable[str] | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
    ) -> dict[str, Any]:
        """A job that finds every instance of each of ``prompts`` (phrases,
        or TextPrompts with exemplar boxes) in each of ``items`` (fileIds
        or item references), on a server whose workers run SAM 3; its
        segments carry the ``promptIndex`` of their prompt here
        (``prompt_segments``). ``idempotency_key`` and ``wait`` as for
        ``create_job``."""
        if not prompts:
            raise ValueError("segment_text needs at least one phrase")
        body = text_job_body(items, prompts, text_options=text_options, outputs=outputs)
        return self.create_job(body, idempotency_key=idempotency_key, wait=wait)

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
        # Canceling a canceled job changes nothing: safe to send again.
        return self._json("POST", f"/context/vision/segment/{job_id}/cancel", repeatable=True)

    def delete_job(self, job_id: int) -> None:
        """Delete a finished or canceled job with its results for good
        (SegqError 409 for a job that may still write, 404 for none)."""
        path = f"/context/vision/segment/{job_id}"
        try:
            self._request("DELETE", path)
        except requests.ConnectionError:
            # The DELETE may have landed before the connection broke: sent
            # again, a job already gone (404) is this deletion done.
            response = self._send(
                self._http, "DELETE", self.url(path), repeatable=True, timeout=self.timeout
            )
            if not response.ok and response.status_code != 404:
                raise _error_of(response) from None

    def events(self, job_id: int, *, after: int = 0) -> Iterator[JobEvent]:
        """The job's events as they happen (server-sent events from GET
        …/segment/{jobId}/events), from the one after ``after``; the
        iteration ends with the event that ends the job (``ends_job``).

        A stream that ends before that (a server that cannot hold streams
        open sends the events there are, then ends) or whose connection
        breaks is opened again after its ``retry``, with ``Last-Event-ID``,
        as a browser's EventSource does; ``retries`` breaks in a row
        without an event raise."""
        stream = _EventStreamParser(DEFAULT_STREAM_RETRY_SECONDS)
        path = f"/context/vision/segment/{job_id}/events"
        last = after
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last:
                headers["Last-Event-ID"] = str(last)
            try:
                with self._request("GET", path, headers=headers, stream=True) as response:
                    # chunk_size None: each chunk as it arrives, not 512 bytes at a time.
                    for event_id, event_type, data in stream.events(
                        response.iter_lines(chunk_size=None, decode_unicode=True)
                    ):
                        body = json.loads(data)
                        event = JobEvent(int(event_id), event_type, body["timestamp"], body["data"])
                        last, failures = event.id, 0
                        yield event
                        if event.ends_job:
                            return
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                failures += 1
                if failures > self.retries:
                    raise
            time.sleep(stream.retry_seconds)

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
        response = self._send(self._plain, "GET", self.absolute(url), timeout=self.timeout)
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


def _encoded(image: ImageSource) -> tuple[bytes, str | None]:
    """The bytes to upload and the name they come with (a path's)."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), None
    if isinstance(image, bytes):
        return image, None
    path = Path(image)
    return path.read_bytes(), path.name


class _EventStreamParser:
    """The event stream format of the HTML standard (§9.2.6, "Interpreting
    an event stream"), line by line; keeps the stream's ``retry``."""

    def __init__(self, retry_seconds: float) -> None:
        self.retry_seconds = retry_seconds

    def events(self, lines: Iterable[str]) -> Iterator[tuple[str, str, str]]:
        """(id, type, data) of each event the lines dispatch."""
        event_id = ""
        event_type = ""
        data: list[str] = []
        for line in lines:
            if not line:
                if data:
                    yield event_id, event_type or "message", "\n".join(data)
                event_type, data = "", []
                continue
            if line.startswith(":"):
                continue  # a comment: the server's keepalive
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event_type = value
            elif name == "id" and "\0" not in value:
                event_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry_seconds = int(value) / 1000


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
