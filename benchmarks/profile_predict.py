"""Where a multiserve predict spends its time: py-spy samples the server while wrk drives it.

    .venv/bin/python benchmarks/profile_predict.py --py-spy /tmp/prof-venv/bin/py-spy

py-spy is not a dependency of the project: install it anywhere outside the repository
(``python3 -m venv /tmp/prof-venv && /tmp/prof-venv/bin/pip install py-spy``) and name it with
``--py-spy`` (default: ``py-spy`` on PATH). The server serves the small MLP of run.py's
throughput section; wrk sends batch-1 JSON (or ``--body npy``) requests on 16 connections.
Prints, and writes to ``benchmarks/results/profile-<body>.md``: the share of samples by layer
(the leaf-most frame that belongs to a known layer decides), the top functions by self time, and
the top functions by inclusive time. Idle threads (waiting in epoll or on a queue) are not
sampled: the shares are of CPU-busy samples. The collapsed stacks go to ``--stacks`` if given.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import models, wrk
from benchmarks.harness import (
    RESULTS_DIR,
    BenchmarkError,
    Deadline,
    display_path,
    free_port,
    git_revision,
    machine_info,
    now_iso,
    start_server,
)
from benchmarks.suite import JSON_HEADERS, NPY_HEADERS, multiserve_argv, wait_until_ok

# (layer, pattern on a frame "function (path:line)"), tried from the leaf of each stack up.
LAYERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("onnxruntime session.run", re.compile(r"onnxruntime")),
    ("codecs (decode/encode)", re.compile(r"multiserve/codecs\.py|/numpy/|orjson")),
    ("multiserve core (routes, lifecycle, catalog, metrics)", re.compile(r"[(/]multiserve/")),
    ("backend wrapper", re.compile(r"multiserve_onnx")),
    ("thread handoff (anyio, threading, queue)", re.compile(r"anyio|threading\.py|queue\.py")),
    ("prometheus_client", re.compile(r"prometheus_client")),
    ("starlette", re.compile(r"starlette")),
    ("uvicorn / httptools / asyncio", re.compile(r"uvicorn|httptools|asyncio|uvloop")),
)
# Leaf frames of a thread that waits: py-spy may count them as busy when it samples every thread.
IDLE_LEAVES = ("Condition.wait (threading.py)", "Event.wait (threading.py)", "Queue.get (queue.py)")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "/tmp/prof-venv/bin/py-spy")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--body", choices=["json", "npy"], default="json")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--spy-flags",
        default="--gil",
        help="more py-spy record flags, space-separated (default '--gil': only the thread "
        "holding the GIL is sampled, where a one-process Python server spends its time; "
        "--spy-flags=--nonblocking samples every thread without pausing the server)",
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument("--stacks", type=Path, help="also keep the collapsed stacks here")
    args = parser.parse_args(argv)
    if not Path(args.py_spy).exists():
        print(f"profile_predict: no py-spy at {args.py_spy}; see --help", file=sys.stderr)
        return 2
    output = args.output or RESULTS_DIR / f"profile-{args.body}.md"
    try:
        text = profile(args, output)
    except BenchmarkError as exc:
        print(f"profile_predict: {exc}", file=sys.stderr)
        return 1
    print(text)
    print(f"wrote {display_path(output)}")
    return 0


def profile(args: argparse.Namespace, output: Path) -> str:
    deadline = Deadline(args.seconds + 180)
    with tempfile.TemporaryDirectory(prefix="multiserve-profile-") as workdir:
        root = Path(workdir) / "models"
        models.write_mlp(root / "mlp" / "1" / "model.onnx")
        xs = models.inputs(models.MLP_FEATURES)
        if args.body == "json":
            load = wrk.Load(
                "/models/mlp/1/predict", tuple(models.json_body(x) for x in xs), JSON_HEADERS
            )
        else:
            load = wrk.Load(
                "/models/mlp/1/predict", tuple(models.npy_body(x) for x in xs), NPY_HEADERS
            )
        port = free_port()
        server = start_server(
            "multiserve", multiserve_argv(root, port), port, Path(workdir), "/readyz", deadline
        )
        try:
            wait_until_ok(port, load.path, load.bodies[0], load.headers, 60.0, server)
            wrk.run(port, load, duration_s=2, connections=16, threads=2)
            outcome: dict[str, wrk.WrkResult] = {}
            driver = threading.Thread(
                target=lambda: outcome.update(
                    result=wrk.run(
                        port, load, duration_s=args.seconds + 2, connections=16, threads=2
                    )
                ),
                daemon=True,
            )
            driver.start()
            stacks_path = Path(workdir) / "stacks.txt"
            spy = [args.py_spy, "record", "--format", "raw", "--rate", str(args.rate)]
            spy += [
                "--duration",
                str(args.seconds),
                "--pid",
                str(server.pid),
                *args.spy_flags.split(),
            ]
            spy += ["--output", str(stacks_path)]
            completed = subprocess.run(
                spy, capture_output=True, text=True, timeout=args.seconds + 60, check=False
            )
            driver.join(timeout=args.seconds + 60)
            if completed.returncode != 0 or not stacks_path.exists():
                raise BenchmarkError(f"py-spy failed: {completed.stderr[-2000:]}")
            stacks = stacks_path.read_text()
            if args.stacks is not None:
                args.stacks.write_text(stacks)
        finally:
            server.stop()
    result = outcome.get("result")
    header = [
        f"# Profile of a batch-1 {args.body.upper()} predict under load ({now_iso()})",
        "",
        f"multiserve {git_revision()}; machine: {machine_info()}. py-spy record --rate "
        f"{args.rate} {args.spy_flags} for {args.seconds} s while wrk -t2 -c16 drove "
        f"`POST /models/mlp/1/predict`"
        + (
            f" at {result.requests_per_s:.0f} req/s (p99 {result.latency_us['99'] / 1e3:.1f} ms)."
            if result is not None
            else "."
        ),
        "",
    ]
    text = "\n".join(header + summarise(stacks))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    return text


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rpartition(" ")
    return stack.split(";"), int(count)


def _function(frame: str) -> str:
    match = FRAME.match(frame)
    if match is None:
        return frame
    path = match.group("path")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('func')} ({path})"


def summarise(stacks: str, top: int = 20) -> list[str]:
    layers: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in stacks.splitlines():
        if not line.strip():
            continue
        frames, count = _frames(line)
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        if _function(frames[-1]) in IDLE_LEAVES:
            continue
        total += count
        own[_function(frames[-1])] += count
        for function in {_function(f) for f in frames}:
            inclusive[function] += count
        layer = "other"
        for frame in reversed(frames):
            found = next((name for name, pattern in LAYERS if pattern.search(frame)), None)
            if found is not None:
                layer = found
                break
        layers[layer] += count
    if not total:
        return ["py-spy recorded no samples."]

    def share(n: int) -> str:
        return f"{100 * n / total:.1f}%"

    out = [f"{total} busy samples.", "", "## By layer", "", "| layer | share |", "|---|---:|"]
    out += [f"| {name} | {share(n)} |" for name, n in layers.most_common()]
    out += ["", "## Top functions by self time", "", "| function | self |", "|---|---:|"]
    out += [f"| `{name}` | {share(n)} |" for name, n in own.most_common(top)]
    out += ["", "## Top functions by inclusive time", "", "| function | inclusive |", "|---|---:|"]
    out += [f"| `{name}` | {share(n)} |" for name, n in inclusive.most_common(top + 10)]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
