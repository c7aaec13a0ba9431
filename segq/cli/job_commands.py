"""The client commands: ``segq submit`` and ``segq jobs ls|get|cancel|watch|open``.

Each talks to a segq server through segq.client, prints for a person (or
JSON with ``--json``) and exits with a status of segq/cli/exit_codes.py."""

from __future__ import annotations

import json
import sys
import webbrowser
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click

from segq.cli.exit_codes import ExitCode
from segq.coordinates import NORMALIZED_HINT, is_normalized
from segq.engine_catalogue import MAX_TEXT_SEGMENTS

if TYPE_CHECKING:
    from segq.client import SegqClient

P = ParamSpec("P")
R = TypeVar("R")

#: ``segq.models.JobStatus``' values, written out so that the command line
#: needs no SQLAlchemy import; a test checks that the two agree.
JOB_STATUSES = ("Queued", "Running", "Completed", "Failed", "Canceled")
#: SEGQ_MAX_ITEMS_PER_JOB's default on the server (segq/settings.py).
DEFAULT_ITEMS_PER_JOB = 1000


def connection_options(command: Callable[P, R]) -> Callable[P, R]:
    """--url, --project, --api-key (from SEGQ_URL, SEGQ_PROJECT,
    SEGQ_API_KEY) and --json."""
    for option in reversed(
        [
            # show_envvar: --help and "Missing option" name the variable too.
            click.option(
                "--url",
                envvar="SEGQ_URL",
                show_envvar=True,
                default="http://127.0.0.1:8080",
                show_default=True,
                help="segq's root URL",
            ),
            click.option(
                "--project", envvar="SEGQ_PROJECT", show_envvar=True, required=True, help="project"
            ),
            click.option(
                "--api-key",
                envvar="SEGQ_API_KEY",
                show_envvar=True,
                required=True,
                help="the project's API key (segq create-project prints one)",
            ),
            click.option("--json", "as_json", is_flag=True, help="print JSON on stdout"),
        ]
    ):
        command = option(command)
    return command


def _exit(code: ExitCode, message: str, as_json: bool, **details: Any) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"error": {"exitCode": int(code), "message": message, **details}}))
    else:
        click.echo(f"segq: {message}", err=True)
    sys.exit(code)


@contextmanager
def _connected(url: str, project: str, api_key: str, as_json: bool) -> Iterator[SegqClient]:
    """A client of the server at ``url`` as ``project``; within, segq's
    refusals and an unreachable server become exit statuses."""
    import requests

    from segq.client import SegqClient, SegqError

    client = SegqClient(url, project, api_key)
    try:
        yield client
    except SegqError as exc:
        code = ExitCode.UNREACHABLE if exc.status == 503 else ExitCode.REFUSED
        _exit(code, str(exc), as_json, status=exc.status)
    except requests.RequestException as exc:
        _exit(ExitCode.UNREACHABLE, f"cannot reach segq at {url}: {exc}", as_json)


def _without_bar(progress: bool | None) -> bool:
    """--progress/--no-progress, or a bar only when a person watches stderr."""
    return not progress if progress is not None else not sys.stderr.isatty()


