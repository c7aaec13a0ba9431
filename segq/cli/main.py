"""``segq``: every command of the project. Heavy imports (Flask, Celery, torch)
happen inside the command that needs them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from segq.models import JobStatus
from segq.settings import Settings


@click.group()
def main() -> None:
    """segq: asynchronous image segmentation."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="processes")
@click.option("--threads", default=4, show_default=True, type=int, help="threads per process")
@click.option(
    "--connections",
    default=1000,
    show_default=True,
    type=int,
    help="open connections per process; more wait in the listen backlog",
)
def serve(host: str, port: int, workers: int, threads: int, connections: int) -> None:
    """Run the HTTP API (waitress in gunicorn's processes)."""
    from api.http_server import serve as serve_http

    serve_http(host=host, port=port, workers=workers, threads=threads, connections=connections)


@main.command()
@click.option(
    "--concurrency",
    default=1,
    show_default=True,
    type=int,
    help="pool processes; each loads the model once",
)
@click.option("--pool", default="prefork", show_default=True)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--queues",
    default="segment,webhooks",
    show_default=True,
    help="what to serve: 'segment' (loads the model), 'webhooks' (model-free), or both",
)
def worker(concurrency: int, pool: str, loglevel: str, queues: str) -> None:
    """Run a Celery worker that segments queued items and delivers webhooks.

    In production, run GPU workers with --queues segment and a few small
    workers with --queues webhooks --concurrency 8 --pool threads, so a slow
    webhook receiver never holds a GPU."""
    from segq.queue import QUEUES

    names = [name.strip() for name in queues.split(",") if name.strip()]
    unknown = set(names) - set(QUEUES)
    if not names or unknown:
        raise click.BadParameter(f"choose from {', '.join(QUEUES)}", param_hint="--queues")
    # Imported only now: the other commands need nothing of the worker.
    from worker.celery_app import create_worker_app

    create_worker_app(Settings.from_env()).worker_main(
        [
            "worker",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--loglevel={loglevel}",
            "-Q",
            ",".join(QUEUES[name] for name in names),
            "--without-gossip",
            "--without-mingle",
        ]
    )


@main.command()
def migrate() -> None:
    """Create or upgrade the database schema."""
    from segq.db import make_engine
    from segq.migrations import upgrade_to_head

    settings = Settings.from_env()
    upgrade_to_head(make_engine(settings.database_url))
    click.echo("database is at the latest schema")


@main.command("create-project")
@click.argument("name")
def create_project_command(name: str) -> None:
    """Create project NAME and print its API key (shown only this once)."""
    from segq.db import make_engine, make_session_factory
    from segq.migrations import upgrade_to_head
    from segq.projects import ProjectError, create_project

    settings = Settings.from_env()
    engine = make_engine(settings.database_url)
    upgrade_to_head(engine)
    try:
        with make_session_factory(engine).begin() as session:
            _, key = create_project(session, name)
    except ProjectError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)


@main.group()
def weights() -> None:
    """Segment Anything checkpoints."""


@weights.command("download")
@click.argument("architecture", type=click.Choice(["vit_b", "vit_l", "vit_h"]))
@click.option(
    "--dest",
    type=click.Path(path_type=Path),
    default=None,
    help="folder (default: SEGQ_DATA_DIR/weights)",
)
def weights_download(architecture: str, dest: Path | None) -> None:
    """Download the official checkpoint and check its hash."""
    from worker.weights import WeightsError, download_checkpoint

    folder = dest or Settings.from_env().data_dir / "weights"
    try:
        path = download_checkpoint(architecture, folder)
    except WeightsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{path}\nuse it with: SEGQ_MODEL=sam_{architecture} SEGQ_MODEL_CHECKPOINT={path}")


def _floats(text: str, count: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers: {text!r}") from None
    if len(values) not in count:
        raise click.BadParameter(f"{what} takes {' or '.join(map(str, count))} numbers: {text!r}")
    return values


@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--point", "points", multiple=True, help="x,y[,label] normalized; label 1 or 0")
@click.option("--box", default=None, help="xMin,yMin,xMax,yMax normalized")
@click.option("--multimask", is_flag=True, help="up to 3 candidate masks")
@click.option("--wait", is_flag=True, help="poll until the job finishes and save the masks")
@click.option("--out", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@click.option("--url", envvar="SEGQ_URL", default="http://127.0.0.1:8080", show_default=True)
@click.option("--project", envvar="SEGQ_PROJECT", required=True)
@click.option("--api-key", envvar="SEGQ_API_KEY", required=True)
def submit(
    image: Path,
    points: tuple[str, ...],
    box: str | None,
    multimask: bool,
    wait: bool,
    out: Path,
    url: str,
    project: str,
    api_key: str,
) -> None:
    """Upload IMAGE, submit a job, and (with --wait) save its masks."""
    import requests

    from segq.cli.client import ClientError, SegqClient

    body: dict[str, Any] = {"multimaskOutput": multimask}
    if points:
        parsed = [_floats(p, (2, 3), "--point") for p in points]
        body["points"] = [
            {"x": p[0], "y": p[1], "label": int(p[2]) if len(p) == 3 else 1} for p in parsed
        ]
    if box:
        x_min, y_min, x_max, y_max = _floats(box, (4,), "--box")
        body["boundingBox"] = {"xMin": x_min, "yMin": y_min, "xMax": x_max, "yMax": y_max}
    client = SegqClient(url, project, api_key)
    try:
        uploaded = client.upload(image)
        job = client.create_job({"items": [{"fileId": uploaded["id"]}], **body})
        if wait:
            job = client.wait(job["jobId"])
            out.mkdir(parents=True, exist_ok=True)
            for item in job["items"]:
                for index, segment in enumerate(item.get("segments", [])):
                    if "mask" in segment:
                        target = out / f"job{job['jobId']}-file{item['fileId']}-mask{index}.png"
                        target.write_bytes(client.download(segment["mask"]["url"]))
                        click.echo(f"saved {target}", err=True)
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None
    except requests.RequestException as exc:
        raise click.ClickException(f"cannot reach segq at {url}: {exc}") from None
    click.echo(json.dumps(job, indent=2))
    if wait and job["status"] != JobStatus.COMPLETED:
        sys.exit(1)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True)
@click.option(
    "--image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="your own image instead of the generated sample",
)
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for the job")
def demo(out: Path, image: Path | None, timeout: float) -> None:
    """Boot segq, segment a sample image through the queue, write mask and overlay."""
    from segq.cli.demo import run_demo

    try:
        run_demo(out, image, timeout)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
