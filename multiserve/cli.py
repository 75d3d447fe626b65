"""``multiserve serve --models DIR`` (also ``python -m multiserve``), ``multiserve serve --bundle
DIR``, ``multiserve bundle`` and ``multiserve optimize SRC --out DST --kind KIND``."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_type_hints

from multiserve import __version__
from multiserve.bundle import BundleError
from multiserve.check import Figures
from multiserve.errors import SettingsError
from multiserve.settings import Settings, parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multiserve", description="Multi-model inference server.")
    parser.add_argument("--version", action="version", version=f"multiserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a model repository over HTTP",
        description="Serve the models in --models DIR (a local directory) or in a bucket "
        "(--models s3://bucket/prefix, gs://bucket/prefix or az://container/prefix). Settings "
        "come from the defaults shown, then --config FILE (or MULTISERVE_CONFIG), then "
        "MULTISERVE_* environment variables, then these flags. A switch is given bare "
        "(--watch) or negated (--no-watch).",
    )
    serve.add_argument(
        "--config", metavar="FILE", help="a TOML settings file (see config/multiserve.toml)"
    )
    hints = get_type_hints(Settings)
    for spec in dataclasses.fields(Settings):
        flag = "--" + spec.name.replace("_", "-")
        help_text = f"{spec.metadata['doc']} (default: {_shown(spec)})"
        if hints[spec.name] is bool:
            negated = "--no-" + spec.name.replace("_", "-")
            help_text = f"{help_text[:-1]}; {negated} turns it off)"
            # A switch, as uvicorn's are: --watch, --no-watch; --watch false also works.
            serve.add_argument(
                flag,
                dest=spec.name,
                nargs="?",
                const="true",
                metavar="true|false",
                help=help_text,
            )
            serve.add_argument(
                negated,
                dest=spec.name,
                action="store_const",
                const="false",
                help=argparse.SUPPRESS,
            )
        else:
            metavar = "DIR|URL" if spec.name == "models" else spec.name.upper()
            serve.add_argument(flag, dest=spec.name, metavar=metavar, help=help_text)
    serve.add_argument(
        "--bundle",
        metavar="DIR",
        help="serve a bundle made by `multiserve bundle`: every file is checked against its "
        "manifest first, and the server refuses to start on any difference; the bundle brings "
        "its models and its config (so not with --models or --config)",
    )
    _add_bundle_parser(commands)
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


def _shown(spec: dataclasses.Field[Any]) -> str:
    default = spec.default
    if isinstance(default, bool):
        return "on" if default else "off"
    if default == "":
        return "unset"
    if spec.metadata["parse"] is parse_size and isinstance(default, int) and default:
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if default % size == 0:
                return f"{default // size}{unit}"
    return str(default)


def _add_bundle_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bundle = commands.add_parser(
        "bundle",
        help="freeze chosen model versions into a directory to build an image from",
        description="Copy each model's latest version (or the --only ones) from a repository "
        "into a new directory, with a manifest of every file's size and SHA-256 and a server "
        "config with watching off. Serve it with `multiserve serve --bundle DIR`.",
    )
    bundle.add_argument(
        "--models", metavar="SRC", help="the repository: a directory or s3://, gs://, az://"
    )
    bundle.add_argument("--out", metavar="DIR", required=True, help="the new bundle directory")
    bundle.add_argument(
        "--only",
        metavar="NAME[:VERSION]",
        action="append",
        default=[],
        help="bundle this model's latest version, or this version; repeat for more "
        "(default: every model's latest)",
    )
    for name in ("bucket_endpoint", "bucket_region", "bucket_allow_http"):
        flag = "--" + name.replace("_", "-")
        doc = Settings.docs()[name]
        if name == "bucket_allow_http":
            bundle.add_argument(flag, dest=name, nargs="?", const="true", help=doc)
        else:
            bundle.add_argument(flag, dest=name, help=doc)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bundle":
        return bundle(args)
    if args.command == "optimize":
        return optimize(args)
    overrides = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(Settings)}
    try:
        if args.bundle is not None:
            settings = bundle_settings(args, overrides)
        else:
            settings = Settings.load(args.config, overrides=overrides)
        return serve(settings)
    except (SettingsError, BundleError) as exc:
        print(f"multiserve: {exc}", file=sys.stderr)
        return 2


def bundle_settings(args: argparse.Namespace, overrides: dict[str, object]) -> Settings:
    """The settings to serve a bundle with, once every file of it has been verified: its own
    config and models, and pins and labels kept outside it (the bundle may be read-only)."""
    from multiserve.bundle import CONFIG, MANIFEST, MODELS, verify_bundle

    if args.config is not None or overrides.get("models") is not None:
        raise SettingsError("--bundle brings its own models and config: drop --models/--config")
    root = Path(args.bundle).expanduser()
    started = time.perf_counter()
    manifest = verify_bundle(root)
    size = sum(f.size for f in manifest.files)
    print(
        f"multiserve: bundle {root}: {len(manifest.files)} files ({size} bytes, "
        f"{len(manifest.models)} model versions) match their checksums "
        f"({time.perf_counter() - started:.2f} s)",
        file=sys.stderr,
    )
    settings = Settings.load(root / CONFIG, overrides={**overrides, "models": str(root / MODELS)})
    if not settings.state_dir:
        digest = hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()[:16]
        home = Path(settings.disk_cache_dir or "~/.cache/multiserve").expanduser()
        settings = dataclasses.replace(settings, state_dir=str(home / "bundles" / digest))
    return settings


def bundle(args: argparse.Namespace) -> int:
    from multiserve.bundle import Selector, make_bundle
    from multiserve.repository.bucket import BucketOptions

    try:
        overrides = {
            "models": args.models,
            "bucket_endpoint": args.bucket_endpoint,
            "bucket_region": args.bucket_region,
            "bucket_allow_http": args.bucket_allow_http,
        }
        settings = Settings.load(overrides=overrides)
        if not settings.models:
            raise SettingsError("no model repository: pass --models SRC")
        only = [Selector.parse(text) for text in args.only]
        options = BucketOptions(
            settings.bucket_endpoint, settings.bucket_region, settings.bucket_allow_http
        )
        manifest = make_bundle(settings.models, Path(args.out), only, bucket=options)
    except OSError as exc:
        print(f"multiserve: cannot write the bundle: {exc}", file=sys.stderr)
        return 2
    except (SettingsError, BundleError) as exc:
        print(f"multiserve: {exc}", file=sys.stderr)
        return 2
    for version in manifest.models:
        print(
            f"{version.name} version {version.version}: {version.artifact or version.backend} "
            f"({version.size_bytes} bytes)"
        )
    total = sum(f.size for f in manifest.files)
    print(f"bundle {args.out}: {len(manifest.files)} files, {total} bytes; serve it with")
    print(f"  multiserve serve --bundle {args.out}")
    return 0


def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT: 0 after the drain (`multiserve.connections`), 1 when a
    second signal cut it short, 3 when start-up failed."""
    from multiserve.connections import Server, raise_open_file_limit, uvicorn_config
    from multiserve.http import create_app
    from multiserve.server import ModelServer

    server = ModelServer(settings)  # validates the repository before anything starts
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # watchfiles logs every batch of events at INFO; the lifecycle logs what they changed.
    logging.getLogger("watchfiles").setLevel(max(logging.WARNING, logging.getLogger().level))
    server.store.load()  # a state file that cannot be read stops the start here (exit 2)
    limit = raise_open_file_limit()
    logging.getLogger("multiserve.server").info("open-file limit: %d", limit)
    http = Server(uvicorn_config(create_app(server), settings))
    http.run()
    if http.force_exit:
        logging.shutdown()
        os._exit(1)  # at once: not even waiting for worker threads (a load, say) to finish
    if not http.started:
        return 3
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
