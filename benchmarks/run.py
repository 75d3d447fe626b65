"""Measure multiserve against its floors and its peers, in one run on one machine.

    .venv/bin/python benchmarks/run.py            # the full run, about 15 minutes on 2 cores
    .venv/bin/python benchmarks/run.py --quick    # everything, smaller, in about 3 minutes

Sections (``--sections`` picks some): throughput (multiserve vs the HTTP floor, MLServer and
LitServe), hotswap (versions copied in under load), coldload, memory, scaling (model size),
protocols (gRPC against HTTP JSON and binary, batch 1 and 64). Load comes from wrk (h2load for
gRPC); servers run as subprocesses on free 127.0.0.1 ports; every wait is bounded.
Writes run.json, summary.md and PNG charts to benchmarks/results/ (a quick run to
benchmarks/results/quick/), and a full run updates the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make `benchmarks` and `examples` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import coldload, hotswap, memory, protocols, report, scaling, throughput, wrk
from benchmarks.harness import (
    RESULTS_DIR,
    BenchmarkError,
    Deadline,
    display_path,
    git_revision,
    machine_info,
    now_iso,
    package_versions,
    write_json,
)
from benchmarks.suite import Context, Plan

SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "throughput": throughput.run,
    "hotswap": hotswap.run,
    "coldload": coldload.run,
    "memory": memory.run,
    "scaling": scaling.run,
    "protocols": protocols.run,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run (about 3 minutes)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, from {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="results folder (default benchmarks/results, or benchmarks/results/quick)",
    )
    parser.add_argument(
        "--max-seconds", type=float, help="give up past this (default 1500, quick 420)"
    )
    parser.add_argument(
        "--wrk-threads", type=int, help="wrk -t for the throughput runs (default 2)"
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the temporary models and server logs"
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="RUN_JSON",
        help="measure nothing: rewrite summary.md, the charts (and, for a full run in the "
        "default folder, the README table) from a run.json",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    command_args = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(command_args)
    if args.report_only is not None:
        return write_reports(json.loads(args.report_only.read_text()), args.output)
    plan = Plan.quick() if args.quick else Plan.full()
    overrides: dict[str, Any] = {}
    if args.max_seconds is not None:
        overrides["max_seconds"] = args.max_seconds
    if args.wrk_threads is not None:
        overrides["wrk_threads"] = args.wrk_threads
    if overrides:
        plan = Plan(**{**plan.to_json(), **overrides})
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    out_dir = args.output or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    try:
        wrk_version = wrk.wrk_version()
    except BenchmarkError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2

    deadline = Deadline(plan.max_seconds)
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "multiserve benchmarks/run.py",
        "timestamp": now_iso(),
        "command": " ".join([".venv/bin/python benchmarks/run.py", *command_args]),
        "plan": plan.to_json(),
        "machine": machine_info(),
        "versions": package_versions(),
        "revision": git_revision(),
        "wrk_version": wrk_version,
        "sections": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="multiserve-bench-"))
    print(f"plan {plan.name}; sections {', '.join(chosen)}; work in {workdir}", flush=True)
    try:
        for name in chosen:
            with contextlib.ExitStack() as stack:
                ctx = Context(plan, deadline, workdir, stack)
                section_started = time.monotonic()
                # The work tree is shared: a commit may land while a run goes on.
                revision = git_revision()
                try:
                    results["sections"][name] = SECTIONS[name](ctx)
                except BenchmarkError as exc:
                    ctx.log(f"{name}: FAILED: {exc}")
                    results["sections"][name] = {"error": str(exc)[-4000:]}
                results["sections"][name]["seconds"] = round(time.monotonic() - section_started, 1)
                results["sections"][name]["revision"] = revision
    finally:
        if args.keep_workdir:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results["seconds"] = round(time.monotonic() - started, 1)
    results["machine_at_end"] = {"load_average": machine_info()["load_average"]}
    full_default = not args.quick and args.output is None and chosen == list(SECTIONS)
    results["readme"] = full_default
    return write_reports(results, out_dir)


def write_reports(results: dict[str, Any], out_dir: Path | None) -> int:
    """The targets, run.json, summary.md, the charts, and the README table (for a full run of
    every section into the default folder)."""
    if out_dir is None:
        out_dir = RESULTS_DIR / "quick" if results["plan"]["name"] == "quick" else RESULTS_DIR
    checks = report.targets(results)
    results["targets"] = [c.to_json() for c in checks]
    out_dir.mkdir(parents=True, exist_ok=True)
    chart_paths, no_charts = report.charts(results, out_dir)
    if no_charts:
        results["charts"] = no_charts
    write_json(out_dir / "run.json", results)
    (out_dir / "summary.md").write_text(
        report.summary_markdown(results, checks, [str(p) for p in chart_paths])
    )
    print()
    print(report.targets_table(checks))
    print(f"\nwrote {display_path(out_dir / 'run.json')}, {display_path(out_dir / 'summary.md')}")
    for path in chart_paths:
        print(f"wrote {display_path(path)}")
    if results.get("readme") and out_dir == RESULTS_DIR and report.update_readme(results, checks):
        print(f"updated {display_path(report.README)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
