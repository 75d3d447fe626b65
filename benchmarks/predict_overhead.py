"""What a predict request through multiserve costs over calling onnxruntime in-process.

    python benchmarks/predict_overhead.py [--requests 2000]

Everything runs on 127.0.0.1 with one keep-alive client sending one batch-1 request at a time:

- in-process: ``onnxruntime.InferenceSession.run`` on ``mlp/2`` with a (1, 4) float32 input;
- multiserve: ``POST /models/mlp/2/predict`` with a JSON body, and with an ``.npy`` body;
- floor: a bare starlette app on uvicorn that answers with as many bytes as multiserve's JSON
  answer, to show how much of the cost is HTTP itself.

Every answer is checked: status 200, and a prediction equal to the in-process output. Prints a
table and writes ``benchmarks/results/predict_overhead.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

if __package__ in (None, ""):
    # Run as a script: make `benchmarks` and `examples` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    BenchmarkError,
    Deadline,
    display_path,
    free_port,
    package_versions,
    write_json,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "predict_overhead.json"
MODEL_NAME = "mlp"
MODEL_VERSION = 2
INPUT_NAME = "x"
OUTPUT_NAME = "probabilities"
FEATURES = 4
PREDICT_PATH = f"/models/{MODEL_NAME}/{MODEL_VERSION}/predict"
JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"
# Distinct inputs, cycled through, so that no layer can answer from a cache of one request.
INPUT_POOL = 64
REQUEST_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
PACKAGES = (
    "multiserve",
    "onnxruntime",
    "starlette",
    "uvicorn",
    "numpy",
    "orjson",
    "uvloop",
    "httptools",
)

Float32Array = npt.NDArray[np.float32]
# (input index, status, body) -> None, or AssertionError
AnswerCheck = Callable[[int, int, bytes], None]


@dataclass(frozen=True, slots=True)
class Latency:
    median_us: float
    p99_us: float
    samples: int

    @classmethod
    def from_ns(cls, samples_ns: Sequence[int]) -> Latency:
        median, p99 = np.percentile(np.asarray(samples_ns, dtype=np.float64), [50, 99]) / 1e3
        return cls(
            median_us=round(float(median), 2), p99_us=round(float(p99), 2), samples=len(samples_ns)
        )


@dataclass(frozen=True, slots=True)
class Target:
    """One measured HTTP endpoint: the request bodies cycled through (body ``i`` is input
    ``i % INPUT_POOL``), the headers sent with each, and how each answer is checked."""

    name: str
    connection: http.client.HTTPConnection
    bodies: tuple[bytes, ...]
    headers: dict[str, str]
    check: AnswerCheck


class ServerFailed(RuntimeError):
    """A server exited, or never became ready; the message holds the end of its output."""


def main(argv: Sequence[str] | None = None) -> int:
    command_args = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(command_args)
    if args.floor_server is not None:
        serve_floor(args.floor_server, args.floor_body_bytes)
        return 0
    for flag in ("requests", "warmup", "rounds", "baseline_calls"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1")
    if args.rounds > args.requests:
        raise SystemExit("--rounds cannot be more than --requests")
    try:
        results = run_benchmark(args, command_args)
    except (BenchmarkError, ServerFailed) as exc:
        print(f"predict_overhead: {exc}", file=sys.stderr)
        return 1
    print_table(results)
    write_json(args.output, results)
    print(f"\nwrote {display_path(args.output)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="timed requests per HTTP target (default 2000)"
    )
    parser.add_argument(
        "--warmup", type=int, default=200, help="untimed requests per target first (default 200)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="the HTTP targets take turns in this many rounds, so that a burst of noise on a "
        "shared machine lands on all of them (default 5)",
    )
    parser.add_argument(
        "--baseline-calls",
        type=int,
        default=5000,
        help="timed in-process InferenceSession.run calls (default 5000)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for each server to answer /readyz (default 60)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=110.0,
        help="give up if the whole run takes longer than this (default 110)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_PATH,
        help=f"results file (default {display_path(RESULTS_PATH)})",
    )
    # The floor server is this script run again, in a subprocess.
    parser.add_argument("--floor-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--floor-body-bytes", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def run_benchmark(args: argparse.Namespace, command_args: Sequence[str]) -> dict[str, Any]:
    deadline = Deadline(args.max_seconds)
    load_at_start = os.getloadavg()
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(1, FEATURES)).astype(np.float32) for _ in range(INPUT_POOL)]
    json_bodies = tuple(json.dumps({"inputs": x.tolist()}).encode() for x in inputs)
    npy_bodies = tuple(encode_npy(x) for x in inputs)

    # Exits in reverse: the servers stop before their models' directory is removed.
    with (
        tempfile.TemporaryDirectory(prefix="multiserve-bench-") as workdir,
        contextlib.ExitStack() as servers,
    ):
        models = Path(workdir) / "models"
        print(f"building the example models in {models} ...", flush=True)
        build_models(models)

        print("timing InferenceSession.run in-process ...", flush=True)
        model_path = models / MODEL_NAME / str(MODEL_VERSION) / "model.onnx"
        baseline, expected = time_in_process(
            model_path, inputs, args.baseline_calls, args.warmup, deadline
        )

        port = free_port()
        server_argv = [sys.executable, "-m", "multiserve", "serve", "--models", str(models)]
        server_argv += ["--port", str(port), "--grpc-port", "0", "--log-level", "warning"]
        print(f"starting multiserve on 127.0.0.1:{port} ...", flush=True)
        connection = launch(
            servers, server_argv, port, Path(workdir) / "multiserve.log", args, deadline
        )
        json_target = Target(
            "multiserve JSON",
            connection,
            json_bodies,
            {"Content-Type": JSON_TYPE},
            lambda index, status, body: check_json(status, body, expected[index % INPUT_POOL]),
        )
        npy_target = Target(
            "multiserve .npy",
            connection,
            npy_bodies,
            {"Content-Type": NPY_TYPE, "Accept": NPY_TYPE},
            lambda index, status, body: check_npy(status, body, expected[index % INPUT_POOL]),
        )
        # The first predict loads the model: reported on its own, outside the timed figures.
        first_ns, status, body = send(json_target, 0)
        json_target.check(0, status, body)
        json_answers = warm_up(json_target, args.warmup, deadline)
        warm_up(npy_target, args.warmup, deadline)

        floor_bytes = round(float(np.median([len(body) for body in json_answers])))
        port = free_port()
        floor_argv = [sys.executable, str(Path(__file__).resolve()), "--floor-server", str(port)]
        floor_argv += ["--floor-body-bytes", str(floor_bytes)]
        print(f"starting the bare-HTTP floor on 127.0.0.1:{port} ...", flush=True)
        floor_target = Target(
            "bare HTTP floor",
            launch(servers, floor_argv, port, Path(workdir) / "floor.log", args, deadline),
            json_bodies,
            {"Content-Type": JSON_TYPE},
            lambda index, status, body: check_floor(status, body, floor_bytes),
        )
        warm_up(floor_target, args.warmup, deadline)

        print(f"timing {args.requests} requests per target in {args.rounds} rounds ...", flush=True)
        timed = time_http([json_target, npy_target, floor_target], args, deadline)

    figures = {
        "in_process": baseline,
        "multiserve_json": timed[json_target.name],
        "multiserve_npy": timed[npy_target.name],
        "bare_http_floor": timed[floor_target.name],
    }
    return {
        "benchmark": "predict_overhead",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", display_path(Path(__file__)), *command_args]),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "load_average_at_start": [round(load, 2) for load in load_at_start],
            "load_average_at_end": [round(load, 2) for load in os.getloadavg()],
        },
        "versions": package_versions(PACKAGES),
        "settings": {
            "requests": args.requests,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "baseline_calls": args.baseline_calls,
            "max_seconds": args.max_seconds,
            "model": f"{MODEL_NAME}/{MODEL_VERSION}",
            "input_shape": [1, FEATURES],
            "input_dtype": "float32",
            "distinct_inputs": INPUT_POOL,
            "in_process_session": "InferenceSession defaults, CPUExecutionProvider",
            "client": "http.client.HTTPConnection, keep-alive, one request at a time",
            "server_command": display_command(server_argv, models),
            "floor_command": display_command(floor_argv, models),
            "json_request_bytes": round(float(np.median([len(b) for b in json_bodies]))),
            "npy_request_bytes": len(npy_bodies[0]),
            "floor_response_bytes": floor_bytes,
        },
        "results": {name: dataclasses.asdict(latency) for name, latency in figures.items()}
        | {"multiserve_first_request_ms": round(first_ns / 1e6, 2)},
        "ratios": {
            f"{name}_over_{base}": round(figures[name].median_us / figures[base].median_us, 3)
            for base in ("in_process", "bare_http_floor")
            for name in ("multiserve_json", "multiserve_npy", "bare_http_floor")
            if name != base
        },
    }


def build_models(root: Path) -> None:
    from examples.make_models import write_examples

    write_examples(root)


def time_in_process(
    model_path: Path,
    inputs: Sequence[Float32Array],
    calls: int,
    warmup: int,
    deadline: Deadline,
) -> tuple[Latency, list[Float32Array]]:
    """The latency of ``session.run`` alone, and each input's output to check the servers by."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = [np.asarray(session.run(None, {INPUT_NAME: x})[0], dtype=np.float32) for x in inputs]
    for index in range(warmup):
        session.run(None, {INPUT_NAME: inputs[index % len(inputs)]})
    samples: list[int] = []
    for index in range(calls):
        feed = {INPUT_NAME: inputs[index % len(inputs)]}
        started = time.perf_counter_ns()
        session.run(None, feed)
        samples.append(time.perf_counter_ns() - started)
        if index % 256 == 0:
            deadline.check("timing InferenceSession.run")
    return Latency.from_ns(samples), expected


