"""Section 1: small-model throughput and latency under wrk, batch 1, JSON and .npy bodies.

multiserve against (a) the HTTP floor, a bare starlette endpoint on the same uvicorn answering
bytes of the same size, and (b) the peers, MLServer and LitServe, serving the same ONNX model
with minimal onnxruntime wrappers. Every server runs at once; the ones not being measured are
paused (SIGSTOP), and the targets take turns in rounds so that noise from other tenants lands on
all of them. Every server's answer is checked against in-process onnxruntime before it is timed.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks import models, peers, wrk
from benchmarks.harness import (
    REPO_ROOT,
    BenchmarkError,
    ServerProcess,
    call,
    free_port,
    median,
    only_running,
    start_server,
)
from benchmarks.suite import (
    JSON_HEADERS,
    NPY_HEADERS,
    Context,
    display_argv,
    ratio,
    start_multiserve,
    wait_until_ok,
)

MODEL = "mlp"
OUTPUT = "probabilities"
PREDICT_PATH = f"/models/{MODEL}/1/predict"
FLOOR_SCRIPT = REPO_ROOT / "benchmarks" / "floor.py"
# Dynamic batching for the second multiserve configuration: at most as many rows as there are
# connections, so that a batch is whatever the clients sent while the previous call ran.
BATCH_ROWS = 16
# The multiserve configurations measured: default settings, and dynamic batching.
CONFIGS = ("multiserve", "multiserve_batched")

# (status, body, input index) -> None, or AssertionError
Check = Callable[[int, bytes, int], None]


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    label: str
    server: ServerProcess
    load: wrk.Load


def run(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    root = ctx.subdir("throughput")
    repository = root / "models"
    model_path = models.write_mlp(repository / MODEL / "1" / "model.onnx")
    xs = models.inputs(models.MLP_FEATURES)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = [np.asarray(session.run(None, {"x": x})[0]) for x in xs]

    json_load = wrk.Load(PREDICT_PATH, tuple(models.json_body(x) for x in xs), JSON_HEADERS)
    npy_load = wrk.Load(PREDICT_PATH, tuple(models.npy_body(x) for x in xs), NPY_HEADERS)

    ctx.log("throughput: starting multiserve")
    multiserve = start_multiserve(ctx, repository)
    json_size = _check_all(multiserve, json_load, _json_check(expected, "model_version"))
    npy_size = _check_all(multiserve, npy_load, _npy_check(expected))
    # The same model with dynamic batching turned on in its config.toml, as a user serving a
    # small model to many clients would: requests waiting together share one model call.
    batched_repository = root / "models-batched"
    shutil.copytree(repository, batched_repository)
    (batched_repository / MODEL / "config.toml").write_text(f"max_batch_size = {BATCH_ROWS}\n")
    batched = start_multiserve(ctx, batched_repository, name="multiserve-batched")
    for check_load, check in (
        (json_load, _json_check(expected, "model_version")),
        (npy_load, _npy_check(expected)),
    ):
        _check_all(batched, check_load, check)
        # Answers of requests that shared a call must be those of one-by-one runs too.
        _check_concurrently(batched, check_load, check, plan.connections)

    ctx.log("throughput: starting the HTTP floor")
    floor_port = free_port()
    floor_argv = [sys.executable, str(FLOOR_SCRIPT), "--port", str(floor_port)]
    floor_argv += ["--json-bytes", str(json_size), "--npy-bytes", str(npy_size)]
    floor = start_server(
        "floor", floor_argv, floor_port, ctx.subdir("logs"), "/readyz", ctx.deadline
    )
    ctx.stack.callback(floor.stop)
    _check_all(floor, json_load, _size_check(json_size))
    _check_all(floor, npy_load, _size_check(npy_size))

    targets = [
        Target("floor_json", "HTTP floor, JSON-sized answer", floor, json_load),
        Target("floor_npy", "HTTP floor, .npy-sized answer", floor, npy_load),
        Target("multiserve_json", "multiserve, JSON body", multiserve, json_load),
        Target("multiserve_npy", "multiserve, .npy body", multiserve, npy_load),
        Target(
            "multiserve_batched_json",
            f"multiserve, max_batch_size = {BATCH_ROWS}, JSON body",
            batched,
            json_load,
        ),
        Target(
            "multiserve_batched_npy",
            f"multiserve, max_batch_size = {BATCH_ROWS}, .npy body",
            batched,
            npy_load,
        ),
    ]
    peer_records: dict[str, Any] = {}
    for peer_target, record in (
        _start_mlserver(ctx, model_path, xs, expected),
        _start_litserve(ctx, model_path, xs, expected),
    ):
        peer_records[record["name"]] = record
        if peer_target is not None:
            targets.append(peer_target)

    servers = list({id(t.server): t.server for t in targets}.values())
    runs: dict[str, list[wrk.WrkResult]] = {t.key: [] for t in targets}
    for target in targets:
        ctx.deadline.check("warming up the throughput targets")
        with only_running(target.server, servers):
            wrk.run(
                target.server.port,
                target.load,
                duration_s=plan.warmup_s,
                connections=plan.connections,
                threads=plan.wrk_threads,
            )
    for round_index in range(plan.rounds):
        # Rotated each round, so that no target always runs right after the same one.
        shift = round_index % len(targets)
        for target in targets[shift:] + targets[:shift]:
            ctx.deadline.check("timing the throughput targets")
            with only_running(target.server, servers):
                result = wrk.run(
                    target.server.port,
                    target.load,
                    duration_s=plan.run_s,
                    connections=plan.connections,
                    threads=plan.wrk_threads,
                )
            runs[target.key].append(result)
            summary = result.summary()
            ctx.log(
                f"throughput: round {round_index + 1}/{plan.rounds} {target.key}: "
                f"{summary['requests_per_s']:.0f} req/s, p99 {summary['p99_ms']:.2f} ms, "
                f"failed {summary['failed']}"
            )

    figures = {
        t.key: {
            "label": t.label,
            **_medians(runs[t.key]),
            "runs": [r.summary() for r in runs[t.key]],
        }
        for t in targets
    }
    ratios = {}
    for config in CONFIGS:
        for body in ("json", "npy"):
            ratios[f"{config}_{body}_over_floor_{body}"] = ratio(
                figures[f"{config}_{body}"]["requests_per_s"],
                figures[f"floor_{body}"]["requests_per_s"],
            )
        ms_json = figures[f"{config}_json"]
        for peer in ("mlserver", "litserve"):
            if f"{peer}_json" in figures:
                ratios[f"{config}_json_over_{peer}"] = ratio(
                    ms_json["requests_per_s"], figures[f"{peer}_json"]["requests_per_s"]
                )
                ratios[f"{config}_json_p99_over_{peer}_p99"] = ratio(
                    ms_json["p99_ms"], figures[f"{peer}_json"]["p99_ms"]
                )
    return {
        "settings": {
            "model": f"examples.make_models.write_mlp_onnx(seed=2): x float32 [1, 4] -> "
            f"{OUTPUT} [1, 3]",
            "batch": 1,
            "distinct_inputs": len(xs),
            "json_request_bytes": len(json_load.bodies[0]),
            "npy_request_bytes": len(npy_load.bodies[0]),
            "json_answer_bytes": json_size,
            "npy_answer_bytes": npy_size,
            "rounds": plan.rounds,
            "run_s": plan.run_s,
            "warmup_s": plan.warmup_s,
            "wrk": f"-t{plan.wrk_threads} -c{plan.connections} -d{plan.run_s}s",
            "idle_servers": "paused with SIGSTOP while another target is measured",
            "multiserve_command": display_argv(
                multiserve.argv, {str(repository): "MODELS", str(model_path): "MODEL"}
            ),
            "multiserve_batched": f"the same command on a copy of MODELS whose "
            f"{MODEL}/config.toml sets max_batch_size = {BATCH_ROWS}",
            "floor_command": display_argv(floor.argv, {str(FLOOR_SCRIPT): "benchmarks/floor.py"}),
        },
        "peers": peer_records,
        "figures": figures,
        "ratios": ratios,
    }


def _medians(results: list[wrk.WrkResult]) -> dict[str, Any]:
    summaries = [r.summary() for r in results]
    return {
        "requests_per_s": round(median([s["requests_per_s"] for s in summaries]), 1),
        "p50_ms": round(median([s["p50_ms"] for s in summaries]), 3),
        "p90_ms": round(median([s["p90_ms"] for s in summaries]), 3),
        "p99_ms": round(median([s["p99_ms"] for s in summaries]), 3),
        "failed": sum(s["failed"] for s in summaries),
    }


def _check_all(server: ServerProcess, load: wrk.Load, check: Check) -> int:
    """Send every body of ``load`` once and check each answer; the answers' median size."""
    sizes = []
    wait_until_ok(server.port, load.path, load.bodies[0], load.headers, 60.0, server)
    for index, body in enumerate(load.bodies):
        answer = call(server.port, "POST", load.path, body, load.headers)
        try:
            check(answer.status, answer.body, index)
        except AssertionError as exc:
            raise BenchmarkError(f"{server.name} answered wrongly: {exc}") from exc
        sizes.append(len(answer.body))
    return int(np.median(sizes))


