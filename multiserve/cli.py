"""``multiserve serve --models DIR`` (also ``python -m multiserve``)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from multiserve import __version__
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
        if spec.type in ("bool", bool):  # a bare flag means true: --allow-python-predictors
            serve.add_argument(
                flag,
                dest=spec.name,
                metavar=metavar,
                nargs="?",
                const="true",
                help=spec.metadata["doc"],
            )
        else:
            serve.add_argument(flag, dest=spec.name, metavar=metavar, help=spec.metadata["doc"])
    return parser


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
