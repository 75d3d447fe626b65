"""What makes a reload cheap: a backend's own load artifacts (ONNX: the graph ONNX Runtime
optimised), kept once per set of files and reused by every later load of them.

A model evicted under a tight cache is loaded again soon, often within seconds; most of a small
ONNX model's session creation is graph optimisation that gives the same answer every time. A
backend that declares ``caches_loads = True`` is handed a directory (`LoadContext.load_cache`)
in the derived-artifact store (`multiserve.derived.DerivedStore`, bounded by
``optimize_cache_bytes``): keyed by the content of the version's files, the options it loads
with, the runtimes' versions and the machine, so an entry that exists is always right to reuse
and new files (or options, or an upgrade) never meet an old entry. The first load fills a
staging directory that is renamed into place whole after the load succeeded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multiserve.catalog import VersionRecord
from multiserve.derived import DerivedStore, derivation_key, directory_digest
from multiserve.types import Backend

logger = logging.getLogger("multiserve.lifecycle")

RECIPE = "load"


@dataclass(frozen=True, slots=True)
class LoadCacheEntry:
    """One load's directory: the entry itself on a hit, else a staging directory to fill."""

    directory: Path
    hit: bool
    entry: Path


def open_entry(
    store: DerivedStore,
    record: VersionRecord,
    backend: Backend,
    path: Path,
    options: Mapping[str, Any],
) -> LoadCacheEntry | None:
    """The directory ``backend`` may cache the load of ``path`` (with ``options``) in, or None
    when it does not cache loads or the store cannot be used (a load never fails for it)."""
    if not getattr(backend, "caches_loads", False):
        return None
    try:
        inputs = json.loads(json.dumps(dict(options), sort_keys=True, default=str))
        key = derivation_key(f"{RECIPE}-{backend.name}", directory_digest(path), inputs)
        entry = store.path(record.name, record.version, f"{RECIPE}-{backend.name}", key)
        if store.lookup(entry):
            return LoadCacheEntry(entry, True, entry)
        return LoadCacheEntry(store.staging(), False, entry)
    except OSError as exc:
        logger.warning(
            "%s version %d: the load cache is unusable (%s); loading without it",
            record.name,
            record.version,
            exc,
        )
        return None


def close_entry(store: DerivedStore, opened: LoadCacheEntry | None, loaded: bool) -> None:
    """Keep what a successful first load wrote (nothing written: nothing kept)."""
    if opened is None or opened.hit:
        return
    try:
        if loaded and any(opened.directory.iterdir()):
            store.commit(opened.directory, opened.entry)
        else:
            store.discard(opened.directory)
    except OSError as exc:
        logger.warning("could not keep a load cache entry in %s: %s", opened.entry, exc)
        store.discard(opened.directory)