def _check_concurrently(server: ServerProcess, load: wrk.Load, check: Check, clients: int) -> None:
    """Send every body of ``load`` from ``clients`` threads at once, four times over, and check
    each answer (a batching server answers many of them from shared calls)."""

    def ask(index: int) -> None:
        answer = call(server.port, "POST", load.path, load.bodies[index], load.headers)
        try:
            check(answer.status, answer.body, index)
        except AssertionError as exc:
            raise BenchmarkError(f"{server.name} answered wrongly under load: {exc}") from exc

    indices = [i % len(load.bodies) for i in range(4 * len(load.bodies))]
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(ask, indices))


def _json_check(expected: list[np.ndarray[Any, Any]], version_key: str | None) -> Check:
    def check(status: int, body: bytes, index: int) -> None:
        _expect(status == 200, f"status {status}: {body[:300]!r}")
        payload = json.loads(body)
        if version_key is not None:
            _expect(payload[version_key] == "1", f"wrong version: {body[:300]!r}")
        got = np.asarray(payload["outputs"][OUTPUT], dtype=np.float32)
        np.testing.assert_array_equal(got, expected[index])

    return check


def _npy_check(expected: list[np.ndarray[Any, Any]]) -> Check:
    def check(status: int, body: bytes, index: int) -> None:
        _expect(status == 200, f"status {status}: {body[:300]!r}")
        got = np.load(io.BytesIO(body), allow_pickle=False)
        np.testing.assert_array_equal(got, expected[index])

    return check


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _size_check(size: int) -> Check:
    def check(status: int, body: bytes, index: int) -> None:
        _expect(status == 200 and len(body) == size, f"{status} with {len(body)} bytes")

    return check


