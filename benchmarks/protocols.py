"""Section 6: the Open Inference Protocol over gRPC against HTTP, on one server, batch 1 and 64.

The same multiserve process answers three forms of the same inference request on the small MLP:
V2 JSON over HTTP, V2 with binary tensors over HTTP (``Inference-Header-Content-Length``; the
output binary too, as tritonclient.http asks with ``binary_data=True``), and gRPC
``ModelInfer`` with ``raw_input_contents`` exactly as ``tritonclient.grpc`` builds it (its own
request builder makes the bytes). HTTP load comes from wrk, gRPC load from h2load (both
compiled; `h2load.py` says why not ghz), 16 connections with one request in flight each.

Two baselines in the same run: the gRPC floor (`grpc_floor.py`: grpcio's asyncio server on
uvicorn's loop answering fixed bytes, no model: what gRPC alone costs) and multiserve with
gRPC off (``--grpc-port 0``), to show what an idle gRPC server costs the HTTP side.
Every form's answers are checked against in-process onnxruntime, bit for bit, before timing;
h2load cannot see gRPC statuses, so every timed gRPC run is checked against the server's own
count of ModelInfer calls by status code.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as tg
from tritonclient.grpc import _utils as tg_utils
from tritonclient.grpc import service_pb2 as pb

from benchmarks import h2load, models, wrk
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
from benchmarks.suite import Context, display_argv, ratio, start_multiserve, wait_until_ok

MODEL = "mlp"
OUTPUT = "probabilities"
V2_PATH = f"/v2/models/{MODEL}/infer"
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
BATCHES = (1, 64)
DISTINCT = 16  # distinct inputs per batch size, cycled through by wrk
FLOOR_SCRIPT = REPO_ROOT / "benchmarks" / "grpc_floor.py"


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    label: str
    server: ServerProcess
    kind: str  # "wrk" or "h2load"
    wrk_load: wrk.Load | None = None
    grpc_port: int = 0
    grpc_body: bytes = b""
    counted: bool = False  # the server counts its gRPC calls (multiserve, not the floor)


def v2_json(x: np.ndarray[Any, Any]) -> bytes:
    return models.v2_body(x, "x")


def v2_binary(x: np.ndarray[Any, Any]) -> tuple[bytes, int]:
    """A V2 request with its tensor, and its output asked for, as binary data; and the length
    of its JSON header."""
    data = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + data, len(header)


def grpc_request(x: np.ndarray[Any, Any]) -> bytes:
    """The ModelInferRequest ``tritonclient.grpc``'s ``infer("mlp", [x])`` sends."""
    tensor = tg.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    request = tg_utils._get_inference_request(
        MODEL, [tensor], "", "", None, 0, False, False, 0, None, None
    )
    data: bytes = request.SerializeToString()
    return data