def time_http(
    targets: Sequence[Target], args: argparse.Namespace, deadline: Deadline
) -> dict[str, Latency]:
    """``args.requests`` timed requests to each target, the targets taking turns in
    ``args.rounds`` rounds. Answers are checked after the clock stops."""
    samples: dict[str, list[int]] = {target.name: [] for target in targets}
    answers: dict[str, list[tuple[int, bytes]]] = {target.name: [] for target in targets}
    for round_index in range(args.rounds):
        count = args.requests // args.rounds + (round_index < args.requests % args.rounds)
        for target in targets:
            for _ in range(count):
                elapsed, status, body = send(target, len(samples[target.name]))
                samples[target.name].append(elapsed)
                answers[target.name].append((status, body))
            deadline.check(f"timing {target.name}")
    for target in targets:
        for index, (status, body) in enumerate(answers[target.name]):
            target.check(index, status, body)
    return {name: Latency.from_ns(values) for name, values in samples.items()}


def warm_up(target: Target, count: int, deadline: Deadline) -> list[bytes]:
    """``count`` untimed requests, their answers checked; returns the answers' bodies."""
    bodies = []
    for index in range(count):
        _, status, body = send(target, index)
        target.check(index, status, body)
        bodies.append(body)
        deadline.check(f"warming up {target.name}")
    return bodies


