"""``multiserve serve --models DIR`` (also ``python -m multiserve``), ``multiserve serve --bundle
DIR`` and ``multiserve bundle``."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_type_hints

from multiserve import __version__
from multiserve.bundle import BundleError
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