def run(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    root = ctx.subdir("protocols")
    repository = root / "models"
    model_path = models.write_mlp(repository / MODEL / "1" / "model.onnx")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    ctx.log("protocols: starting multiserve (gRPC on) and multiserve --grpc-port 0")
    grpc_port = free_port()
    server = start_multiserve(ctx, repository, "--grpc-port", str(grpc_port))
    grpc_off = start_multiserve(ctx, repository, "--grpc-port", "0", name="multiserve-grpc-off")

    targets: list[Target] = []
    answer_sizes: dict[int, int] = {}
    settings: dict[str, Any] = {}
    floor_targets = []
    for batch in BATCHES:
        rng = np.random.default_rng(batch)
        xs = [rng.normal(size=(batch, models.MLP_FEATURES)).astype(np.float32)]
        xs += [rng.normal(size=xs[0].shape).astype(np.float32) for _ in range(DISTINCT - 1)]
        expected = [np.asarray(session.run(None, {"x": x})[0]) for x in xs]
        json_load = wrk.Load(
            V2_PATH, tuple(v2_json(x) for x in xs), {"Content-Type": "application/json"}
        )
        binaries = [v2_binary(x) for x in xs]
        binary_load = wrk.Load(
            V2_PATH,
            tuple(body for body, _ in binaries),
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(binaries[0][1]),
            },
        )
        grpc_bodies = [grpc_request(x) for x in xs]
        for check_server in (server, grpc_off):
            _check_json(check_server, json_load, expected)
        _check_binary(server, binary_load, expected)
        answer_sizes[len(grpc_bodies[0])] = _check_grpc(grpc_port, grpc_bodies, expected)
        framed = h2load.frame(grpc_bodies[0])
        suffix = f"b{batch}"
        targets += [
            Target(f"http_json_{suffix}", f"HTTP V2 JSON, batch {batch}", server, "wrk", json_load),
            Target(
                f"http_binary_{suffix}",
                f"HTTP V2 binary tensors, batch {batch}",
                server,
                "wrk",
                binary_load,
            ),
            Target(
                f"grpc_raw_{suffix}",
                f"gRPC raw tensors (tritonclient.grpc's request), batch {batch}",
                server,
                "h2load",
                grpc_port=grpc_port,
                grpc_body=framed,
                counted=True,
            ),
        ]
        floor_targets.append((suffix, batch, framed))
        if batch == 1:
            targets.append(
                Target(
                    "http_json_b1_grpc_off",
                    "HTTP V2 JSON, batch 1, multiserve --grpc-port 0",
                    grpc_off,
                    "wrk",
                    json_load,
                )
            )
        settings[f"batch_{batch}"] = {
            "json_request_bytes": len(json_load.bodies[0]),
            "binary_request_bytes": len(binary_load.bodies[0]),
            "grpc_request_bytes": len(grpc_bodies[0]),
            "grpc_answer_bytes": answer_sizes[len(grpc_bodies[0])],
        }

    ctx.log("protocols: starting the gRPC floor")
    floor_port, floor_grpc_port = free_port(), free_port()
    floor_argv = [sys.executable, str(FLOOR_SCRIPT), "--port", str(floor_port)]
    floor_argv += ["--grpc-port", str(floor_grpc_port)]
    for request_bytes, answer_bytes in answer_sizes.items():
        floor_argv += ["--answer", f"{request_bytes}:{answer_bytes}"]
    floor = start_server(
        "grpc-floor", floor_argv, floor_port, ctx.subdir("logs"), "/readyz", ctx.deadline
    )
    ctx.stack.callback(floor.stop)
    for suffix, batch, framed in floor_targets:
        targets.append(
            Target(
                f"grpc_floor_{suffix}",
                f"gRPC floor (fixed answer, no model), batch {batch}",
                floor,
                "h2load",
                grpc_port=floor_grpc_port,
                grpc_body=framed,
            )
        )

    servers = list({id(t.server): t.server for t in targets}.values())
    for target in targets:
        ctx.deadline.check("warming up the protocol targets")
        with only_running(target.server, servers):
            _measure(target, plan.warmup_s, plan.connections, plan.wrk_threads)
    runs: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
    for round_index in range(plan.rounds):
        shift = round_index % len(targets)
        for target in targets[shift:] + targets[:shift]:
            ctx.deadline.check("timing the protocol targets")
            with only_running(target.server, servers):
                summary = _measure(target, plan.run_s, plan.connections, plan.wrk_threads)
            runs[target.key].append(summary)
            ctx.log(
                f"protocols: round {round_index + 1}/{plan.rounds} {target.key}: "
                f"{summary['requests_per_s']:.0f} req/s, p99 {summary['p99_ms']:.2f} ms, "
                f"failed {summary['failed']}"
            )

    figures = {
        t.key: {"label": t.label, **_medians(runs[t.key]), "runs": runs[t.key]} for t in targets
    }
    ratios: dict[str, float | None] = {}
    for batch in BATCHES:
        grpc_raw = figures[f"grpc_raw_b{batch}"]
        for other in ("http_json", "http_binary", "grpc_floor"):
            base = figures[f"{other}_b{batch}"]
            ratios[f"grpc_raw_b{batch}_over_{other}"] = ratio(
                grpc_raw["requests_per_s"], base["requests_per_s"]
            )
            ratios[f"grpc_raw_b{batch}_p99_over_{other}_p99"] = ratio(
                grpc_raw["p99_ms"], base["p99_ms"]
            )
    ratios["http_json_b1_grpc_on_over_off"] = ratio(
        figures["http_json_b1"]["requests_per_s"],
        figures["http_json_b1_grpc_off"]["requests_per_s"],
    )
    return {
        "settings": {
            "model": "examples.make_models.write_mlp_onnx(seed=2): x float32 [batch, 4] -> "
            f"{OUTPUT} [batch, 3]",
            "distinct_inputs": DISTINCT,
            **settings,
            "rounds": plan.rounds,
            "run_s": plan.run_s,
            "warmup_s": plan.warmup_s,
            "wrk": f"-t{plan.wrk_threads} -c{plan.connections} -d{plan.run_s}s",
            "h2load": f"--threads={plan.wrk_threads} --clients={plan.connections} "
            f"--max-concurrent-streams=1 --duration={plan.run_s}",
            "h2load_version": h2load.h2load_version(),
            "multiserve_command": display_argv(server.argv, {str(repository): "MODELS"}),
            "floor_command": display_argv(
                floor.argv, {str(FLOOR_SCRIPT): "benchmarks/grpc_floor.py"}
            ),
        },
        "figures": figures,
        "ratios": ratios,
    }


