"""``segq``: every command of the project. Heavy imports (Flask, Celery, torch)
happen inside the command that needs them."""

from __future__ import annotations

import os
from pathlib import Path

import click

from segq.cli.job_commands import jobs, submit
from segq.engine_catalogue import CHECKPOINT_NAMES, ENGINES_BY_NAME, SAM3
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
    from segq.api.http_server import serve as serve_http

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
    settings = Settings.from_env()
    if settings.metrics_port is not None and pool == "prefork":
        _prepare_multiprocess_metrics()
    # Imported only now: the other commands need nothing of the worker.
    from segq.worker.celery_app import create_worker_app, run_worker

    exit_code = run_worker(
        create_worker_app(settings),
        [
            "worker",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--loglevel={loglevel}",
            "-Q",
            ",".join(QUEUES[name] for name in names),
            "--without-gossip",
            "--without-mingle",
        ],
    )
    if exit_code:
        raise SystemExit(exit_code)


def _prepare_multiprocess_metrics() -> None:
    """Give the pool's processes a folder to count in (prometheus-client's
    multiprocess mode), emptied of an earlier run's counts, before anything
    imports the library: it reads PROMETHEUS_MULTIPROC_DIR at import."""
    import tempfile

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        folder = tempfile.mkdtemp(prefix="segq-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    Path(folder).mkdir(parents=True, exist_ok=True)
    for stale in Path(folder).glob("*.db"):
        stale.unlink()


@main.command()
def migrate() -> None:
    """Create or upgrade the database schema."""
    from segq.db import make_engine
    from segq.schema_migrations import upgrade_to_head

    settings = Settings.from_env()
    upgrade_to_head(make_engine(settings.database_url))
    click.echo("database is at the latest schema")


@main.command("create-project")
@click.argument("name")
def create_project_command(name: str) -> None:
    """Create project NAME and print its API key (shown only this once)."""
    from segq.db import make_engine, make_session_factory
    from segq.projects import ProjectError, create_project
    from segq.schema_migrations import upgrade_to_head

    settings = Settings.from_env()
    engine = make_engine(settings.database_url)
    upgrade_to_head(engine)
    try:
        with make_session_factory(engine).begin() as session:
            _, key = create_project(session, name)
    except ProjectError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)


@main.command()
@click.option("--repair", is_flag=True, help="delete orphan objects and files whose bytes are gone")
@click.option(
    "--grace-seconds",
    default=3600,
    show_default=True,
    type=click.IntRange(min=0),
    help="objects younger than this are never orphans (their row may be on its way)",
)
def doctor(repair: bool, grace_seconds: int) -> None:
    """Compare storage with the database: objects no row names, rows whose
    objects are gone. Exits 1 if anything is left unrepaired."""
    from segq.db import make_engine, make_session_factory
    from segq.doctor import examine
    from segq.doctor import repair as repair_findings
    from segq.storage import open_storage

    settings = Settings.from_env()
    sessions = make_session_factory(make_engine(settings.database_url))
    storage = open_storage(
        settings.storage_url,
        s3_endpoint_url=settings.s3_endpoint_url,
        secret_key=settings.secret_key,
    )
    findings = examine(sessions, storage, grace_seconds=grace_seconds)
    for key in findings.orphan_objects:
        click.echo(f"orphan object: {key}")
    for file_id, key in findings.files_without_bytes:
        click.echo(f"file {file_id} has no bytes: {key}")
    for item_id, key in findings.items_without_objects:
        click.echo(f"item {item_id} is missing {key}")
    click.echo(
        f"{len(findings.orphan_objects)} orphan objects, "
        f"{len(findings.files_without_bytes)} files without bytes, "
        f"{len(findings.items_without_objects)} missing item objects"
    )
    if repair:
        repair_findings(sessions, storage, findings)
        click.echo(
            f"repaired: deleted {len(findings.orphan_objects)} objects and "
            f"{len(findings.files_without_bytes)} file rows; missing item objects cannot be remade"
        )
    if findings.items_without_objects or (not repair and not findings.clean):
        raise SystemExit(1)


@main.group()
def weights() -> None:
    """Segment Anything (SAM, SAM 2, SAM 2.1) checkpoints; SAM 3's snapshot."""


@weights.command("sam3")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    default=None,
    help="the snapshot directory (default: SEGQ_DATA_DIR/weights/sam3)",
)
def weights_sam3(directory: Path | None) -> None:
    """How to get SAM 3's weights, and whether a directory holds them."""
    from segq.worker.weights import snapshot_problem

    snapshot = ENGINES_BY_NAME[SAM3].weights
    assert snapshot is not None
    assert snapshot.hub_repository is not None
    repository = snapshot.hub_repository
    folder = directory or Settings.from_env().data_dir / "weights" / snapshot.local_name
    problem = snapshot_problem(folder)
    if problem is None:
        click.echo(
            f"{folder} is a SAM 3 snapshot\n"
            f"use it with: SEGQ_MODEL={SAM3} SEGQ_MODEL_CHECKPOINT={folder}"
        )
        return
    raise click.ClickException(
        f"{problem}\n{repository} is gated: accept Meta's licence on its Hugging Face "
        "page, then, with your own token (HF_TOKEN or `hf auth login`), download it once:\n"
        f"  hf download {repository} --local-dir {folder}\n"
        "segq then loads it with local files only and never contacts the hub."
    )


def _sha256_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower()):
        raise click.BadParameter("a SHA-256 is 64 hexadecimal digits")
    return value.lower()


@weights.command("download")
@click.argument("architecture", type=click.Choice(CHECKPOINT_NAMES))
@click.option(
    "--dest",
    type=click.Path(path_type=Path),
    default=None,
    help="folder (default: SEGQ_DATA_DIR/weights)",
)
@click.option(
    "--sha256",
    default=None,
    callback=_sha256_option,
    help="check the file against this SHA-256 (Meta publishes none for SAM 2 and 2.1)",
)
@click.option(
    "--unverified",
    is_flag=True,
    help="keep a file Meta publishes no checksum for without checking it; prints its SHA-256",
)
def weights_download(
    architecture: str, dest: Path | None, sha256: str | None, unverified: bool
) -> None:
    """Download the official checkpoint and check its hash."""
    from segq.worker.weights import WeightsError, download_checkpoint, engine_name, file_sha256

    folder = dest or Settings.from_env().data_dir / "weights"
    try:
        path = download_checkpoint(
            architecture, folder, expected_sha256=sha256, unverified=unverified
        )
    except WeightsError as exc:
        raise click.ClickException(str(exc)) from None
    if unverified and sha256 is None:
        click.echo(f"unverified; its SHA-256 is {file_sha256(path)}")
    click.echo(
        f"{path}\nuse it with: SEGQ_MODEL={engine_name(architecture)} SEGQ_MODEL_CHECKPOINT={path}"
    )


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


main.add_command(submit)
main.add_command(jobs)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