def _floats(text: str, count: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers: {text!r}") from None
    if len(values) not in count:
        raise click.BadParameter(f"{what} takes {' or '.join(map(str, count))} numbers: {text!r}")
    return values


def _coordinates(text: str, count: tuple[int, ...], what: str, coordinates: int) -> list[float]:
    """``text``'s numbers, of which the first ``coordinates`` are normalized."""
    values = _floats(text, count, what)
    if not all(is_normalized(value) for value in values[:coordinates]):
        raise click.BadParameter(f"{what} {text!r}: {NORMALIZED_HINT}")
    return values


def _label(value: float, what: str, text: str) -> int:
    if value not in (0, 1):
        raise click.BadParameter(f"{what} {text!r}: a label is 1 (foreground) or 0 (background)")
    return int(value)


def _box(values: list[float]) -> dict[str, float]:
    x_min, y_min, x_max, y_max = values[:4]
    return {"xMin": x_min, "yMin": y_min, "xMax": x_max, "yMax": y_max}


def _command_line_prompt(
    points: tuple[str, ...], box: str | None, texts: tuple[str, ...], exemplars: tuple[str, ...]
) -> dict[str, Any]:
    """The job's prompt from the command line: --point and --box are one
    object's prompt; each --text is a text prompt of its own (with
    --exemplar's boxes when there is one --text), after the point and box
    prompt, so promptIndex 0 is the clicks' when they are given."""
    prompt: dict[str, Any] = {}
    if points:
        parsed = [_coordinates(p, (2, 3), "--point", 2) for p in points]
        prompt["points"] = [
            {"x": p[0], "y": p[1], "label": _label(p[2], "--point", t) if len(p) == 3 else 1}
            for p, t in zip(parsed, points, strict=True)
        ]
    if box:
        prompt["boundingBox"] = _box(_coordinates(box, (4,), "--box", 4))
    if exemplars and len(texts) != 1:
        raise click.BadParameter(
            "exemplar boxes belong to one phrase: give exactly one --text with them",
            param_hint="--exemplar",
        )
    if not texts:
        return prompt
    text_prompts: list[dict[str, Any]] = []
    for text in texts:
        if not text.strip():
            raise click.BadParameter(
                "a phrase names what to find: it cannot be blank", param_hint="--text"
            )
        text_prompts.append({"text": text})
    if exemplars:
        parsed_boxes = [(_coordinates(e, (4, 5), "--exemplar", 4), e) for e in exemplars]
        text_prompts[0]["boxes"] = [
            {**_box(v), "label": _label(v[4], "--exemplar", e) if len(v) == 5 else 1}
            for v, e in parsed_boxes
        ]
    return {"prompts": ([prompt] if prompt else []) + text_prompts}


def _text_options(score_threshold: float | None, max_segments: int | None) -> dict[str, Any]:
    """``textOptions`` for what the command line set (the server fills in
    SAM 3's defaults for the rest)."""
    options: dict[str, Any] = {}
    if score_threshold is not None:
        options["scoreThreshold"] = score_threshold
    if max_segments is not None:
        options["maxSegments"] = max_segments
    return {"textOptions": options} if options else {}


@click.command()
@click.argument("images", nargs=-1)
@click.option("--point", "points", multiple=True, help="x,y[,label] normalized; label 1 or 0")
@click.option("--box", default=None, help="xMin,yMin,xMax,yMax normalized")
@click.option(
    "--text",
    "texts",
    multiple=True,
    help="find every instance of this phrase (SAM 3); each --text is a prompt of its own",
)
@click.option(
    "--exemplar",
    "exemplars",
    multiple=True,
    help="xMin,yMin,xMax,yMax[,label] normalized: an example (1) or counter-example (0) "
    "of the one --text",
)
@click.option(
    "--score-threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="text prompts: keep instances scoring above this (default SAM 3's)",
)
@click.option(
    "--max-segments",
    type=click.IntRange(1, MAX_TEXT_SEGMENTS),
    default=None,
    help="text prompts: at most this many instances per phrase, best first",
)
@click.option(
    "--prompts-from",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='JSONL: {"image": path, "points"/"boundingBox"/"prompts": ...} per line',
)
@click.option("--multimask", is_flag=True, help="up to 3 candidate masks per prompt")
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="follow the jobs and save results"
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("segq-out"), show_default=True)
@click.option(
    "--items-per-job",
    envvar="SEGQ_MAX_ITEMS_PER_JOB",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=DEFAULT_ITEMS_PER_JOB,
    show_default=True,
)
@click.option("--timeout", default=3600.0, show_default=True, help="seconds to follow the jobs")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: on a tty)")
@connection_options
def submit(
    images: tuple[str, ...],
    points: tuple[str, ...],
    box: str | None,
    texts: tuple[str, ...],
    exemplars: tuple[str, ...],
    score_threshold: float | None,
    max_segments: int | None,
    prompts_from: Path | None,
    multimask: bool,
    wait: bool,
    out: Path,
    items_per_job: int,
    timeout: float,
    progress: bool | None,
    url: str,
    project: str,
    api_key: str,
    as_json: bool,
) -> None:
    """Segment IMAGES (files, folders, glob patterns) and write, per image,
    OUT/<path>.json and OUT/<path>.mask-<n>.png. A rerun skips the images
    already done and resumes the jobs already created."""
    from tqdm import tqdm

    from segq.cli.inputs import InputError, expand_images, image_tasks, read_prompts_file
    from segq.cli.submission import Submission

    default_prompt = _command_line_prompt(points, box, texts, exemplars)
    options = {"multimaskOutput": multimask, **_text_options(score_threshold, max_segments)}
    try:
        per_image = read_prompts_file(prompts_from) if prompts_from else {}
        if not images and not per_image:
            raise InputError("name images, folders or patterns, or give --prompts-from")
        tasks = image_tasks(expand_images(images), per_image, default_prompt, options)
    except InputError as exc:
        raise click.UsageError(str(exc)) from None

    with _connected(url, project, api_key, as_json) as client:
        work = Submission(client, out, items_per_job=items_per_job)
        pending = work.plan(tasks)
        bar = tqdm(
            total=len({task.key for task in pending}),
            unit="image",
            file=sys.stderr,
            disable=_without_bar(progress),
        )
        work.on_progress = lambda settled: bar.update(settled - bar.n)
        batches = work.submit(pending)
        if wait:
            work.follow(batches, timeout)
        else:
            work.mark_submitted(batches)
        bar.close()

    outcomes = [work.outcomes[task.path] for task in tasks]
    statuses = [outcome.status for outcome in outcomes]
    if as_json:
        click.echo(
            json.dumps(
                {"jobs": [b.job_id for b in batches], "images": [o.as_json() for o in outcomes]},
                indent=2,
            )
        )
    else:
        for outcome in outcomes:
            detail = f": {outcome.error_message}" if outcome.error_message else ""
            where = "" if outcome.status == "Submitted" else f" -> {outcome.result_path}"
            click.echo(f"{outcome.status:9} {outcome.task.path}{where}{detail}")
    if any(status == "Running" for status in statuses):
        sys.exit(ExitCode.TIMED_OUT)
    if any(status in ("Failed", "Canceled") for status in statuses):
        sys.exit(ExitCode.FAILED_ITEMS)