def _measure(target: Target, seconds: int, connections: int, threads: int) -> dict[str, Any]:
    if target.kind == "wrk":
        assert target.wrk_load is not None
        result = wrk.run(
            target.server.port,
            target.wrk_load,
            duration_s=seconds,
            connections=connections,
            threads=threads,
        )
        return result.summary()
    before = _grpc_calls(target.server) if target.counted else {}
    answered = h2load.run(
        target.grpc_port,
        GRPC_PATH,
        target.grpc_body,
        duration_s=seconds,
        connections=connections,
        threads=threads,
    )
    grpc_failed = 0
    if target.counted:
        after = _grpc_calls(target.server)
        delta = {code: after.get(code, 0) - before.get(code, 0) for code in after}
        # CANCELLED: calls h2load itself abandoned when its duration ran out.
        grpc_failed = sum(c for code, c in delta.items() if code not in ("OK", "CANCELLED"))
        if delta.get("OK", 0) < answered.succeeded - grpc_failed:
            raise BenchmarkError(f"h2load counted {answered.succeeded} answers, the server {delta}")
    return answered.summary(grpc_failed)


_GRPC_CALLS = re.compile(
    r'^multiserve_grpc_requests_total\{code="(\w+)",method="ModelInfer"\} ([0-9.e+]+)$', re.M
)


def _grpc_calls(server: ServerProcess) -> dict[str, int]:
    """The server's count of ModelInfer calls by status code, from its /metrics."""
    text = call(server.port, "GET", "/metrics").body.decode()
    return {code: int(float(count)) for code, count in _GRPC_CALLS.findall(text)}


def _medians(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "requests_per_s": round(median([s["requests_per_s"] for s in summaries]), 1),
        "p50_ms": round(median([s["p50_ms"] for s in summaries]), 3),
        "p99_ms": round(median([s["p99_ms"] for s in summaries]), 3),
        "failed": sum(s["failed"] for s in summaries),
    }


def _check_json(server: ServerProcess, load: wrk.Load, expected: list[Any]) -> None:
    wait_until_ok(server.port, load.path, load.bodies[0], load.headers, 60.0, server)
    for body, want in zip(load.bodies, expected, strict=True):
        answer = call(server.port, "POST", load.path, body, load.headers)
        if answer.status != 200:
            raise BenchmarkError(f"{server.name} V2 JSON: {answer.status} {answer.body[:300]!r}")
        output = answer.json()["outputs"][0]
        got = np.asarray(output["data"], dtype=np.float32).reshape(want.shape)
        if not np.array_equal(got, want):
            raise BenchmarkError(f"{server.name} V2 JSON answered {got}, not {want}")


def _check_binary(server: ServerProcess, load: wrk.Load, expected: list[Any]) -> None:
    for body, want in zip(load.bodies, expected, strict=True):
        answer = call(server.port, "POST", load.path, body, load.headers)
        length = int(answer.headers.get("inference-header-content-length", "0"))
        if answer.status != 200 or not length:
            raise BenchmarkError(f"V2 binary: {answer.status} {answer.body[:300]!r}")
        got = np.frombuffer(answer.body[length:], dtype="<f4").reshape(want.shape)
        if not np.array_equal(got, want):
            raise BenchmarkError(f"V2 binary answered {got}, not {want}")


def _check_grpc(port: int, bodies: list[bytes], expected: list[Any]) -> int:
    """Send each request's exact bytes, check each answer; the answers' size."""
    sizes = set()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        model_infer = channel.unary_unary(GRPC_PATH, None, None)
        for body, want in zip(bodies, expected, strict=True):
            data = model_infer(body, timeout=30)
            response = pb.ModelInferResponse.FromString(data)
            got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(want.shape)
            if not np.array_equal(got, want):
                raise BenchmarkError(f"gRPC answered {got}, not {want}")
            sizes.add(len(data))
    return max(sizes)


def main() -> None:
    """Only this section: ``python -m benchmarks.protocols`` is ``run.py --sections protocols``."""
    from benchmarks import run as run_all

    raise SystemExit(run_all.main(["--sections", "protocols", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
