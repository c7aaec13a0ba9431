"""``segq demo``: boot segq on its current settings (the embedded default when
nothing is configured), segment a sample image through the queue, and write
the mask and an overlay."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image, ImageDraw, ImageFilter

from segq.client import SegqClient
from segq.db import make_engine, make_session_factory
from segq.models import JobStatus, Project
from segq.projects import add_api_key, create_project
from segq.schema_migrations import upgrade_to_head
from segq.settings import Settings

DEMO_PROJECT = "demo"
#: The sample's object, in normalized coordinates: a ball centred here.
BALL_CENTRE = (0.42, 0.55)
BALL_RADIUS = 0.2


def sample_image(width: int = 640, height: int = 480) -> Image.Image:
    """A synthetic photo-like scene (no licence questions): a shaded red ball
    on a textured floor under a graded sky, with a distracting green block."""
    rng = np.random.default_rng(7)
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = np.array([120, 170, 230]) * (1 - y) + np.array([220, 230, 245]) * y
    floor = np.array([150, 120, 90]) + rng.normal(0, 12, (height, width, 3))
    horizon = int(height * 0.45)
    pixels = np.where(np.arange(height)[:, None, None] < horizon, sky, floor)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle(
        (int(width * 0.72), int(height * 0.35), int(width * 0.9), int(height * 0.7)),
        fill=(60, 150, 70),
    )
    cx, cy, r = BALL_CENTRE[0] * width, BALL_CENTRE[1] * height, BALL_RADIUS * height
    for step in range(40, 0, -1):
        # Concentric disks from dark rim to bright highlight: a shaded sphere.
        shade = step / 40
        radius = r * shade
        offset = (1 - shade) * r * 0.35
        colour = (
            int(120 + 135 * (1 - shade)),
            int(20 + 60 * (1 - shade)),
            int(25 + 60 * (1 - shade)),
        )
        draw.ellipse(
            (
                cx - offset - radius,
                cy - offset - radius,
                cx - offset + radius,
                cy - offset + radius,
            ),
            fill=colour,
        )
    return image.filter(ImageFilter.GaussianBlur(0.8))


def overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with the mask tinted in, and its outline."""
    base = np.asarray(image.convert("RGB")).astype(np.float32)
    selected = np.asarray(mask) > 127
    tint = np.array([30, 144, 255], dtype=np.float32)
    base[selected] = base[selected] * 0.45 + tint * 0.55
    result = Image.fromarray(base.astype(np.uint8))
    edges = mask.filter(ImageFilter.FIND_EDGES)
    result.paste((255, 255, 0), mask=edges)
    return result


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _demo_key(settings: Settings) -> str:
    engine = make_engine(settings.database_url)
    upgrade_to_head(engine)
    with make_session_factory(engine).begin() as session:
        project = session.query(Project).filter_by(name=DEMO_PROJECT).one_or_none()
        if project is None:
            _, key = create_project(session, DEMO_PROJECT)
        else:
            key = add_api_key(session, project)
    engine.dispose()
    return key


@contextmanager
def _running(*commands: list[str]) -> Iterator[None]:
    processes = [subprocess.Popen(command, env=os.environ.copy()) for command in commands]
    try:
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_ready(base_url: str, timeout: float) -> None:
    """Poll /readyz until the API answers ready, or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base_url}/readyz", timeout=2).ok:
                return
        # Not listening yet, or too busy starting to answer in time (a loaded
        # machine): both mean "not ready", neither is a failure.
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"segq did not become ready at {base_url} within {timeout:.0f} s")


def run_demo(out_dir: Path, image_path: Path | None, timeout: float) -> dict[str, Any]:
    settings = Settings.from_env()
    key = _demo_key(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    if image_path is None:
        image_path = out_dir / "sample.png"
        sample_image().save(image_path)
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    segq = [sys.executable, "-m", "segq.cli.main"]
    print(f"segq demo: data in {settings.data_dir}, API on {base_url}", flush=True)
    with _running(
        [*segq, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        [*segq, "worker", "--concurrency", "1"],
    ):
        wait_ready(base_url, timeout=60)
        client = SegqClient(base_url, DEMO_PROJECT, key)
        uploaded = client.upload(image_path)
        print(f"uploaded file {uploaded['id']} ({uploaded['width']}x{uploaded['height']})")
        created = client.create_job(
            {
                "items": [{"fileId": uploaded["id"]}],
                "points": [{"x": BALL_CENTRE[0], "y": BALL_CENTRE[1], "label": 1}],
                "boundingBox": {
                    "xMin": BALL_CENTRE[0] - BALL_RADIUS * 0.85,
                    "yMin": BALL_CENTRE[1] - BALL_RADIUS * 1.1,
                    "xMax": BALL_CENTRE[0] + BALL_RADIUS * 0.85,
                    "yMax": BALL_CENTRE[1] + BALL_RADIUS * 1.1,
                },
            }
        )
        print(f"job {created['jobId']} {created['status']}; waiting for the worker…", flush=True)
        job = client.wait(created["jobId"], timeout=timeout)
        print(json.dumps(job, indent=2))
        if job["status"] != JobStatus.COMPLETED:
            raise RuntimeError(f"job ended {job['status']}: {job.get('errorMessage')}")
        segment = job["items"][0]["segments"][0]
        mask = Image.open(io.BytesIO(client.download(segment["mask"]["url"])))
        image = Image.open(image_path)
        if mask.size != image.size:
            raise RuntimeError(f"mask is {mask.size}, image is {image.size}")
        mask.save(out_dir / "mask.png")
        overlay(image, mask.convert("L")).save(out_dir / "overlay.png")
    print(f"wrote {out_dir / 'mask.png'} and {out_dir / 'overlay.png'}")
    return job
