"""The deployment files, checked as far as this machine allows (no image can
be built here, and nothing is fetched: every schema is bundled):

- Kubernetes manifests against Kubernetes 1.33's schemas (kubernetes-validate,
  strict: unknown fields are errors);
- KEDA's ScaledObject against its CRD's schema (tests/schemas/, cited there),
  aimed at a Deployment that exists, on a metric the API really serves;
- the compose file against the Compose specification's schema as
  check-jsonschema vendors it;
- the Dockerfiles through buildkit's parser (the ``dockerfile`` package):
  every path they copy exists, every ``segq`` command they, the compose
  file and the manifests run parses as the CLI's, and what they install is
  pinned by requirements.lock.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml
from flask.testing import FlaskClient

from segq.settings import Settings
from tests.support.cli_parsing import segq_command_error
from tests.support.live_processes import REPO

KUBERNETES_VERSION = "1.33.0"
DEPLOY = REPO / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*[!e]"))  # not the .dockerignore files
KEDA_SCHEMA = REPO / "tests" / "support" / "schemas" / "keda_scaledobject_v1alpha1.json"


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path, document


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in documents() if document["kind"] == kind]


def test_every_manifest_is_valid_kubernetes() -> None:
    checked = 0
    for _path, document in documents():
        if document["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: checked against KEDA's schema below
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        checked += 1
    kinds = {document["kind"] for _, document in documents()}
    assert {"Deployment", "Service", "Job", "ConfigMap", "HorizontalPodAutoscaler"} <= kinds
    assert checked >= 8


def test_a_field_kubernetes_does_not_know_is_refused() -> None:
    [deployment] = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "segq-api"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_gpu_workers_scale_on_queue_depth_with_keda(client: FlaskClient) -> None:
    schema = json.loads(KEDA_SCHEMA.read_text())
    [scaled] = by_kind("ScaledObject")
    jsonschema.validate(scaled, schema)
    # Scale to zero or keep one warm: both are valid settings.
    for minimum in (0, 1):
        jsonschema.validate(
            {**scaled, "spec": {**scaled["spec"], "minReplicaCount": minimum}}, schema
        )
    assert scaled["spec"]["minReplicaCount"] in (0, 1)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**scaled, "spec": {**scaled["spec"], "minReplicas": 0}}, schema)

    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
    assert target["metadata"]["namespace"] == scaled["metadata"]["namespace"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    # The query reads metrics that the API's /metrics serves.
    served = client.get("/metrics").get_data(as_text=True)
    for name, status in re.findall(r'(segq_\w+)\{status="(\w+)"\}', trigger["metadata"]["query"]):
        assert f'{name}{{status="{status}"}} ' in served


def test_the_api_scales_on_cpu() -> None:
    [autoscaler] = by_kind("HorizontalPodAutoscaler")
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    target = autoscaler["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    api = deployments[target["name"]]
    assert api["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    assert autoscaler["spec"]["minReplicas"] >= 2


def test_a_stopping_api_pod_drains_within_its_grace_period() -> None:
    """The endpoint goes before SIGTERM (preStop), and the pod is killed only
    after the drain's own bound (SEGQ_SHUTDOWN_GRACE_SECONDS) has passed."""
    # A key given, so that reading the settings writes none to disk.
    key = {"SEGQ_SECRET_KEY": "unused"}
    [config] = by_kind("ConfigMap")
    drain = Settings.from_env({**config["data"], **key}).shutdown_grace_seconds
    [api] = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "segq-api"]
    pod = api["spec"]["template"]["spec"]
    pause = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause >= 5
    assert pod["terminationGracePeriodSeconds"] > pause + drain
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    grace = compose["services"]["api"]["stop_grace_period"]
    assert int(grace.removesuffix("s")) > Settings.from_env(key).shutdown_grace_seconds


