"""The peers multiserve is compared with, each installed by the benchmark into its own
virtualenv under /tmp (kept between runs), and started as a server on a free loopback port.

- Seldon MLServer with a minimal onnxruntime runtime (``peer_apps/mlserver_onnx.py``),
  answering the Open Inference Protocol (V2) at ``/v2/models/<name>/infer``.
- Lightning LitServe with a minimal onnxruntime ``LitAPI`` (``peer_apps/litserve_onnx.py``),
  answering ``/predict``.
- Ray Serve with model multiplexing over a directory of models (``peer_apps/ray_serve_onnx.py``,
  ``benchmarks/manymodels.py``), answering ``/models/<name>/<version>/predict``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO_ROOT, BenchmarkError, Deadline, ServerProcess, start_server

VENV_ROOT = Path("/tmp/bench-venvs")
INSTALLED_MARKER = ".multiserve-bench-installed.json"
INSTALL_TIMEOUT_S = 900.0
PEER_APPS = REPO_ROOT / "benchmarks" / "peer_apps"

# How each peer is configured; recorded with the results (see benchmarks/README.md).
MLSERVER_SETTINGS: dict[str, Any] = {
    "debug": False,  # no access log, as multiserve runs
    # Inference in the server process. The default, 1 worker process, does not start with
    # uvloop 0.23 on Python 3.11: "There is no current event loop in thread 'MainThread'".
    "parallel_workers": 0,
}
LITSERVE_SETTINGS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "workers_per_device": 1,
    "fast_queue": False,  # LitServe's default; True (zmq) was not faster here
}


RAY_VERSION = "2.60.0"
RAY_SETTINGS: dict[str, Any] = {
    "num_cpus": 2,  # the local Ray's logical CPUs; this machine has 2 cores
    "num_replicas": 1,
    "replica_num_cpus": 1,
    "include_dashboard": False,
    "max_ongoing_requests": 5,  # Ray's default, not set by the peer app
    # Ray's actors stay in the driver's process group, so that the harness pauses (SIGSTOP)
    # and stops every process of the local Ray by that group.
    "env": {"RAY_process_group_cleanup_enabled": "0"},
}


def constraint(name: str) -> str:
    """``name==version`` as constraints.txt pins it, so that a peer runs the same
    onnxruntime and numpy as multiserve."""
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.strip()
    raise BenchmarkError(f"constraints.txt pins no {name}")


@dataclass(frozen=True, slots=True)
class PeerSpec:
    name: str
    packages: tuple[str, ...]
    imports: tuple[str, ...]
    distributions: tuple[str, ...]


MLSERVER = PeerSpec(
    "mlserver",
    ("mlserver", "onnxruntime", "numpy"),
    ("mlserver", "onnxruntime", "numpy"),
    ("mlserver", "onnxruntime", "numpy", "fastapi", "uvicorn", "uvloop", "orjson"),
)
LITSERVE = PeerSpec(
    "litserve",
    ("litserve", "onnxruntime", "numpy"),
    ("litserve", "onnxruntime", "numpy"),
    ("litserve", "onnxruntime", "numpy", "fastapi", "uvicorn", "uvloop"),
)


def ray_spec() -> PeerSpec:
    return PeerSpec(
        "ray",
        (f"ray[serve]=={RAY_VERSION}", constraint("onnxruntime"), constraint("numpy")),
        ("ray", "ray.serve", "onnxruntime", "numpy"),
        ("ray", "onnxruntime", "numpy", "fastapi", "uvicorn", "starlette"),
    )


@dataclass(frozen=True, slots=True)
class PeerVenv:
    spec: PeerSpec
    path: Path
    versions: dict[str, str]

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def ensure_venv(spec: PeerSpec, deadline: Deadline, log_dir: Path) -> PeerVenv:
    """The peer's virtualenv, created and installed with pip the first time (minutes), reused
    after. Raises BenchmarkError, saying why, if it cannot be installed."""
    path = VENV_ROOT / spec.name
    marker = path / INSTALLED_MARKER
    if marker.is_file() and _imports_ok(path, spec):
        recorded = json.loads(marker.read_text())
        if recorded.get("packages") == list(spec.packages):
            return PeerVenv(spec, path, _versions(path, spec))
    print(f"  installing {', '.join(spec.packages)} into {path} (once; reused after) ...")
    if path.exists():
        shutil.rmtree(path)
    VENV_ROOT.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"pip-{spec.name}.log"
    with log_path.open("w") as log:
        for argv in (
            [_base_python(), "-m", "venv", str(path)],
            [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
            [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", *spec.packages],
        ):
            try:
                completed = subprocess.run(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=deadline.bound(INSTALL_TIMEOUT_S),
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise BenchmarkError(f"installing {spec.name} timed out: {' '.join(argv)}") from exc
            if completed.returncode != 0:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise BenchmarkError(
                    f"installing {spec.name} failed ({' '.join(argv)} exited "
                    f"{completed.returncode}):\n{tail}"
                )
    if not _imports_ok(path, spec):
        raise BenchmarkError(f"{spec.name} installed, but `import {', '.join(spec.imports)}` fails")
    marker.write_text(json.dumps({"packages": list(spec.packages)}))
    return PeerVenv(spec, path, _versions(path, spec))


def _base_python() -> str:
    # A venv made from the interpreter that runs the benchmark, not from its virtualenv.
    return getattr(sys, "_base_executable", sys.executable)


def _imports_ok(path: Path, spec: PeerSpec) -> bool:
    python = path / "bin" / "python"
    if not python.exists():
        return False
    try:
        completed = subprocess.run(
            [str(python), "-c", f"import {', '.join(spec.imports)}"],
            capture_output=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return completed.returncode == 0


def _versions(path: Path, spec: PeerSpec) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, platform\n"
        "out = {'python': platform.python_version()}\n"
        f"for name in {list(spec.distributions)!r}:\n"
        "    try:\n"
        "        out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        out[name] = 'not installed'\n"
        "print(json.dumps(out))\n"
    )
    completed = subprocess.run(
        [str(path / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    versions: dict[str, str] = json.loads(completed.stdout)
    return versions


def start_mlserver(
    venv: PeerVenv,
    model_path: Path,
    model_name: str,
    workdir: Path,
    port: int,
    grpc_port: int,
    metrics_port: int,
    deadline: Deadline,
) -> ServerProcess:
    repository = workdir / "mlserver-repository"
    (repository / model_name).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, repository / model_name / "model.onnx")
    shutil.copyfile(PEER_APPS / "mlserver_onnx.py", repository / "onnx_runtime.py")
    settings = {
        **MLSERVER_SETTINGS,
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
    }
    (repository / "settings.json").write_text(json.dumps(settings, indent=2))
    model_settings = {
        "name": model_name,
        "implementation": "onnx_runtime.OnnxRuntime",
        "parameters": {"uri": "./model.onnx"},
    }
    (repository / model_name / "model-settings.json").write_text(json.dumps(model_settings))
    return start_server(
        "mlserver",
        [str(venv.path / "bin" / "mlserver"), "start", str(repository)],
        port,
        workdir,
        f"/v2/models/{model_name}/ready",
        deadline,
        ready_timeout_s=120.0,
        cwd=repository,
    )


def start_litserve(
    venv: PeerVenv, model_path: Path, workdir: Path, port: int, deadline: Deadline
) -> ServerProcess:
    argv = [str(venv.python), str(PEER_APPS / "litserve_onnx.py")]
    argv += ["--model", str(model_path), "--port", str(port)]
    argv += ["--workers-per-device", str(LITSERVE_SETTINGS["workers_per_device"])]
    if LITSERVE_SETTINGS["fast_queue"]:
        argv.append("--fast-queue")
    cwd = workdir / "litserve"
    cwd.mkdir(parents=True, exist_ok=True)
    return start_server(
        "litserve", argv, port, workdir, "/health", deadline, ready_timeout_s=120.0, cwd=cwd
    )


def start_ray_serve(
    venv: PeerVenv, models: Path, max_models: int, workdir: Path, port: int, deadline: Deadline
) -> ServerProcess:
    """A local Ray (its own temp dir, no dashboard) serving every model under ``models``
    (``<name>/<version>/model.onnx``) through one multiplexed replica holding at most
    ``max_models``. ServerProcess.stop ends the whole Ray: every process is in the group."""
    argv = [str(venv.python), str(PEER_APPS / "ray_serve_onnx.py"), "--models", str(models)]
    argv += ["--port", str(port), "--max-models", str(max_models)]
    argv += ["--num-cpus", str(RAY_SETTINGS["num_cpus"]), "--temp-dir", str(workdir / "ray")]
    cwd = workdir / "ray-serve"
    cwd.mkdir(parents=True, exist_ok=True)
    return start_server(
        "ray serve",
        argv,
        port,
        workdir,
        "/readyz",
        deadline,
        ready_timeout_s=240.0,
        cwd=cwd,
        env=RAY_SETTINGS["env"],
    )
