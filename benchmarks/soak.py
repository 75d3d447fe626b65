# ruff: noqa: E501  (the table of hostile requests reads best one a line)
"""A few minutes of mixed traffic with swaps, evictions and hostile requests interleaved: zero
unexpected errors, memory flat, threads and file descriptors flat.

    python benchmarks/soak.py [--seconds 150] [--concurrency 64] [--models 6] [--max-models 3]

One server (this checkout) on a repository of ``--models`` small ONNX models (``m0``...) and
the two-input ``adder``, with ``max_models`` below the number of models, so the least recently
used ones are evicted and loaded again all the time. ``--concurrency`` client threads, each
with a keep-alive connection, send back-to-back requests: a predict for a random model (native
JSON, ``.npy`` or V2), or, one request in ten, a hostile one from a fixed set (bad JSON, an
``.npy`` header declaring a huge shape, a V2 shape that overflows, a 5000-digit byte count, a
non-ASCII timeout, a label named ``latest``, an unknown model). Every ``--swap-s`` seconds a
new version of ``m0`` is written and the oldest removed, so ``latest`` moves under load.

Expected answers: 200 for a predict, each hostile request its own 4xx, or 503 with
``Retry-After`` for either (the model's queue full, ``max_queue``: 64 clients on models that
are evicted and loaded again all the time). Anything else (a 500, a wrong 4xx, a dropped
connection) is an unexpected error, and the run fails if there is one. Every 5 s it samples the
server's RSS, threads and open file descriptors; the memory trend is the least-squares slope
over the second half of the run (the first half warms caches up). Writes
``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    HOST,
    RESULTS_DIR,
    Deadline,
    ServerProcess,
    display_path,
    free_port,
    result_header,
    start_server,
    write_json,
)
from examples.make_models import write_adder_onnx, write_mlp_onnx

TOKEN = "soak-admin-token"
X = [[5.1, 3.5, 1.4, 0.2]]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def huge_npy() -> bytes:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 16), }"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64


JSON = {"content-type": "application/json"}
# (method, path, body, headers, expected status)
HOSTILE: list[tuple[str, str, bytes, dict[str, str], int]] = [
    ("POST", "/models/m1/predict", b'{"inputs": [[1, 2', JSON, 400),
    ("POST", "/models/m1/predict", b"[" * 50_000, JSON, 400),
    ("POST", "/models/m1/predict", huge_npy(), {"content-type": "application/x-npy"}, 400),
    ("POST", "/models/m1/predict", b"{}", {**JSON, "x-request-timeout": "\xb2"}, 400),
    ("POST", "/v2/models/m1/infer", json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**32, 2**32], "data": [1.0]}]}).encode(), JSON, 400),
    ("POST", "/v2/models/m1/infer", b"{}", {"content-type": "application/octet-stream", "inference-header-content-length": "9" * 5000}, 400),
    ("PUT", "/admin/models/m1/labels/latest", b'{"version": "1"}', {**JSON, "authorization": f"Bearer {TOKEN}"}, 400),
    ("POST", "/models/nope/predict", b'{"inputs": [[1, 2, 3, 4]]}', JSON, 404),
]  # fmt: skip


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def add(self, key: str, unexpected: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if unexpected is not None:
                self.counts["unexpected"] += 1
                if len(self.unexpected) < 20:
                    self.unexpected.append(unexpected)


def good_request(models: int, rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
    kind = rng.random()
    if kind < 0.1:
        body = json.dumps({"inputs": {"a": [[1.0, 2.0, 3.0]], "b": [[4.0, 5.0, 6.0]]}})
        return "POST", "/models/adder/predict", body.encode(), JSON
    name = f"m{rng.randrange(models)}"
    if kind < 0.5:
        return "POST", f"/models/{name}/predict", json.dumps({"inputs": X}).encode(), JSON
    if kind < 0.75:
        data = npy(np.array(X, dtype=np.float32))
        return "POST", f"/models/{name}/predict", data, {"content-type": "application/x-npy"}
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X[0]}
    return "POST", f"/v2/models/{name}/infer", json.dumps({"inputs": [tensor]}).encode(), JSON


def client(port: int, stop: threading.Event, tally: Tally, models: int, seed: int) -> None:
    rng = random.Random(seed)
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    while not stop.is_set():
        hostile = rng.random() < 0.1
        if hostile:
            method, path, body, headers, expected = rng.choice(HOSTILE)
        else:
            method, path, body, headers = good_request(models, rng)
            expected = 200
        try:
            connection.request(method, path, body, headers)
            response = connection.getresponse()
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            tally.add("connection_error", f"{method} {path}: {type(exc).__name__}: {exc}")
            connection.close()
            connection = http.client.HTTPConnection(HOST, port, timeout=60)
            continue
        status = response.status
        if response.getheader("connection", "").lower() == "close":
            connection.close()
            connection = http.client.HTTPConnection(HOST, port, timeout=60)
        if status == expected:
            tally.add("hostile_4xx" if hostile else "ok")
        elif status == 503 and response.getheader("retry-after"):
            # Shed: the model's queue was full (a hostile body is decoded in the model's
            # worker, so it is shed like any other request before it is read).
            tally.add("503_retry_after")
        else:
            tally.add(
                f"status_{status}",
                f"{method} {path} -> {status} (expected {expected}): {content[:200]!r}",
            )
    connection.close()


def write_version(root: Path, name: str, version: int, seed: int) -> None:
    write_mlp_onnx(root / name / str(version) / "model.onnx", seed=seed)


def swapper(root: Path, stop: threading.Event, every_s: float, tally: Tally) -> None:
    version = 1
    while not stop.wait(every_s):
        version += 1
        write_version(root, "m0", version, seed=version)
        if version > 2:
            shutil.rmtree(root / "m0" / str(version - 2), ignore_errors=True)
        tally.add("swaps")


def sample(server: ServerProcess) -> dict[str, float]:
    threads = server.status_kib("Threads")  # a count, read the same way as the KiB fields
    return {
        "rss_mib": round(server.rss_bytes() / 2**20, 1),
        "threads": float(threads or 0),
        "fds": float(len(os.listdir(f"/proc/{server.pid}/fd"))),
    }


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    return float(np.polyfit(xs, ys, 1)[0] * 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--max-models", type=int, default=3)
    parser.add_argument("--swap-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(tmp) / "models"
        for index in range(args.models):
            write_version(root, f"m{index}", 1, seed=index)
        write_adder_onnx(root / "adder" / "1" / "model.onnx")
        logs = Path(tmp) / "logs"
        logs.mkdir()
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "multiserve",
            "serve",
            "--models",
            str(root),
            "--port",
            str(port),
            "--grpc-port",
            "0",
            "--max-models",
            str(args.max_models),
            "--settle-window-s",
            "0.2",
            "--admin-token",
            TOKEN,
            "--log-level",
            "warning",
        ]
        server = start_server("soak", argv, port, logs, "/readyz", Deadline(120))
        tally = Tally()
        stop = threading.Event()
        samples: list[dict[str, float]] = []
        try:
            threads = [
                threading.Thread(target=client, args=(port, stop, tally, args.models, seed))
                for seed in range(args.concurrency)
            ]
            threads.append(threading.Thread(target=swapper, args=(root, stop, args.swap_s, tally)))
            started = time.monotonic()
            for thread in threads:
                thread.start()
            while (elapsed := time.monotonic() - started) < args.seconds:
                samples.append({"t_s": round(elapsed, 1), **sample(server)})
                print(f"  {samples[-1]} {dict(tally.counts)}", flush=True)
                time.sleep(5)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            time.sleep(1)
            samples.append({"t_s": round(time.monotonic() - started, 1), **sample(server)})
            cache = json.loads(_get(port, "/admin/cache", {"authorization": f"Bearer {TOKEN}"}))[
                "stats"
            ]
        finally:
            server.stop()

    half = [s for s in samples if s["t_s"] >= args.seconds / 2]
    warm = half[0]
    last = samples[-1]
    result = {
        **result_header("soak"),
        "settings": vars(args) | {"out": display_path(args.out)},
        "counts": dict(tally.counts),
        "unexpected_examples": tally.unexpected,
        "cache_stats": cache,
        "rss_mib_first_last": [samples[0]["rss_mib"], last["rss_mib"]],
        "rss_trend_mib_per_min_second_half": round(
            slope_per_minute([(s["t_s"], s["rss_mib"]) for s in half]), 2
        ),
        # Mid-run and the last sample under load, then idle after the clients left.
        "threads_mid_end_idle": [warm["threads"], samples[-2]["threads"], last["threads"]],
        "fds_mid_end_idle": [warm["fds"], samples[-2]["fds"], last["fds"]],
        "samples": samples,
    }
    write_json(args.out, result)
    summary = {k: v for k, v in result.items() if k not in ("samples", "machine")}
    print(json.dumps(summary, indent=2, default=str))
    print(f"wrote {display_path(args.out)}")
    if tally.counts["unexpected"]:
        sys.exit(1)


def _get(port: int, path: str, headers: dict[str, str]) -> Any:
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().read()
    finally:
        connection.close()


if __name__ == "__main__":
    main()
