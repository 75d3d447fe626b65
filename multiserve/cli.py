"""``multiserve serve --models DIR`` (also ``python -m multiserve``)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import Any, get_type_hints

from multiserve import __version__
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
