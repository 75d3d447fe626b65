from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from multiserve.errors import SettingsError
from multiserve.settings import Settings, parse_size

ROOT = Path(__file__).resolve().parents[2]


def test_documented_defaults_match_the_code() -> None:
    documented = Settings.load(ROOT / "config/multiserve.toml", environ={})
    assert documented == Settings()
    keys = set(tomllib.loads((ROOT / "config/multiserve.toml").read_text()))
    assert keys == {f.name for f in dataclasses.fields(Settings)}


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "multiserve.toml"
    config.write_text('port = 7000\nhost = "0.0.0.0"\nlog_level = "debug"\n')
    settings = Settings.load(
        config,
        environ={"MULTISERVE_PORT": "7001", "MULTISERVE_LOG_LEVEL": "warning"},
        overrides={"port": "7002", "models": "/srv/models", "host": None},
    )
    assert settings.port == 7002
    assert settings.log_level == "warning"
    assert settings.host == "0.0.0.0"
    assert settings.models == "/srv/models"


def test_config_file_named_by_env(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("worker_threads = 3\n")
    assert Settings.load(environ={"MULTISERVE_CONFIG": str(config)}).worker_threads == 3


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"MULTISERVE_PORT": "70000"}, "MULTISERVE_PORT: expected an integer from 0 to 65535"),
        ({"MULTISERVE_WORKER_THREADS": "-1"}, "MULTISERVE_WORKER_THREADS"),
        ({"MULTISERVE_ACCESS_LOG": "maybe"}, "expected true or false"),
        ({"MULTISERVE_SHUTDOWN_TIMEOUT_S": "soon"}, "MULTISERVE_SHUTDOWN_TIMEOUT_S"),
        ({"MULTISERVE_MAX_REQUEST_BYTES": "12 parsecs"}, "'512MiB'"),
    ],
)
def test_invalid_values_name_the_key_and_what_is_allowed(
    environ: dict[str, str], fragment: str
) -> None:
    with pytest.raises(SettingsError, match=fragment):
        Settings.load(environ=environ)


def test_unknown_and_invalid_config_file_keys(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("prot = 80\n")
    with pytest.raises(SettingsError, match="unknown key 'prot'"):
        Settings.load(config, environ={})
    config.write_text('port = "eighty"\n')
    with pytest.raises(SettingsError, match=r"port \(in .*c.toml\)"):
        Settings.load(config, environ={})
    config.write_text("port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        Settings.load(config, environ={})


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        (4096, 4096),
        ("512MiB", 512 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("10kib", 10 * 1024),
        ("7 B", 7),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-5", "5 PiB", "five", True])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_every_switch_is_a_bare_flag_and_a_negated_one() -> None:
    from typing import get_type_hints

    from multiserve.cli import build_parser

    switches = [name for name, kind in get_type_hints(Settings).items() if kind is bool]
    assert {
        "watch",
        "warmup",
        "access_log",
        "allow_external_symlinks",
        "allow_python_predictors",
    } <= set(switches)
    parser = build_parser()
    for name in switches:
        flag = name.replace("_", "-")
        on = parser.parse_args(["serve", f"--{flag}"])
        off = parser.parse_args(["serve", f"--no-{flag}"])
        spelled = parser.parse_args(["serve", f"--{flag}", "false"])
        loaded = [
            getattr(Settings.load(environ={}, overrides={name: getattr(args, name)}), name)
            for args in (on, off, spelled)
        ]
        assert loaded == [True, False, False], name
        unset = parser.parse_args(["serve"])
        assert getattr(unset, name) is None  # the file and the environment still decide


def test_serve_help_shows_defaults_and_bucket_urls() -> None:
    import argparse

    from multiserve.cli import build_parser

    (commands,) = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    serve = commands.choices["serve"]
    text = " ".join(serve.format_help().split())
    for url in ("s3://", "gs://", "az://"):
        assert url in text
    assert "(default: 64MiB)" in text  # max_request_bytes
    assert "(default: 8000)" in text  # port
    assert "(default: on; --no-watch turns it off)" in text