def check_jsonschema(*args: str) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(executable), "--builtin-schema", "vendor.compose-spec", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    checked = check_jsonschema(str(DEPLOY / "compose.yaml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        (DEPLOY / "compose.yaml").read_text().replace("stop_grace_period:", "stop_grace_periods:")
    )
    refused = check_jsonschema(str(broken))
    assert refused.returncode == 1
    assert "stop_grace_periods" in refused.stdout


def segq_invocations(command: list[str]) -> Iterator[list[str]]:
    """Each ``segq ...`` a container command runs, including inside ``sh -c``."""
    if command[:2] == ["sh", "-c"]:
        for part in re.split(r"\|\||&&|;", command[2]):
            words = shlex.split(part)
            if words and words[0] == "segq":
                yield words[1:]
    elif command and command[0] == "segq":
        yield command[1:]


def container_commands() -> Iterator[tuple[str, list[str]]]:
    for path in DOCKERFILES:
        for instruction in dockerfile.parse_file(str(path)):
            if instruction.cmd in ("CMD", "ENTRYPOINT"):
                assert instruction.json, f"{path.name}: {instruction.original} is not exec form"
                yield f"{path.name} {instruction.cmd}", list(instruction.value)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for service, spec in compose["services"].items():
        if isinstance(spec.get("command"), list):
            yield f"compose {service}", spec["command"]
    for path, document in documents():
        pod = document.get("spec", {}).get("template", {}).get("spec", {})
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            if "command" in container:
                yield f"{path.name} {container['name']}", container["command"]


def test_every_segq_command_deployed_is_one_the_cli_has() -> None:
    seen = 0
    for where, command in container_commands():
        for args in segq_invocations(command):
            assert segq_command_error(args) is None, (where, segq_command_error(args))
            seen += 1
    # serve (API image), worker x4, migrate x2, weights download x2.
    assert seen >= 9
    assert segq_command_error(["worker", "--queue", "segment"]) is not None
    assert segq_command_error(["serv"]) is not None


def test_dockerfiles_parse_copy_what_exists_and_install_the_locked_versions() -> None:
    assert [path.name for path in DOCKERFILES] == ["Dockerfile.api", "Dockerfile.worker"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = {
        re.split(r"[=<>!~;\s\[]", line, maxsplit=1)[0].lower().replace("_", "-")
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if line and not line.startswith((" ", "#", "-"))
    }
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["sam"]]:
        name = re.split(r"[=<>!~;\s\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in locked, f"{requirement} is installed but not pinned in requirements.lock"
    for path in DOCKERFILES:
        instructions = dockerfile.parse_file(str(path))
        [base] = [i for i in instructions if i.cmd == "FROM"]
        python = re.search(r"python:(\d+\.\d+)", base.value[0])
        assert python is not None and project["requires-python"] == f">={python.group(1)}"
        for copy in (i for i in instructions if i.cmd in ("COPY", "ADD")):
            assert not any(flag.startswith("--from") for flag in copy.flags)
            *sources, _destination = copy.value
            for source in sources:
                assert (REPO / source).exists(), f"{path.name}: {copy.original}: no {source}"
        installs = [
            i.original for i in instructions if i.cmd == "RUN" and "pip install" in i.original
        ]
        assert installs
        for run in installs:
            for install in re.findall(r"pip install[^&]*", run):
                pinned = "-c requirements.lock" in install or "--no-deps ." in install
                # The API image pins by the lock less its torch stack.
                derived = "-c /tmp/constraints.txt" in install and "requirements.lock" in run
                assert pinned or derived, (
                    f"{path.name}: {install.strip()} is not pinned by the lock"
                )


def worker_metric_names() -> set[str]:
    """Every sample name the workers' metrics can have."""
    from prometheus_client import REGISTRY

    import segq.worker.metrics  # noqa: F401  (registers them)

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("segq_worker_")
        for suffix in suffixes.get(family.type, ("",))
    }


def test_alert_rules_name_metrics_that_are_served(client: FlaskClient) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "segq-alerts.yaml").read_text())
    [group] = rules["groups"]
    alerts = {rule["alert"]: rule for rule in group["rules"]}
    assert {
        "SegqQueueAge",
        "SegqItemFailureRate",
        "SegqWebhooksOverdue",
        "SegqWorkerAbsent",
        "SegqStorageErrors",
        "SegqWorkersPaused",
    } <= set(alerts)
    api_names = set(re.findall(r"^(segq_\w+)", client.get("/metrics").get_data(as_text=True), re.M))
    served = api_names | worker_metric_names()
    for name, rule in alerts.items():
        used = set(re.findall(r"segq_\w+", rule["expr"]))
        assert used <= served, (name, used - served)
        assert rule["labels"]["severity"] in ("page", "ticket")