@click.group()
def jobs() -> None:
    """List, read, cancel, follow and view jobs."""


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _summary_line(job: dict[str, Any]) -> str:
    progress = job["progress"]
    return (
        f"{job['jobId']:>8}  {job['status']:9}  {progress['completed']}/{progress['total']} done"
        f"{', ' + str(progress['failed']) + ' failed' if progress['failed'] else ''}"
        f"  {_time(job['createdTime'])}"
    )


def _finished_exit(job: dict[str, Any]) -> None:
    if job["status"] != "Completed" or job["progress"]["failed"]:
        sys.exit(ExitCode.FAILED_ITEMS)


@jobs.command("ls")
@click.option(
    "--status",
    type=click.Choice(JOB_STATUSES, case_sensitive=False),
    help="only jobs in this status (any case)",
)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@connection_options
def list_jobs(
    status: str | None, limit: int, url: str, project: str, api_key: str, as_json: bool
) -> None:
    """The project's jobs, newest first."""
    import itertools

    with _connected(url, project, api_key, as_json) as client:
        found = list(
            itertools.islice(client.jobs(status=status, page_size=min(limit, 1000)), limit)
        )
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for job in found:
        click.echo(_summary_line(job))


@jobs.command("get")
@click.argument("job_id", type=click.IntRange(min=1))
@connection_options
def get_job(job_id: int, url: str, project: str, api_key: str, as_json: bool) -> None:
    """A job's state and results."""
    with _connected(url, project, api_key, as_json) as client:
        job = client.get_job(job_id)
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    click.echo(_summary_line(job))
    for item in job["items"]:
        name = item.get("fileExternalId") or item.get("fileUrl") or f"file {item.get('fileId')}"
        segments = item.get("segments")
        if segments is None:
            click.echo(f"  {name}: not done")
            continue
        scores = ", ".join(f"{s['score']:.3f}" for s in segments)
        click.echo(f"  {name}: {len(segments)} segment(s), scores {scores or '-'}")
    for failure in job.get("failedItems") or []:
        for ref in failure["items"]:
            click.echo(f"  file {ref.get('fileId')}: failed: {failure['errorMessage']}")
    if job.get("viewUrl"):
        click.echo(f"  viewer: {client.view_url(job)}")


@jobs.command("cancel")
@click.argument("job_id", type=click.IntRange(min=1))
@connection_options
def cancel_job(job_id: int, url: str, project: str, api_key: str, as_json: bool) -> None:
    """Cancel a job: queued items never run (a finished job: exit 1)."""
    with _connected(url, project, api_key, as_json) as client:
        job = client.cancel_job(job_id)
    click.echo(json.dumps(job, indent=2) if as_json else _summary_line(job))


@jobs.command("watch")
@click.argument("job_id", type=click.IntRange(min=1))
@click.option("--timeout", default=3600.0, show_default=True, help="seconds to watch")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: on a tty)")
@connection_options
def watch_job(
    job_id: int,
    timeout: float,
    progress: bool | None,
    url: str,
    project: str,
    api_key: str,
    as_json: bool,
) -> None:
    """Follow a job until it finishes: exit 0 if every item completed, 3
    if some failed or it was canceled, 4 if still running at --timeout."""
    import time

    from tqdm import tqdm

    from segq.client import is_finished

    deadline = time.monotonic() + timeout
    with _connected(url, project, api_key, as_json) as client:
        # Polled as a page of one item with the job's progress, asked with
        # its ETag: an unchanged job answers 304, and no poll carries every item.
        job = client.get_job(job_id, items_limit=1)
        bar = tqdm(
            total=job["progress"]["total"],
            unit="item",
            file=sys.stderr,
            disable=_without_bar(progress),
        )
        while True:
            settled = job["progress"]["completed"] + job["progress"]["failed"]
            bar.update(settled - bar.n)
            if is_finished(job) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
            job = client.get_job(job_id, items_limit=1)
        bar.close()
        job = client.get_job(job_id)
    click.echo(json.dumps(job, indent=2) if as_json else _summary_line(job))
    if not is_finished(job):
        sys.exit(ExitCode.TIMED_OUT)
    _finished_exit(job)


@jobs.command("open")
@click.argument("job_id", type=click.IntRange(min=1))
@click.option("--no-browser", is_flag=True, help="only print the link")
@connection_options
def open_job(
    job_id: int, no_browser: bool, url: str, project: str, api_key: str, as_json: bool
) -> None:
    """Open the job's viewer page (masks over the images) in a browser; the
    link is signed and works without the API key until it expires."""
    with _connected(url, project, api_key, as_json) as client:
        link = client.view_url(client.get_job(job_id))
    click.echo(json.dumps({"jobId": job_id, "viewUrl": link}) if as_json else link)
    if not no_browser:
        webbrowser.open(link)
