"""Typed settings. Precedence, lowest first: the defaults below (documented, with the same
values, in ``config/multiserve.toml``), a TOML config file, ``MULTISERVE_*`` environment
variables, CLI flags.

Every value is validated when it is read; an invalid one raises `SettingsError` naming the key
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multiserve.errors import SettingsError

ENV_PREFIX = "MULTISERVE_"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+)$")


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``, ``"4096"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.match(str(value))
    if match is None:
        raise ValueError("expected a size in bytes, such as 1048576, '512MiB' or '2GiB'")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


def _int_in(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer from {low} to {high}")
        try:
            number = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ValueError(f"expected an integer from {low} to {high}") from None
        if not low <= number <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return number

    return parse


def _positive_float(value: object) -> float:
    try:
        number = float(str(value)) if not isinstance(value, int | float) else float(value)
    except ValueError:
        raise ValueError("expected a number of seconds >= 0") from None
    if number < 0 or isinstance(value, bool):
        raise ValueError("expected a number of seconds >= 0")
    return number


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text

    return parse


def _device(value: object) -> str:
    text = str(value).strip().lower()
    if not _DEVICE.match(text):
        raise ValueError("expected 'cpu', 'cuda' or 'cuda:N'")
    return text


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _fraction(value: object) -> float:
    try:
        number = float(str(value)) if not isinstance(value, int | float) else float(value)
    except ValueError:
        raise ValueError("expected a fraction from 0 to 1") from None
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise ValueError("expected a fraction from 0 to 1")
    return number


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _setting(default: Any, parse: Callable[[object], Any], doc: str) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc})


@dataclass(frozen=True, slots=True)
class Settings:
    models: str = _setting(
        "",
        _text,
        "Model repository: a local directory of <name>/<version>/<artifact>, or a bucket: "
        "s3://bucket/prefix, gs://bucket/prefix or az://container/prefix.",
    )
    host: str = _setting("127.0.0.1", _text, "Address to listen on; 0.0.0.0 for every interface.")
    port: int = _setting(8000, _int_in(0, 65535), "TCP port to listen on; 0 picks a free one.")
    grpc_port: int = _setting(
        8001,
        _int_in(0, 65535),
        "TCP port of the gRPC server (the Open Inference Protocol, as Triton's and KServe's "
        "gRPC clients speak it), on the same host; 0 turns it off.",
    )
    log_level: str = _setting(
        "info", _choice(*LOG_LEVELS), "Log level: " + ", ".join(LOG_LEVELS) + "."
    )
    max_request_bytes: int = _setting(
        64 * 1024**2, parse_size, "Largest request body accepted; larger ones get 413."
    )
    worker_threads: int = _setting(
        16, _int_in(1, 1024), "Threads that run model loads and file I/O off the event loop."
    )
    inference_threads: int = _setting(
        1,
        _int_in(1, 256),
        "Threads per loaded model that run its requests. A model's config.toml may set its own.",
    )
    max_batch_size: int = _setting(
        1,
        _int_in(1, 1_000_000),
        "Rows of requests waiting together that one model call may take (dynamic batching); "
        "1: one call per request. A model's config.toml may set its own.",
    )
    device: str = _setting(
        "cpu", _device, "Device for models whose config.toml names none: cpu, cuda or cuda:N."
    )
    poll_interval_s: float = _setting(
        10.0,
        _positive_float,
        "Seconds between listings of a bucket repository (s3://, gs://, az://).",
    )
    bucket_endpoint: str = _setting(
        "",
        _text,
        "Object store endpoint URL, for S3-compatible stores such as MinIO. Empty: the "
        "cloud's environment variables (AWS_ENDPOINT_URL, ...), else the cloud's own.",
    )
    bucket_region: str = _setting(
        "", _text, "Bucket region (S3). Empty: from AWS_REGION / AWS_DEFAULT_REGION."
    )
    bucket_allow_http: bool = _setting(
        False,
        _bool,
        "Allow plain-HTTP endpoints (an S3-compatible store on a private network). False: "
        "as the environment says (AWS_ALLOW_HTTP, AZURE_ALLOW_HTTP, GOOGLE_ALLOW_HTTP).",
    )
    disk_cache_dir: str = _setting(
        "", _text, "Where versions downloaded from a bucket are kept. Empty: ~/.cache/multiserve."
    )
    disk_cache_bytes: int = _setting(
        10 * 1024**3,
        parse_size,
        "Bound on the disk cache (e.g. '20GiB'); least recently used "
        "versions are deleted first. 0: no bound.",
    )
    max_models: int = _setting(
        0,
        _int_in(0, 1_000_000),
        "Most models loaded at once; the least recently used unpinned "
        "one is evicted to load another. 0: no bound.",
    )
    max_memory: int = _setting(
        0,
        parse_size,
        "Most bytes of loaded models (e.g. '2GiB'); the least recently used "
        "unpinned ones are evicted to stay under it. 0: no bound.",
    )
    cache_policy: str = _setting(
        "tinylfu",
        _choice("lru", "tinylfu"),
        "Which loaded model makes room for another: tinylfu (a frequency sketch keeps the "
        "models asked for most against one-off newcomers; best on skewed traffic) or lru (the "
        "least recently used). A miss is loaded and served either way.",
    )
    optimize_cache_dir: str = _setting(
        "",
        _text,
        "Where models derived by optimize / export (a model's config.toml) are kept, keyed by "
        "their source files, runtime and machine. Empty: ~/.cache/multiserve/derived.",
    )
    optimize_cache_bytes: int = _setting(
        10 * 1024**3,
        parse_size,
        "Bound on optimize_cache_dir (e.g. '20GiB'); least recently used derived models are "
        "deleted first. 0: no bound.",
    )
    optimize_timeout_s: float = _setting(
        600.0,
        _positive_float,
        "Longest a derivation (optimize / export) and its check may take; past it the original "
        "serves.",
    )
    load_threads: int = _setting(
        0,
        _int_in(0, 64),
        "Model loads (and closes) that may run at once, admitted in the order they were asked "
        "for. 1 makes each load's memory measurable and bounds what loads in flight hold; more "
        "loads cold models faster. 0: from the core count (half the cores, 1 to 4).",
    )
    watch: bool = _setting(
        True, _bool, "Watch the repository and pick up new, changed and deleted versions live."
    )
    rescan_interval_s: float = _setting(
        60.0,
        _positive_float,
        "A local repository is also scanned in full this often, in case the file-system "
        "watch missed an event (and with watch off). 0: never.",
    )
    empty_grace_s: float = _setting(
        30.0,
        _positive_float,
        "A listing that suddenly holds no models, where the previous one held some, is taken "
        "for an outage this long (models keep serving, /readyz degraded) before they retire.",
    )
    allow_external_symlinks: bool = _setting(
        False,
        _bool,
        "Serve files reached through symbolic links that point outside the repository "
        "(off: such a version fails with a message naming the link).",
    )
    settle_window_s: float = _setting(
        1.0,
        _positive_float,
        "A version loads once its files have not changed for this long "
        "(or at once when its READY marker file exists).",
    )
    settle_wait_s: float = _setting(
        5.0,
        _positive_float,
        "A request for a version whose files are still settling, or that the repository holds "
        "but no scan has seen yet, waits this long for it before 503 with Retry-After.",
    )
    startup_timeout_s: float = _setting(
        60.0,
        _positive_float,
        "At start, /readyz waits (503, with the reason) until every version the first scan "
        "found has settled and every pinned version has loaded, or failed; at most this long.",
    )
    version_policy: str = _setting(
        "latest",
        _choice("latest", "all"),
        "After a swap: 'latest' unloads older versions "
        "(unless pinned or labelled); 'all' leaves them to the LRU. A model's config.toml may "
        "set its own.",
    )
    warmup: bool = _setting(
        True, _bool, "Run one inference on each model after loading it, before it serves."
    )
    admin_token: str = _setting(
        "", _text, "Bearer token for /admin. Empty: one is generated at start and logged once."
    )
    state_dir: str = _setting(
        "", _text, "Where pins and labels are saved. Empty: <models>/.multiserve."
    )
    access_log: bool = _setting(False, _bool, "Log one line per request.")
    allow_python_predictors: bool = _setting(
        False,
        _bool,
        "Serve Python predictors (predictor.py in a version directory). Their code runs with "
        "the server's privileges, so it is off: such versions fail with a reason saying so, "
        "and nothing from their predictor.py is imported or run.",
    )
    predictor_isolation: str = _setting(
        "none",
        _choice("none", "process"),
        "Where Python predictors run when their config.toml sets no `isolation`: 'none' (in "
        "the server's process) or 'process' (a child process each: a crash fails only that "
        "model's requests in flight).",
    )
    shutdown_timeout_s: float = _setting(
        30.0,
        _positive_float,
        "Seconds to let running requests finish on SIGTERM or SIGINT (fractions honoured); "
        "those still running then get 503. A second signal exits at once.",
    )
    # --- bounds under overload (multiserve.admission, multiserve.connections) ---
    max_queue: int = _setting(
        128,
        _int_in(0, 1_000_000),
        "Requests that may wait per model version beyond those it runs at once; past it a "
        "request gets 503 with Retry-After at once. 0: no bound.",
    )
    request_timeout_s: float = _setting(
        0.0,
        _positive_float,
        "Longest a request may take from arrival to answer; a request still queued then is "
        "dropped unrun (504). A client's X-Request-Timeout header may ask for less. 0: none.",
    )
    max_receive_bytes: int = _setting(
        256 * 1024**2,
        parse_size,
        "Bytes of request bodies the whole process may hold while receiving and serving them; "
        "past it a request gets 503 with Retry-After. 0: no bound.",
    )
    max_connections: int = _setting(
        1000,
        _int_in(0, 10_000_000),
        "Open HTTP connections (and requests in progress) beyond which a new one gets 503 "
        "(uvicorn's limit_concurrency). 0: no bound.",
    )
    keepalive_timeout_s: float = _setting(
        5.0, _positive_float, "Seconds an idle keep-alive connection stays open."
    )
    drift_window: int = _setting(
        1000,
        _int_in(0, 1_000_000),
        "Input drift: the statistics of each loaded version's inputs are taken over a sliding "
        "window of its last this many rows, against its reference. 0: drift monitoring off.",
    )
    drift_reference_rows: int = _setting(
        1000,
        _int_in(0, 10_000_000),
        "Input drift: a version without a reference.npz (in its directory, or its model's) "
        "takes the first this many rows it serves as its reference. 0: only reference.npz.",
    )
    drift_threshold: float = _setting(
        0.2,
        _positive_float,
        "Input drift: a version is drifting when any feature's population stability index "
        "(PSI) is above this (0.1: a moderate shift, 0.2: a significant one).",
    )
    drift_sample_rate: float = _setting(
        1.0,
        _fraction,
        "Input drift: the fraction of requests whose rows the statistics take (1: all).",
    )
    payload_log_dir: str = _setting(
        "",
        _text,
        "Payload samples: where sampled requests and their answers are written as JSON Lines "
        "(payloads.jsonl, rotated). Empty: no payload samples.",
    )
    payload_log_rate: float = _setting(
        0.01, _fraction, "Payload samples: the fraction of requests logged (from 0 to 1)."
    )
    payload_log_shapes_only: bool = _setting(
        False,
        _bool,
        "Payload samples: log each tensor's dtype and shape but not its values.",
    )
    payload_log_file_bytes: int = _setting(
        16 * 1024**2,
        parse_size,
        "Payload samples: payloads.jsonl is rotated past this size (e.g. '64MiB').",
    )
    payload_log_max_bytes: int = _setting(
        256 * 1024**2,
        parse_size,
        "Payload samples: bound on all the files together; the oldest are deleted first.",
    )

    @classmethod
    def docs(cls) -> dict[str, str]:
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls)}

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, object] | None = None,
    ) -> Settings:
        """Merge the config file, the environment and explicit overrides (CLI flags)."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}

        if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
            config_file = environ[ENV_PREFIX + "CONFIG"]
        if config_file is not None:
            path = Path(config_file)
            try:
                table = tomllib.loads(path.read_text())
            except OSError as exc:
                raise SettingsError(f"config file {str(path)!r}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
            for key, value in table.items():
                if key not in fields:
                    raise SettingsError(
                        f"config file {str(path)!r}: unknown key {key!r}; known keys: "
                        + ", ".join(fields)
                    )
                values[key] = _parse(fields[key], value, f"{key} (in {path})")

        for name, spec in fields.items():
            env_name = ENV_PREFIX + name.upper()
            if env_name in environ:
                values[name] = _parse(spec, environ[env_name], env_name)

        for name, value in (overrides or {}).items():
            if value is None:
                continue
            if name not in fields:
                raise SettingsError(f"unknown setting {name!r}")
            values[name] = _parse(fields[name], value, "--" + name.replace("_", "-"))
        return cls(**values)


def _parse(spec: dataclasses.Field[Any], value: object, source: str) -> Any:
    try:
        return spec.metadata["parse"](value)
    except ValueError as exc:
        raise SettingsError(f"invalid value {value!r} for {source}: {exc}") from None
