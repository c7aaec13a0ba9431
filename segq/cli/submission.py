"""``segq submit``'s work: upload the images, submit them as jobs of at
most N items, follow the jobs with a progress bar, and write each image's
masks and JSON result. Resumable: a result file records the key of the
work it holds, images are uploaded under an externalId derived from their
content, and a job's Idempotency-Key is derived from its images' keys, so a
rerun skips what is written and finds the jobs it had already created."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segq.cli.inputs import ImageTask
from segq.client import SegqClient, SegqError, is_finished

#: How often unfinished jobs are read.
POLL_SECONDS = 0.5


@dataclass
class Outcome:
    """What became of one image in this run."""

    task: ImageTask
    #: "Completed", "Failed", "Canceled", "Skipped" (done by an earlier run),
    #: "Submitted" (--no-wait) or "Running" (still going when the wait ended).
    status: str
    result_path: Path
    job_id: int | None = None
    error_message: str | None = None
    mask_paths: list[Path] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "image": str(self.task.path),
            "status": self.status,
            "jobId": self.job_id,
            "result": str(self.result_path) if self.status != "Submitted" else None,
            "masks": [str(path) for path in self.mask_paths],
            "errorMessage": self.error_message,
        }


def result_path(out: Path, image: Path) -> Path:
    """``out/<the image's path>.json``: the image's path relative to the
    current folder when inside it, else without its root, so two images of
    the same name in two folders never share a result."""
    absolute = image.resolve()
    try:
        relative = absolute.relative_to(Path.cwd())
    except ValueError:
        relative = absolute.relative_to(absolute.anchor)
    return out / relative.parent / f"{relative.name}.json"


def _done_before(path: Path, key: str) -> bool:
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and (
        recorded.get("key") == key and recorded.get("status") == "Completed"
    )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=".segq-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(staged, path)


def _chunks(tasks: Sequence[ImageTask], size: int) -> Iterable[list[ImageTask]]:
    for start in range(0, len(tasks), size):
        yield list(tasks[start : start + size])


@dataclass
class _Batch:
    """One job: its images by fileId (unique within a job)."""

    tasks_by_file: dict[int, list[ImageTask]]
    job_id: int = 0


class Submission:
    def __init__(
        self,
        client: SegqClient,
        out: Path,
        *,
        items_per_job: int,
        on_progress: Callable[[int], None] = lambda _done: None,
    ) -> None:
        self.client = client
        self.out = out
        self.items_per_job = items_per_job
        self.on_progress = on_progress
        self.outcomes: dict[Path, Outcome] = {}

    def plan(self, tasks: Sequence[ImageTask]) -> list[ImageTask]:
        """The tasks still to do; those done by an earlier run are Skipped."""
        pending = []
        for task in tasks:
            path = result_path(self.out, task.path)
            if _done_before(path, task.key):
                self.outcomes[task.path] = Outcome(task, "Skipped", path)
            else:
                pending.append(task)
        return pending

    def _file_id(self, task: ImageTask) -> int:
        external_id = f"sha256:{task.content_sha256}"
        found = self.client.file_by_external_id(external_id)
        if found is None:
            try:
                # Named by the image's file name: what a person knows it by
                # (the viewer's title), the externalId being a content hash.
                found = self.client.upload(task.path, external_id=external_id, name=task.path.name)
            except SegqError as exc:
                # Another run uploaded the same bytes meanwhile.
                if exc.status != 409:
                    raise
                found = self.client.file_by_external_id(external_id)
                if found is None:
                    raise
        return int(found["id"])

    def submit(self, pending: Sequence[ImageTask]) -> list[_Batch]:
        """Upload and create the jobs: images with the same request share
        jobs of up to ``items_per_job`` distinct images."""
        by_request: dict[str, list[ImageTask]] = {}
        for task in pending:
            request = json.dumps(task.request, sort_keys=True)
            by_request.setdefault(request, []).append(task)
        batches = []
        for tasks in by_request.values():
            # The same bytes named twice are one item, written to both results.
            distinct: dict[str, list[ImageTask]] = {}
            for task in tasks:
                distinct.setdefault(task.key, []).append(task)
            for chunk in _chunks([group[0] for group in distinct.values()], self.items_per_job):
                batch = _Batch({self._file_id(task): distinct[task.key] for task in chunk})
                batch.job_id = self._create_job(batch, chunk)
                batches.append(batch)
        return batches

    def _create_job(self, batch: _Batch, chunk: list[ImageTask]) -> int:
        body = {**chunk[0].request, "items": [{"fileId": f} for f in batch.tasks_by_file]}
        key = "segq-cli:" + hashlib.sha256("\n".join(t.key for t in chunk).encode()).hexdigest()
        job = self.client.create_job(body, idempotency_key=key)
        if job["status"] in ("Failed", "Canceled"):
            # An earlier run's job for these images that ended without
            # results: this run asks again, once, under a key of its own.
            job = self.client.create_job(body, idempotency_key=f"{key}:after-{job['jobId']}")
        return int(job["jobId"])

    def follow(self, batches: Sequence[_Batch], timeout: float) -> None:
        """Poll the jobs until they finish or ``timeout`` seconds pass,
        writing each job's results as it finishes."""
        deadline = time.monotonic() + timeout
        unfinished = {batch.job_id: batch for batch in batches}
        settled: dict[int, int] = {}
        while unfinished:
            for job_id, batch in list(unfinished.items()):
                job = self.client.get_job(job_id)
                progress = job["progress"]
                settled[job_id] = progress["completed"] + progress["failed"]
                if is_finished(job):
                    self._record(batch, job)
                    settled[job_id] = progress["total"]
                    del unfinished[job_id]
            self.on_progress(sum(settled.values()))
            if not unfinished:
                return
            if time.monotonic() >= deadline:
                for batch in unfinished.values():
                    self._mark(batch, "Running")
                return
            time.sleep(POLL_SECONDS)

    def mark_submitted(self, batches: Sequence[_Batch]) -> None:
        for batch in batches:
            self._mark(batch, "Submitted")

    def _mark(self, batch: _Batch, status: str) -> None:
        for tasks in batch.tasks_by_file.values():
            for task in tasks:
                path = result_path(self.out, task.path)
                self.outcomes[task.path] = Outcome(task, status, path, batch.job_id)

    def _record(self, batch: _Batch, job: dict[str, Any]) -> None:
        errors = {
            ref.get("fileId"): failure["errorMessage"]
            for failure in job.get("failedItems") or []
            for ref in failure["items"]
        }
        results = {item.get("fileId"): item for item in job["items"]}
        for file_id, tasks in batch.tasks_by_file.items():
            item = results.get(file_id)
            for task in tasks:
                path = result_path(self.out, task.path)
                outcome = Outcome(task, "Failed", path, batch.job_id, errors.get(file_id))
                if item is not None and item.get("segments") is not None:
                    outcome.status = "Completed"
                    outcome.mask_paths = self._write_masks(path, item["segments"])
                elif file_id not in errors:
                    outcome.status = "Canceled"
                    outcome.error_message = job.get("errorMessage") or f"job {job['status']}"
                self._write_result(outcome, file_id, item, job)
                self.outcomes[task.path] = outcome

    def _write_masks(self, result: Path, segments: list[dict[str, Any]]) -> list[Path]:
        written = []
        for index, segment in enumerate(segments):
            if "mask" not in segment:
                continue
            target = result.with_name(result.name.removesuffix(".json") + f".mask-{index}.png")
            _write_atomically(target, self.client.download(segment["mask"]["url"]))
            written.append(target)
        return written

    def _write_result(
        self, outcome: Outcome, file_id: int, item: dict[str, Any] | None, job: dict[str, Any]
    ) -> None:
        """Written last, after the masks: a result file means its masks are there."""
        segments = []
        for index, segment in enumerate((item or {}).get("segments") or []):
            kept = {k: v for k, v in segment.items() if k not in ("mask", "logits")}
            if "mask" in segment:
                kept["maskFile"] = outcome.result_path.name.removesuffix(".json") + (
                    f".mask-{index}.png"
                )
            segments.append(kept)
        document = {
            "image": str(outcome.task.path),
            "key": outcome.task.key,
            "status": outcome.status,
            "jobId": job["jobId"],
            "fileId": file_id,
            "request": outcome.task.request,
            "errorMessage": outcome.error_message,
            "segments": segments,
        }
        _write_atomically(outcome.result_path, json.dumps(document, indent=2).encode())
