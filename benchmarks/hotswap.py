"""Section 2: hot swap under load.

wrk drives ``POST /models/scaled/predict`` (``latest``) with a timeline (each request's send
time, latency, status and the version that answered) while new versions are copied into the
model's directory, one every ``swap_interval_s``. Each version is
``examples.make_models.scaled_onnx_bytes(version, padding)``, whose answer is the input times
the version, so which version answered is in every answer. Two modes:

- ``settle``: the server runs with ``--settle-window-s 0.3``; a version counts as complete when
  its file has been quiet that long.
- ``marker``: the server runs with a long settle window (5 s), and the writer drops the
  ``READY`` marker file after the copy, which makes the version loadable at once.

A separate small polling client (one request every 10 ms, its own connection) checks each answer
(``y == x * version``) and sees when each new version first answers.

A swap window runs from the start of a version's copy to 0.25 s after the first answer from it
(so it covers the settle wait, the load, the warm-up, the swap and the close of the old version).
Requests sent outside every window are the steady state.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import wrk
from benchmarks.harness import HOST, BenchmarkError, median
from benchmarks.suite import JSON_HEADERS, Context, display_argv, ratio, start_multiserve
from benchmarks.suite import wait_until_ok as wait_ok
from examples.make_models import scaled_onnx_bytes

MODEL = "scaled"
PATH = f"/models/{MODEL}/predict"
MARKER = "READY"
COPY_CHUNKS = 4
COPY_PAUSE_S = 0.01  # between chunks: a copy that takes a while, as over a network would
WINDOW_AFTER_S = 0.25
POLL_INTERVAL_S = 0.01
BUCKET_S = 0.1
MODES = {
    "settle": {"settle_window_s": 0.3, "marker": False},
    "marker": {"settle_window_s": 5.0, "marker": True},
}


@dataclass(frozen=True, slots=True)
class Copy:
    version: int
    started: float  # monotonic seconds
    complete: float  # the file closed (settle mode) or the marker written (marker mode)


@dataclass(frozen=True, slots=True)
class Poll:
    sent: float
    done: float
    status: int
    version: int
    correct: bool


class Poller:
    """The separate small polling client: one request at a time, every POLL_INTERVAL_S."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.polls: list[Poll] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._body = json.dumps({"inputs": [[1.0, 1.0, 1.0, 1.0]]}).encode()

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=10)
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                connection.request("POST", PATH, self._body, JSON_HEADERS)
                response = connection.getresponse()
                body = response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                connection.close()
                connection = http.client.HTTPConnection(HOST, self.port, timeout=10)
                self._stop.wait(POLL_INTERVAL_S)
                continue
            done = time.monotonic()
            version, correct = -1, False
            if status == 200:
                payload = json.loads(body)
                version = int(payload["model_version"])
                values = np.asarray(payload["outputs"]["y"], dtype=np.float32)
                correct = bool(np.all(values == np.float32(version)))
            self.polls.append(Poll(sent, done, status, version, correct))
            self._stop.wait(max(0.0, POLL_INTERVAL_S - (time.monotonic() - sent)))
        connection.close()


