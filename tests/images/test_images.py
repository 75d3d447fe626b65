"""The images, built and run for real with podman: the model-load image serving a mounted
repository and an S3 bucket (moto on loopback), the model-in-image image serving its bundle,
each checked over HTTP, then stopped with SIGTERM.

Slow (a base image, a build), so out of the default run: ``make images-check`` runs it, and CI
does (``.ci/run``). The images are built from deploy/image/Dockerfile and Dockerfile.bundle as a
user builds them; only the base image differs (BASE_IMAGE, made with debootstrap by
deploy/image/base-image.sh, since no registry can be pulled from here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from moto.server import ThreadedMotoServer

from examples.make_models import write_examples
from tests.helpers import require_tool, wait_for
from tests.integration.test_cli import free_port

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = ROOT / "deploy" / "image"
BASE_IMAGE = os.environ.get("MULTISERVE_BASE_IMAGE", "localhost/multiserve-base:bookworm")
# "onnx python" keeps the check within its CI budget (no torch); "onnx torch python" builds and
# checks the full image.
BACKENDS = os.environ.get("MULTISERVE_IMAGE_BACKENDS", "onnx python")
TORCH = "torch" in BACKENDS.split()
ONNX_MODELS = ("mlp", "adder", "counter")
# mlp version 1 (not the latest, 2) is bundled, so an answer shows which version was frozen.
BUNDLED = ("mlp:1", "adder", "counter", *(("scaler", "regressor") if TORCH else ()))
X = [[5.1, 3.5, 1.4, 0.2], [6.2, 3.4, 5.4, 2.3]]
# On every image and container the check makes, so that leftovers can be found and removed.
LABEL = "multiserve.check=1"

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("MULTISERVE_IMAGES") != "1",
        reason="builds and runs container images: run `make images-check`",
    ),
    pytest.mark.timeout(900),
]


def step(message: str, started: float) -> None:
    print(f"[images] {message} ({time.monotonic() - started:.1f} s)", flush=True)


class Podman:
    """podman as root on a host without systemd: cgroupfs, no default ulimits, runc, and the
    host's network (no CNI setup needed)."""

    def __init__(self) -> None:
        self.path = require_tool("podman")
        require_tool("runc")
        conf = os.environ.get("CONTAINERS_CONF") or str(IMAGE_DIR / "containers.conf")
        self.env = {**os.environ, "CONTAINERS_CONF": conf}

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(
                [self.path, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"podman {' '.join(args[:2])} timed out after {timeout} s: {exc.stderr!r}")
        if check and result.returncode != 0:
            pytest.fail(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def build(self, tag: str, context: Path, dockerfile: Path, **build_args: str) -> None:
        arguments = [f"--build-arg={key}={value}" for key, value in build_args.items()]
        self(
            "build",
            "--runtime=runc",
            "--network=host",
            "--format=docker",  # OCI images have no HEALTHCHECK
            "--pull=never",
            "--layers=false",  # no intermediate images left behind
            "--quiet",
            f"--label={LABEL}",
            f"--file={dockerfile}",
            f"--tag={tag}",
            *arguments,
            str(context),
            timeout=600,
        )

    def inspect(self, image: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(self("image", "inspect", image).stdout)
        return found[0]


class Container:
    def __init__(self, podman: Podman, image: str, *flags: str, **env: str) -> None:
        self.podman = podman
        self.name = f"multiserve-check-{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"MULTISERVE_PORT": str(self.port), "MULTISERVE_ADMIN_TOKEN": "check", **env}
        settings = [f"--env={key}={value}" for key, value in env.items()]
        self.podman(
            "run",
            "--detach",
            f"--name={self.name}",
            "--runtime=runc",
            "--network=host",
            f"--label={LABEL}",
            *settings,
            *flags,
            image,
        )

    def running(self) -> bool:
        state = self.podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def wait_ready(self, timeout: float = 90) -> float:
        started = time.monotonic()
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if not self.running():
                pytest.fail(f"container {self.name} exited before it was ready:\n{self.logs()}")
            if time.monotonic() - started > timeout:
                pytest.fail(f"container {self.name} not ready after {timeout} s:\n{self.logs()}")
            time.sleep(0.2)

    def exit_code(self, timeout: float = 60) -> int:
        return int(self.podman("wait", self.name, timeout=timeout).stdout.strip())

    def terminate(self) -> int:
        """SIGTERM, as `docker stop` and Kubernetes send it; the exit status."""
        self.podman("kill", "--signal=SIGTERM", self.name)
        return self.exit_code()

    def remove(self) -> None:
        self.podman("rm", "--force", "--time=0", self.name, check=False)


@pytest.fixture(scope="module")
def podman() -> Podman:
    found = Podman()
    # What a run that was killed left behind (an hour old, so never a run going on now).
    stale = [f"--filter=label={LABEL}", "--filter=until=1h"]
    found("container", "prune", "--force", *stale, check=False)
    found("image", "prune", "--all", "--force", *stale, check=False)
    return found


@pytest.fixture(scope="module")
def server_image(podman: Podman) -> Iterator[str]:
    started = time.monotonic()
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        require_tool("debootstrap")
        made = subprocess.run(
            [str(IMAGE_DIR / "base-image.sh"), BASE_IMAGE],
            capture_output=True,
            text=True,
            timeout=600,
            env=podman.env,
            check=False,
        )
        assert made.returncode == 0, made.stdout + made.stderr
        step(f"base image {BASE_IMAGE} made with debootstrap", started)
    wheels = subprocess.run(
        [str(IMAGE_DIR / "wheelhouse.sh"), BACKENDS],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert wheels.returncode == 0, wheels.stdout + wheels.stderr
    step(f"wheelhouse for {BACKENDS!r} filled", started)
    tag = f"localhost/multiserve-check:{uuid.uuid4().hex[:10]}"
    podman.build(
        tag,
        ROOT,
        IMAGE_DIR / "Dockerfile",
        BASE_IMAGE=BASE_IMAGE,
        BACKENDS=BACKENDS,
        PIP_NO_INDEX="1",
    )
    step(f"model-load image {tag} built: {podman.inspect(tag)['Size'] / 1e6:.0f} MB", started)
    yield tag
    podman("rmi", "--force", tag, check=False)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models, readable by the image's user (10001)."""
    root = tmp_path_factory.mktemp("repository")
    write_examples(root)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@pytest.fixture(scope="module")
def bundle_image(
    podman: Podman, server_image: str, repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    started = time.monotonic()
    bundle = tmp_path_factory.mktemp("bundle") / "bundle"
    only = [f"--only={selector}" for selector in BUNDLED]
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "multiserve",
            "bundle",
            f"--models={repository}",
            f"--out={bundle}",
            *only,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    tag = f"localhost/multiserve-check-bundle:{uuid.uuid4().hex[:10]}"
    podman.build(tag, bundle, IMAGE_DIR / "Dockerfile.bundle", SERVER_IMAGE=server_image)
    step(f"model-in-image image {tag} built", started)
    yield tag
    podman("rmi", "--force", tag, check=False)


@pytest.fixture
def containers(podman: Podman) -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()


def expected_mlp(repository: Path, version: int) -> np.ndarray:
    session = ort.InferenceSession(
        str(repository / "mlp" / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    result: np.ndarray = session.run(None, {"x": np.asarray(X, np.float32)})[0]
    return result


def check_predictions(url: str, repository: Path, version: int) -> None:
    # Files just written settle for a second; a bucket's version is complete once two listings
    # a poll apart agree on it. Until then a request would get 503 and Retry-After.
    wait_for(lambda: complete(url, "mlp", str(version)), 30, f"mlp {version} to settle")
    wait_for(lambda: complete(url, "adder", "1"), 30, "adder 1 to settle")
    with httpx.Client(base_url=url, timeout=30) as client:
        native = client.post("/models/mlp/predict", json={"inputs": X})
        assert native.status_code == 200, native.text
        assert native.json()["model_version"] == str(version)
        np.testing.assert_allclose(
            native.json()["outputs"]["probabilities"], expected_mlp(repository, version), rtol=1e-6
        )
        v2 = client.post(
            "/v2/models/adder/infer",
            json={
                "inputs": [
                    {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
                    {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [10, 20, 30]},
                ]
            },
        )
        assert v2.status_code == 200, v2.text
        outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
        assert outputs["sum"] == [11, 22, 33]


def complete(url: str, name: str, version: str) -> bool:
    model = httpx.get(f"{url}/models/{name}", timeout=5)
    if model.status_code != 200 or model.json()["latest"] != version:
        return False
    states = {v["version"]: v["state"] for v in model.json()["versions"]}
    return states.get(version) not in (None, "settling")


def check_sigterm(container: Container) -> None:
    status = container.terminate()
    logs = container.logs()
    # uvicorn drains and exits; as PID 1 its re-raised SIGTERM is ignored, so the status is 0.
    assert status == 0, logs
    assert "Application shutdown complete" in logs


def test_the_model_load_image_is_slim_non_root_and_complete(
    podman: Podman, server_image: str
) -> None:
    image = podman.inspect(server_image)
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["StopSignal"] == "SIGTERM"
    # podman keeps the (Docker-format) HEALTHCHECK beside the OCI config.
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"])
    assert "MULTISERVE_HOST=0.0.0.0" in config["Env"]
    probe = "import importlib.util as u; print(sorted(m for m in ('torch', 'onnxruntime', "
    probe += "'pip') if u.find_spec(m)))"
    found = podman(
        "run",
        "--rm",
        "--runtime=runc",
        "--network=host",
        "--entrypoint=python3",
        server_image,
        "-c",
        probe,
    ).stdout.strip()
    expected = ["onnxruntime", *(["torch"] if TORCH else [])]
    assert found == str(sorted(expected))  # and no pip: the venv holds the server and no tools


def test_the_model_load_image_serves_a_mounted_repository(
    podman: Podman, server_image: str, repository: Path, containers: list[Container]
) -> None:
    container = Container(podman, server_image, f"--volume={repository}:/models:ro")
    containers.append(container)
    container.wait_ready()
    check_predictions(container.url, repository, version=2)
    if not TORCH:
        torch_model = httpx.post(f"{container.url}/models/scaler/predict", json={"inputs": X})
        assert torch_model.status_code == 503
        assert "pip install multiserve-torch" in torch_model.text
    health = podman("healthcheck", "run", container.name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    check_sigterm(container)


def test_the_model_load_image_serves_an_s3_bucket(
    podman: Podman, server_image: str, repository: Path, containers: list[Container]
) -> None:
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    try:
        endpoint = f"http://127.0.0.1:{s3.get_host_and_port()[1]}"
        credentials = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket="models")
        for name in ONNX_MODELS:
            for path in (repository / name).rglob("*"):
                if path.is_file():
                    client.upload_file(str(path), "models", path.relative_to(repository).as_posix())
        container = Container(
            podman,
            server_image,
            MULTISERVE_MODELS="s3://models",
            MULTISERVE_BUCKET_ENDPOINT=endpoint,
            MULTISERVE_BUCKET_ALLOW_HTTP="true",
            MULTISERVE_POLL_INTERVAL_S="1",
            **credentials,
        )
        containers.append(container)
        container.wait_ready()
        check_predictions(container.url, repository, version=2)
        assert "downloaded mlp version 2" in container.logs()
        check_sigterm(container)
    finally:
        s3.stop()


def test_the_model_in_image_image_serves_its_bundle_read_only(
    podman: Podman, bundle_image: str, repository: Path, containers: list[Container]
) -> None:
    # A read-only root file system: the bundle, the code, everything but /tmp.
    container = Container(podman, bundle_image, "--read-only")
    containers.append(container)
    container.wait_ready()
    check_predictions(container.url, repository, version=1)
    models = httpx.get(f"{container.url}/models").json()["models"]
    assert sorted(m["name"] for m in models) == sorted(s.split(":")[0] for s in BUNDLED)
    logs = container.logs()
    assert "match their checksums" in logs
    check_sigterm(container)


def test_the_model_in_image_image_refuses_a_changed_model(
    podman: Podman, bundle_image: str, repository: Path, containers: list[Container]
) -> None:
    # Someone swaps a model file inside the image (here: a file mounted over it).
    swapped = repository / "mlp" / "2" / "model.onnx"
    container = Container(
        podman, bundle_image, f"--volume={swapped}:/bundle/models/mlp/1/model.onnx:ro"
    )
    containers.append(container)
    assert container.exit_code() == 2
    logs = container.logs()
    assert "models/mlp/1/model.onnx: checksum mismatch" in logs
    assert "Uvicorn running" not in logs