def _v2_check(expected: list[np.ndarray[Any, Any]]) -> Check:
    def check(status: int, body: bytes, index: int) -> None:
        _expect(status == 200, f"status {status}: {body[:300]!r}")
        output = json.loads(body)["outputs"][0]
        got = np.asarray(output["data"], dtype=np.float32).reshape(expected[index].shape)
        np.testing.assert_array_equal(got, expected[index])

    return check


def _start_mlserver(
    ctx: Context, model_path: Path, xs: list[np.ndarray[Any, Any]], expected: list[Any]
) -> tuple[Target | None, dict[str, Any]]:
    record: dict[str, Any] = {"name": "mlserver", "settings": dict(peers.MLSERVER_SETTINGS)}
    try:
        ctx.log("throughput: preparing MLServer")
        venv = peers.ensure_venv(peers.MLSERVER, ctx.deadline, ctx.subdir("logs"))
        record["versions"] = venv.versions
        record["venv"] = str(venv.path)
        server = peers.start_mlserver(
            venv,
            model_path,
            MODEL,
            ctx.subdir("mlserver"),
            free_port(),
            free_port(),
            free_port(),
            ctx.deadline,
        )
        ctx.stack.callback(server.stop)
        load = wrk.Load(
            f"/v2/models/{MODEL}/infer",
            tuple(models.v2_body(x, "x") for x in xs),
            JSON_HEADERS,
        )
        _check_all(server, load, _v2_check(expected))
    except BenchmarkError as exc:
        record["error"] = str(exc)[-3000:]
        ctx.log(f"throughput: MLServer left out: {str(exc)[:300]}")
        return None, record
    record["request"] = "Open Inference Protocol (V2) JSON, POST /v2/models/mlp/infer"
    return Target("mlserver_json", "MLServer, V2 JSON body", server, load), record


def _start_litserve(
    ctx: Context, model_path: Path, xs: list[np.ndarray[Any, Any]], expected: list[Any]
) -> tuple[Target | None, dict[str, Any]]:
    record: dict[str, Any] = {"name": "litserve", "settings": dict(peers.LITSERVE_SETTINGS)}
    try:
        ctx.log("throughput: preparing LitServe")
        venv = peers.ensure_venv(peers.LITSERVE, ctx.deadline, ctx.subdir("logs"))
        record["versions"] = venv.versions
        record["venv"] = str(venv.path)
        server = peers.start_litserve(
            venv, model_path, ctx.subdir("litserve"), free_port(), ctx.deadline
        )
        ctx.stack.callback(server.stop)
        load = wrk.Load("/predict", tuple(models.json_body(x) for x in xs), JSON_HEADERS)
        _check_all(server, load, _json_check(expected, None))
    except BenchmarkError as exc:
        record["error"] = str(exc)[-3000:]
        ctx.log(f"throughput: LitServe left out: {str(exc)[:300]}")
        return None, record
    record["request"] = 'the same JSON body as multiserve, {"inputs": [[...]]}, POST /predict'
    return Target("litserve_json", "LitServe, JSON body", server, load), record