def run(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    results: dict[str, Any] = {}
    for mode, versions in (("settle", plan.swap_versions), ("marker", plan.marker_versions)):
        if versions > 0:
            results[mode] = _run_mode(ctx, mode, versions)
    return results


def _write_version(root: Path, version: int, padding: int, marker: bool) -> Copy:
    content = scaled_onnx_bytes(float(version), padding)
    directory = root / MODEL / str(version)
    started = time.monotonic()
    directory.mkdir(parents=True)
    step = -(-len(content) // COPY_CHUNKS)
    with open(directory / "model.onnx", "wb") as artifact:
        for offset in range(0, len(content), step):
            artifact.write(content[offset : offset + step])
            artifact.flush()
            time.sleep(COPY_PAUSE_S)
        os.fsync(artifact.fileno())
    if marker:
        (directory / MARKER).touch()
    return Copy(version, started, time.monotonic())


def _run_mode(ctx: Context, mode: str, versions: int) -> dict[str, Any]:
    plan = ctx.plan
    settle_window_s = float(MODES[mode]["settle_window_s"])
    marker = bool(MODES[mode]["marker"])
    root = ctx.subdir(f"hotswap-{mode}") / "models"
    first = root / MODEL / "1"
    first.mkdir(parents=True)
    (first / "model.onnx").write_bytes(scaled_onnx_bytes(1.0, plan.swap_padding_bytes))
    (first / MARKER).touch()
    ctx.log(f"hot swap ({mode}): starting multiserve")
    server = start_multiserve(ctx, root, "--settle-window-s", str(settle_window_s))
    body = json.dumps({"inputs": [[1.0, 1.0, 1.0, 1.0]]}).encode()
    wait_ok(server.port, PATH, body, JSON_HEADERS, 60.0, server)  # loaded, so the model is hot

    duration = round(plan.swap_lead_s + versions * plan.swap_interval_s + plan.swap_tail_s)
    load = wrk.Load(
        PATH,
        tuple(json.dumps({"inputs": [[float(i), 1.0, 2.0, 3.0]]}).encode() for i in range(16)),
        JSON_HEADERS,
    )
    outcome: dict[str, Any] = {}

    def drive() -> None:
        try:
            outcome["wrk"] = wrk.run(
                server.port,
                load,
                duration_s=duration,
                connections=plan.connections,
                threads=plan.connections,
                timeline=True,
            )
        except BenchmarkError as exc:
            outcome["error"] = exc

    ctx.log(
        f"hot swap ({mode}): {versions} versions, one every {plan.swap_interval_s:g} s, "
        f"under wrk for {duration} s"
    )
    copies: list[Copy] = []
    driver = threading.Thread(target=drive, name="wrk", daemon=True)
    with Poller(server.port) as poller:
        started = time.monotonic()
        driver.start()
        for index in range(versions):
            due = started + plan.swap_lead_s + index * plan.swap_interval_s
            time.sleep(max(0.0, due - time.monotonic()))
            copies.append(_write_version(root, index + 2, plan.swap_padding_bytes, marker))
        driver.join(timeout=duration + 90)
        time.sleep(0.2)
    if "error" in outcome:
        raise outcome["error"]
    if "wrk" not in outcome:
        raise BenchmarkError(f"wrk did not finish the hot swap ({mode}) run")
    result: wrk.WrkResult = outcome["wrk"]
    return _analyse(ctx, mode, settle_window_s, marker, server.argv, root, result, copies, poller)


def _analyse(
    ctx: Context,
    mode: str,
    settle_window_s: float,
    marker: bool,
    argv: list[str],
    root: Path,
    result: wrk.WrkResult,
    copies: list[Copy],
    poller: Poller,
) -> dict[str, Any]:
    samples = result.timeline
    if not samples:
        raise BenchmarkError(f"the hot swap ({mode}) run recorded no requests")
    polls = poller.polls
    per_version = []
    windows: list[tuple[float, float]] = []
    for copy in copies:
        first_poll = min(
            (p.done for p in polls if p.status == 200 and p.version >= copy.version), default=None
        )
        first_wrk = min(
            (s.done for s in samples if s.status == 200 and s.version >= copy.version),
            default=None,
        )
        seen = [t for t in (first_poll, first_wrk) if t is not None]
        end = (min(seen) if seen else copy.complete + ctx.plan.swap_interval_s) + WINDOW_AFTER_S
        windows.append((copy.started, end))
        per_version.append(
            {
                "version": copy.version,
                "copy_s": round(copy.complete - copy.started, 4),
                "poller_first_answer_s": None
                if first_poll is None
                else round(first_poll - copy.complete, 4),
                "wrk_first_answer_s": None
                if first_wrk is None
                else round(first_wrk - copy.complete, 4),
            }
        )

    # The first second of wrk's run warms connections up: left out of the steady state.
    start = samples[0].sent + 1.0
    end = max(s.sent for s in samples)

    def in_window(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    ok = [s for s in samples if s.status == 200]
    inside = [s.latency for s in ok if in_window(s.sent)]
    steady = [s.latency for s in ok if s.sent >= start and not in_window(s.sent)]
    p99_inside = _p99_ms(inside)
    p99_steady = _p99_ms(steady)
    poll_delays = [v["poller_first_answer_s"] for v in per_version]
    wrk_delays = [v["wrk_first_answer_s"] for v in per_version]
    missing = [v["version"] for v in per_version if v["poller_first_answer_s"] is None]
    final_versions = sorted({s.version for s in samples if s.sent >= end - 0.5})
    failed_polls = [p for p in polls if p.status != 200]
    wrong_polls = [p for p in polls if p.status == 200 and not p.correct]
    ctx.log(
        f"hot swap ({mode}): failed {result.failed} (wrk), {len(failed_polls)} (poller); "
        f"p99 steady {p99_steady} ms, in windows {p99_inside} ms; file complete to first answer "
        f"median {_median_or_none(poll_delays)} s, max {_max_or_none(poll_delays)} s"
    )
    return {
        "settings": {
            "mode": mode,
            "settle_window_s": settle_window_s,
            "ready_marker": marker,
            "versions": len(copies),
            "interval_s": ctx.plan.swap_interval_s,
            "lead_s": ctx.plan.swap_lead_s,
            "tail_s": ctx.plan.swap_tail_s,
            "file_bytes": len(scaled_onnx_bytes(2.0, ctx.plan.swap_padding_bytes)),
            "copy": f"{COPY_CHUNKS} chunks, {COPY_PAUSE_S * 1e3:g} ms apart, then fsync",
            "wrk": f"-t{ctx.plan.connections} -c{ctx.plan.connections} (one connection per "
            "thread, so the Lua script times every request)",
            "window": f"copy start to first answer from the new version + {WINDOW_AFTER_S} s",
            "poller": f"one request every {POLL_INTERVAL_S * 1e3:g} ms on its own connection",
            "command": display_argv(argv, {str(root): "MODELS"}),
        },
        "requests": result.requests,
        "requests_per_s": round(result.requests_per_s, 1),
        "failed_requests": result.failed,
        "non2xx_statuses": result.non2xx_statuses,
        "socket_errors": result.socket_errors,
        "poller": {
            "requests": len(polls),
            "failed": len(failed_polls) + len(poller.errors),
            "wrong_answers": len(wrong_polls),
            "errors": poller.errors[:5],
            "statuses": _count(p.status for p in failed_polls),
        },
        "p99_steady_ms": p99_steady,
        "p99_in_windows_ms": p99_inside,
        "p99_ratio": ratio(p99_inside or 0.0, p99_steady or 0.0),
        "p50_steady_ms": _pct_ms(steady, 50),
        "p50_in_windows_ms": _pct_ms(inside, 50),
        "samples_steady": len(steady),
        "samples_in_windows": len(inside),
        "first_answer_s": {
            "poller_median": _median_or_none(poll_delays),
            "poller_max": _max_or_none(poll_delays),
            "wrk_median": _median_or_none(wrk_delays),
            "wrk_max": _max_or_none(wrk_delays),
            "versions_never_seen": missing,
        },
        "versions_answering_at_end": final_versions,
        "per_version": per_version,
        "timeline": _buckets(samples, start - 1.0),
        "windows": [
            [round(a - samples[0].sent, 3), round(b - samples[0].sent, 3)] for a, b in windows
        ],
        "completions": [round(c.complete - samples[0].sent, 3) for c in copies],
    }


def _p99_ms(latencies: list[float]) -> float | None:
    return _pct_ms(latencies, 99)


def _pct_ms(latencies: list[float], q: float) -> float | None:
    if not latencies:
        return None
    return round(float(np.percentile(np.asarray(latencies), q)) * 1e3, 3)


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(median(present), 4) if present else None


def _max_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(max(present), 4) if present else None


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return counts


def _buckets(samples: tuple[wrk.Sample, ...], origin: float) -> dict[str, list[float]]:
    """Latency over time in BUCKET_S buckets (by send time): p50, p99, max in ms, and req/s."""
    times = np.asarray([s.sent - origin for s in samples])
    latencies = np.asarray([s.latency * 1e3 for s in samples])
    index = np.floor(times / BUCKET_S).astype(np.int64)
    out: dict[str, list[float]] = {"t_s": [], "p50_ms": [], "p99_ms": [], "max_ms": [], "rps": []}
    for bucket in range(int(index.max()) + 1):
        chosen = latencies[index == bucket]
        if chosen.size == 0:
            continue
        out["t_s"].append(round(bucket * BUCKET_S, 2))
        out["p50_ms"].append(round(float(np.percentile(chosen, 50)), 3))
        out["p99_ms"].append(round(float(np.percentile(chosen, 99)), 3))
        out["max_ms"].append(round(float(chosen.max()), 3))
        out["rps"].append(round(chosen.size / BUCKET_S, 1))
    return out
