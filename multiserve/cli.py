"""``multiserve serve --models DIR`` and ``multiserve optimize SRC --out DST --kind KIND``
(also ``python -m multiserve``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from multiserve import __version__
from multiserve.check import Figures
from multiserve.errors import SettingsError
from multiserve.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multiserve", description="Multi-model inference server.")
    parser.add_argument("--version", action="version", version=f"multiserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a model repository over HTTP",
        description="Settings come from the defaults, then --config FILE (or MULTISERVE_CONFIG), "
        "then MULTISERVE_* environment variables, then these flags.",
    )
    serve.add_argument(
        "--config", metavar="FILE", help="a TOML settings file (see config/multiserve.toml)"
    )
    for spec in dataclasses.fields(Settings):
        flag = "--" + spec.name.replace("_", "-")
        metavar = "DIR" if spec.name == "models" else spec.name.upper()
        serve.add_argument(flag, dest=spec.name, metavar=metavar, help=spec.metadata["doc"])
    optimize = commands.add_parser(
        "optimize",
        help="derive an optimised or exported version, checked against the original",
        description="Derive KIND from the version directory SRC (int8, graph: an ONNX model; "
        "onnx: a torch model), run it beside the original on the version's reference.npz / "
        "warmup.npz (else synthetic inputs) and, if it is within tolerance and faster, write "
        "it to DST as a version directory with its .sha256. Exit status: 0 written, 1 the "
        "check failed (nothing written), 2 a usage error.",
    )
    optimize.add_argument("src", metavar="SRC_VERSION_DIR", type=Path)
    optimize.add_argument("--out", metavar="DST_VERSION_DIR", type=Path, required=True)
    optimize.add_argument("--kind", required=True, choices=("int8", "graph", "onnx"))
    optimize.add_argument("--max-abs-error", type=float, metavar="X")
    optimize.add_argument("--max-rel-error", type=float, metavar="X")
    optimize.add_argument("--min-argmax-agreement", type=float, metavar="SHARE")
    optimize.add_argument("--min-speedup", type=float, metavar="RATIO")
    optimize.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "optimize":
        return optimize(args)
    overrides = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(Settings)}
    try:
        settings = Settings.load(args.config, overrides=overrides)
        return serve(settings)
    except SettingsError as exc:
        print(f"multiserve: {exc}", file=sys.stderr)
        return 2


def serve(settings: Settings) -> int:
    import uvicorn

    from multiserve.http import create_app
    from multiserve.server import ModelServer

    server = ModelServer(settings)  # validates the repository before anything starts
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # watchfiles logs every batch of events at INFO; the lifecycle logs what they changed.
    logging.getLogger("watchfiles").setLevel(max(logging.WARNING, logging.getLogger().level))
    uvicorn.run(
        create_app(server),
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )
    return 0


def optimize(args: argparse.Namespace) -> int:
    from multiserve.check import TOLERANCE_KEYS
    from multiserve.optimize import Outcome, UsageError, optimize_offline

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        key: getattr(args, key) for key in TOLERANCE_KEYS if getattr(args, key) is not None
    }
    try:
        figures, accepted, reason = optimize_offline(args.src, args.out, args.kind, overrides)
    except (UsageError, ValueError) as exc:
        print(f"multiserve optimize: {exc}", file=sys.stderr)
        return 2
    if args.json:
        block = Outcome(figures, accepted, reason, reused=False).to_json()
        block["out"] = str(args.out) if accepted else None
        print(json.dumps(block, indent=2))
    else:
        for line in report_lines(args.src, figures, accepted, reason):
            print(line)
        if accepted:
            print(f"wrote {args.out}: {', '.join(sorted(p.name for p in args.out.iterdir()))}")
        else:
            print(f"nothing written to {args.out}")
    return 0 if accepted else 1


def report_lines(src: Path, figures: Figures, accepted: bool, reason: str) -> list[str]:
    """What `multiserve optimize` prints: the verdict, then the figures."""
    verdict = "accepted" if accepted else "REJECTED"
    lines = [f"{figures.kind} of {src}: {verdict}: {reason}"]
    f = figures
    if f.source_seconds is not None and f.derived_seconds is not None:
        lines.append(
            f"  speed      {f.source_seconds * 1e3:.3f} ms -> {f.derived_seconds * 1e3:.3f} ms "
            f"per call ({f.speedup or 0:.2f}x), {f.rows} rows of {f.sample} inputs"
        )
    if f.max_abs_error is not None or f.argmax_agreement is not None:
        lines.append(
            f"  accuracy   max abs error {_figure(f.max_abs_error, '.3g')}, max rel error "
            f"{_figure(f.max_rel_error, '.3g')}, argmax agreement "
            f"{_figure(f.argmax_agreement, '.2%')}"
        )
    if f.optimized_bytes is not None:
        lines.append(f"  size       {f.source_bytes:,} -> {f.optimized_bytes:,} bytes")
    if f.source_load_seconds is not None and f.derived_load_seconds is not None:
        lines.append(
            f"  load       {f.source_load_seconds * 1e3:.1f} ms -> "
            f"{f.derived_load_seconds * 1e3:.1f} ms"
        )
    if f.build_seconds is not None:
        lines.append(f"  built in   {f.build_seconds:.2f} s ({f.backend} loads it)")
    return lines


def _figure(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