def send(target: Target, index: int) -> tuple[int, int, bytes]:
    """One request with input ``index % INPUT_POOL``: (nanoseconds, status, body)."""
    body = target.bodies[index % len(target.bodies)]
    started = time.perf_counter_ns()
    target.connection.request("POST", PREDICT_PATH, body, target.headers)
    response = target.connection.getresponse()
    content = response.read()
    return time.perf_counter_ns() - started, response.status, content


def check_json(status: int, body: bytes, expected: Float32Array) -> None:
    if status != 200:
        raise AssertionError(f"multiserve answered a JSON predict with {status}: {body[:300]!r}")
    payload = json.loads(body)
    if payload["model_name"] != MODEL_NAME or payload["model_version"] != str(MODEL_VERSION):
        raise AssertionError(f"multiserve answered for another model: {body[:300]!r}")
    got = np.asarray(payload["outputs"][OUTPUT_NAME], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)


def check_npy(status: int, body: bytes, expected: Float32Array) -> None:
    if status != 200:
        raise AssertionError(f"multiserve answered an .npy predict with {status}: {body[:300]!r}")
    got = np.load(io.BytesIO(body), allow_pickle=False)
    if got.dtype != np.float32:
        raise AssertionError(f"expected a float32 .npy answer, got {got.dtype}")
    np.testing.assert_array_equal(got, expected)


