"""A model repository in an object store (``s3://``, ``gs://``, ``az://``) through obstore.

The listing is polled; a version is complete once its listing (keys, sizes, ETags) is the same
on two consecutive polls, or once its ``READY`` marker object exists, or, at the first listing
after start, once every object of it is older than the settle window (it was complete before
the server started: no second poll needed). Versions are downloaded
when they are loaded, into a bounded disk cache, so that a model evicted from memory reloads
without a download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import AzureStore, GCSStore, S3Store

from multiserve.backends import BackendRegistry
from multiserve.catalog import Ident, VersionRecord
from multiserve.errors import VersionGone
from multiserve.repository import RepositoryUnavailable, describe
from multiserve.repository.classify import NO_ARTIFACT, classify
from multiserve.repository.disk_cache import DiskCache
from multiserve.repository.layout import CONFIG_FILE, MARKER_FILE, is_valid_name, parse_version

logger = logging.getLogger("multiserve.repository")

SCHEMES = ("s3", "gs", "az")
_PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class BucketOptions:
    endpoint: str = ""
    region: str = ""
    allow_http: bool = False


@dataclass(frozen=True, slots=True)
class _Object:
    key: str
    size: int
    etag: str
    modified: float  # the store's last-modified time, as a POSIX timestamp


# Each cloud's prefix for its standard environment variables, and the HTTP client options
# those may set (as object_store reads them: AWS_ALLOW_HTTP, AZURE_PROXY_URL, ...). Client
# options passed explicitly replace the environment's as a whole, so they are read here and
# passed along with ours.
_ENV_PREFIXES = {"s3": "AWS_", "gs": "GOOGLE_", "az": "AZURE_"}
_CLIENT_KEYS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "http1_only",
        "http2_only",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "timeout",
        "user_agent",
    }
)


def is_bucket_url(text: str) -> bool:
    return urlparse(text).scheme in SCHEMES


def open_store(url: str, options: BucketOptions, environ: Mapping[str, str] | None = None) -> Any:
    """An obstore store for the URL. Everything the settings leave unset comes from each
    cloud's standard environment variables (``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``,
    ``AWS_REGION``, credentials; ``GOOGLE_*``; ``AZURE_*``), as obstore reads them."""
    parsed = urlparse(url)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    environ = os.environ if environ is None else environ
    env_prefix = _ENV_PREFIXES[parsed.scheme]
    client: dict[str, Any] = {
        "connect_timeout": timedelta(seconds=5),
        "timeout": timedelta(minutes=30),
    }
    for name, value in environ.items():
        key = name[len(env_prefix) :].lower()
        if name.startswith(env_prefix) and key in _CLIENT_KEYS:
            client[key] = value
    if options.allow_http:
        client["allow_http"] = True
    # A few quick retries: polling retries on its own, with backoff, and an outage must not
    # hold a poll for minutes.
    retry: dict[str, Any] = {"max_retries": 2, "retry_timeout": timedelta(seconds=10)}
    config: dict[str, Any] = {}
    if options.endpoint:
        config["endpoint"] = options.endpoint
    if options.region and parsed.scheme == "s3":
        config["region"] = options.region
    kwargs: dict[str, Any] = {
        "prefix": prefix or None,
        "config": config or None,
        "client_options": client,
        "retry_config": retry,
    }
    stores = {"s3": S3Store, "gs": GCSStore, "az": AzureStore}
    return stores[parsed.scheme](bucket, **kwargs)


class BucketRepository:
    def __init__(
        self,
        url: str,
        registry: BackendRegistry,
        cache: DiskCache,
        options: BucketOptions,
        poll_interval_s: float,
        settle_window_s: float = 1.0,
    ) -> None:
        self.url = url
        self.registry = registry
        self.cache = cache
        self.poll_interval_s = poll_interval_s
        self.settle_window_s = settle_window_s
        self.store = open_store(url, options)
        self._listed = False
        self._previous: dict[tuple[str, int], str] = {}
        self._first_seen: dict[tuple[str, int, str], float] = {}
        self._configs: dict[str, tuple[str, dict[str, Any] | str]] = {}
        self._progress: dict[Ident, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.downloads = 0

    @property
    def root(self) -> str:
        return self.url

    # --- discovery ------------------------------------------------------------------------

    def scan(self) -> list[VersionRecord]:
        """One poll of the listing. Raises RepositoryUnavailable, with one readable line, when
        the store cannot be listed; the caller keeps what it had and retries."""
        try:
            return self._scan()
        except obstore.exceptions.BaseError as exc:
            logger.debug("listing %s failed", self.url, exc_info=True)
            raise RepositoryUnavailable(f"{self.url}: {describe(exc)}") from None

    def _scan(self) -> list[VersionRecord]:
        objects = [
            _Object(
                str(meta["path"]),
                int(meta["size"]),
                str(meta.get("e_tag") or ""),
                _timestamp(meta.get("last_modified")),
            )
            for batch in obstore.list(self.store)
            for meta in batch
        ]
        models: dict[str, dict[str, list[_Object]]] = {}
        model_configs: dict[str, _Object] = {}
        for item in objects:
            parts = PurePosixPath(item.key).parts
            if len(parts) == 2 and parts[1] == CONFIG_FILE:
                model_configs[parts[0]] = item
            elif len(parts) >= 3 and is_valid_name(parts[0]) and parse_version(parts[1]):
                models.setdefault(parts[0], {}).setdefault(parts[1], []).append(item)
        now = time.time()
        records = []
        seen: dict[tuple[str, int], str] = {}
        for name, versions in sorted(models.items()):
            model_config, model_problem = self._config(model_configs.get(name))
            for text, items in sorted(versions.items()):
                version = parse_version(text)
                assert version is not None
                record = self._record(name, version, items, model_config, model_problem, now)
                seen[(name, version)] = record.fingerprint
                records.append(record)
        self._previous = seen
        self._listed = True
        self._first_seen = {
            key: first for key, first in self._first_seen.items() if seen.get(key[:2]) == key[2]
        }
        return records

    def _record(
        self,
        name: str,
        version: int,
        items: list[_Object],
        model_config: dict[str, Any],
        model_problem: str | None,
        now: float,
    ) -> VersionRecord:
        relative = {
            str(PurePosixPath(item.key).relative_to(name, str(version))): item for item in items
        }
        digest = hashlib.blake2b(digest_size=12)
        for key in sorted(relative):
            digest.update(f"{key}\0{relative[key].size}\0{relative[key].etag}\n".encode())
        fingerprint = digest.hexdigest()
        version_config, problem = self._config(relative.get(CONFIG_FILE))
        path = self.cache.path(name, str(version), fingerprint)
        found = classify(
            self.registry,
            path,
            list(relative),
            model_config,
            version_config,
            problem or model_problem,
        )
        # Complete: marked, or listed the same way by the previous poll, or (at the first
        # listing) quiet for the settle window already: it was whole before the server started.
        complete = (
            MARKER_FILE in relative
            or self._previous.get((name, version)) == fingerprint
            or (
                not self._listed
                and all(now - item.modified >= self.settle_window_s for item in items)
            )
        )
        first_seen = self._first_seen.setdefault((name, version, fingerprint), now)
        return VersionRecord(
            name=name,
            version=version,
            path=path,
            backend=found.backend,
            artifact=found.artifact,
            options=found.options,
            problem=found.problem if found.loadable else NO_ARTIFACT,
            fingerprint=fingerprint,
            # An incomplete version must wait for the next poll, not for a settle window.
            changed_at=first_seen if complete else float("inf"),
            marker=complete,
            size_bytes=sum(item.size for item in items),
            **found.serving(),
        )

    def _config(self, item: _Object | None) -> tuple[dict[str, Any], str | None]:
        if item is None:
            return {}, None
        cached = self._configs.get(item.key)
        if cached is None or cached[0] != item.etag:
            try:
                text = bytes(obstore.get(self.store, item.key).bytes()).decode()
                cached = (item.etag, tomllib.loads(text))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                cached = (item.etag, f"{item.key} is not valid TOML: {exc}")
            self._configs[item.key] = cached
        value = cached[1]
        return ({}, value) if isinstance(value, str) else (value, None)

    def read_model_file(self, name: str, filename: str) -> bytes | None:
        """An object of the model's own prefix (its config.toml), or None if there is none."""
        try:
            return bytes(obstore.get(self.store, f"{name}/{filename}").bytes())
        except (NotFoundError, FileNotFoundError):
            return None

    # --- downloads ------------------------------------------------------------------------

    def materialize(self, record: VersionRecord) -> Path:
        """The version's files on local disk, downloaded first if the disk cache lacks them."""
        if self.cache.lookup(record.path):
            return record.path
        prefix = f"{record.name}/{record.version}/"
        items = [meta for batch in obstore.list(self.store, prefix=prefix) for meta in batch]
        if not items:
            raise VersionGone(
                f"{record.name} version {record.version}: its objects are gone from {self.url}"
            )
        total = sum(int(meta["size"]) for meta in items)
        staging = self.cache.staging()
        done = 0
        last_report = time.monotonic()
        with self._lock:
            self._progress[record.ident] = (0, total)
        try:
            for meta in items:
                target = staging / str(meta["path"])[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as stream:
                    for chunk in obstore.get(self.store, str(meta["path"])):
                        stream.write(chunk)
                        done += len(chunk)
                        with self._lock:
                            self._progress[record.ident] = (done, total)
                        if time.monotonic() - last_report >= _PROGRESS_EVERY_S:
                            last_report = time.monotonic()
                            logger.info(
                                "downloading %s version %d: %d of %d bytes (%.0f%%)",
                                record.name,
                                record.version,
                                done,
                                total,
                                100 * done / max(total, 1),
                            )
            self.cache.commit(staging, record.path)
        except BaseException:
            self.cache.discard(staging)
            raise
        finally:
            with self._lock:
                self._progress.pop(record.ident, None)
        self.downloads += 1
        logger.info("downloaded %s version %d (%d bytes)", record.name, record.version, total)
        return record.path

    def progress(self, record: VersionRecord) -> tuple[int, int] | None:
        """(bytes done, bytes in all) while the version downloads, else None."""
        with self._lock:
            return self._progress.get(record.ident)

    def holds(self, name: str, selector: str) -> bool:
        """Not known without a listing, which a request must not cost: the next poll tells."""
        return False


def _timestamp(value: object) -> float:
    """A listing's last-modified time as a POSIX timestamp (0 when the store gives none: old
    enough to count as quiet)."""
    return value.timestamp() if isinstance(value, datetime) else 0.0