def check_floor(status: int, body: bytes, size: int) -> None:
    if status != 200 or len(body) != size:
        raise AssertionError(f"the floor server answered {status} with {len(body)} bytes")


def encode_npy(array: Float32Array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def launch(
    servers: contextlib.ExitStack,
    argv: Sequence[str],
    port: int,
    log_path: Path,
    args: argparse.Namespace,
    deadline: Deadline,
) -> http.client.HTTPConnection:
    """Start a server whose ``stop`` is registered on ``servers``, wait until it is ready, and
    return a keep-alive connection to it (closed by ``servers`` too)."""
    # Output goes to a file, not a pipe, so that a chatty server never blocks on a full pipe.
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    servers.callback(stop, process)
    wait_ready(process, port, log_path, min(args.ready_timeout, deadline.remaining()))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    servers.callback(connection.close)
    return connection


def wait_ready(
    process: subprocess.Popen[bytes], port: int, log_path: Path, timeout_s: float
) -> None:
    give_up = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ServerFailed(
                f"the server exited with status {process.returncode} before it was ready:\n"
                + log_tail(log_path)
            )
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            probe.request("GET", "/readyz")
            if probe.getresponse().status == 200:
                return
        except OSError:
            pass  # not listening yet
        finally:
            probe.close()
        if time.monotonic() > give_up:
            raise ServerFailed(
                f"the server on port {port} was not ready within {timeout_s:g} s:\n"
                + log_tail(log_path)
            )
        time.sleep(0.05)


def log_tail(log_path: Path) -> str:
    text = log_path.read_text(errors="replace")
    return text[-3000:] if text else "(the server wrote nothing)"


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def serve_floor(port: int, body_bytes: int) -> None:
    """The bare-HTTP floor: multiserve's server stack (uvicorn with the same defaults, starlette
    routing) reading the request body and answering fixed bytes with multiserve's headers."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    answer = b"0" * body_bytes
    headers = {"X-Model-Name": MODEL_NAME, "X-Model-Version": str(MODEL_VERSION)}

    async def predict(request: Request) -> Response:
        await request.body()
        return Response(answer, media_type=JSON_TYPE, headers=headers)

    async def readyz(request: Request) -> Response:
        return Response(b'{"status":"ready"}', media_type=JSON_TYPE)

    app = Starlette(
        routes=[
            Route(PREDICT_PATH, predict, methods=["POST"]),
            Route("/readyz", readyz, methods=["GET"]),
        ]
    )
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_config=None, log_level="warning", access_log=False
    )


def print_table(results: dict[str, Any]) -> None:
    figures = results["results"]
    baseline = figures["in_process"]["median_us"]
    floor = figures["bare_http_floor"]["median_us"]
    machine = results["machine"]
    print(
        f"\n{machine['platform']}, {machine['cpu_count']} CPUs, Python {machine['python']}, "
        f"1-minute load average {machine['load_average_at_start'][0]:.2f} at start"
    )
    print(f"{'':<36}{'samples':>8}{'median us':>11}{'p99 us':>10}{'x in-proc':>11}{'x floor':>9}")
    for label, name in (
        ("in-process InferenceSession.run", "in_process"),
        ("multiserve, JSON body", "multiserve_json"),
        ("multiserve, .npy body", "multiserve_npy"),
        ("bare HTTP floor (starlette+uvicorn)", "bare_http_floor"),
    ):
        row = figures[name]
        median = row["median_us"]
        print(
            f"{label:<36}{row['samples']:>8}{median:>11.1f}{row['p99_us']:>10.1f}"
            f"{median / baseline:>11.1f}{median / floor:>9.2f}"
        )
    cold_ms = figures["multiserve_first_request_ms"]
    print(f"first predict to multiserve (loads the model): {cold_ms:.1f} ms")


def display_command(argv: Sequence[str], models: Path) -> str:
    shown = {sys.executable: "python", str(models): "MODELS"}
    shown[str(Path(__file__).resolve())] = display_path(Path(__file__))
    return " ".join(shown.get(arg, arg) for arg in argv)


if __name__ == "__main__":
    raise SystemExit(main())
