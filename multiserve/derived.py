"""Where derived artifacts live: one directory per (source content, recipe, runtime, machine),
built once, moved into place whole, and shared by every later load, eviction and restart.

A derived artifact (an optimised or exported model, or a runtime's optimised graph) depends on
the bytes of the files it was made from, on the versions of the libraries that made and run it,
and on the machine (ONNX Runtime bakes CPU-specific layouts into graphs it optimises). The key
covers all three, so a directory that exists under a key is always right to reuse, and nothing
is ever written into the model repository.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import threading
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from pathlib import Path
from typing import Any

from multiserve.backends import ENTRY_POINT_GROUP
from multiserve.repository.disk_cache import DiskCache

# Bumped when what a derived directory holds changes meaning: old entries are then never reused.
FORMAT = 1
DEFAULT_ROOT = Path("~/.cache/multiserve/derived")
_BLOCK = 1 << 20
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


_digests: dict[tuple[str, int, int, int], str] = {}
_digests_lock = threading.Lock()


def content_sha256(path: Path) -> str:
    """A file's sha256, remembered for as long as its size, mtime and inode stay the same, so a
    version reloaded after an eviction is not read twice."""
    stat = path.stat()
    signature = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    with _digests_lock:
        known = _digests.get(signature)
    if known is not None:
        return known
    digest = file_sha256(path)
    with _digests_lock:
        if len(_digests) > 4096:
            _digests.clear()
        _digests[signature] = digest
    return digest


def directory_digest(directory: Path, exclude: Iterable[str] = ()) -> str:
    """The content of every file under ``directory`` (names and bytes), as one hex digest."""
    skip = set(exclude)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative in skip:
            continue
        digest.update(f"{relative}\0{content_sha256(path)}\n".encode())
    return digest.hexdigest()


def checksum_mismatch(artifact: Path) -> bool:
    """Whether ``artifact`` has a ``.sha256`` sidecar that it does not match."""
    sidecar = artifact.with_name(artifact.name + ".sha256")
    if not sidecar.is_file() or not artifact.is_file():
        return False
    words = sidecar.read_text().split()
    return not words or content_sha256(artifact) != words[0].lower()


def write_checksum(artifact: Path) -> Path:
    sidecar = artifact.with_name(artifact.name + ".sha256")
    sidecar.write_text(f"{file_sha256(artifact)}  {artifact.name}\n")
    return sidecar


@functools.cache
def runtime_versions() -> dict[str, str]:
    """The installed version of every backend distribution and of each package it depends on
    (extras included): whatever can change how a model is derived or how fast it runs. Read
    from package metadata: nothing is imported."""
    names: set[str] = {"multiserve"}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.dist is None:
            continue
        names.add(entry_point.dist.name)
        for requirement in entry_point.dist.requires or ():
            match = _REQUIREMENT_NAME.match(requirement)
            if match is not None:
                names.add(match.group(1))
    versions = {}
    for name in sorted(names):
        try:
            versions[name.lower()] = distribution(name).version
        except PackageNotFoundError:
            continue
    return versions


@functools.cache
def machine() -> dict[str, str]:
    """What identifies this machine's instruction set: optimised graphs made on one CPU may
    not run, or not run as fast, on another."""
    described = {"system": platform.system(), "arch": platform.machine()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return described
    for key in ("model name", "flags"):
        match = re.search(rf"^{key}\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
        if match is not None:
            value = match.group(1).strip()
            described[key] = " ".join(sorted(value.split())) if key == "flags" else value
    return described


def derivation_key(recipe: str, source_digest: str, inputs: Mapping[str, Any]) -> str:
    """The key of one derived artifact: what it is made of (``source_digest``), how
    (``recipe`` and ``inputs``, e.g. the backend options), with which libraries, on what."""
    material = {
        "format": FORMAT,
        "recipe": recipe,
        "source": source_digest,
        "inputs": inputs,
        "runtime": runtime_versions(),
        "machine": machine(),
    }
    encoded = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


class DerivedStore:
    """Derived artifacts on disk, bounded in bytes, least recently used removed first.

    An entry is a directory ``<root>/<model>/<version>/<recipe>-<key>``, built under a
    temporary name and renamed into place once complete, so one that exists is whole: several
    processes may share the root. Created on first use.
    """

    def __init__(self, root: Path | None = None, max_bytes: int = 10 * 1024**3) -> None:
        self.root = (root if root is not None else DEFAULT_ROOT).expanduser()
        self.max_bytes = max_bytes
        self._disk: DiskCache | None = None
        self._lock = threading.Lock()

    @property
    def disk(self) -> DiskCache:
        with self._lock:
            if self._disk is None:
                self._disk = DiskCache(self.root, self.max_bytes)
            return self._disk

    def path(self, model: str, version: int, recipe: str, key: str) -> Path:
        return self.disk.path(model, str(version), f"{recipe}-{key}")

    def lookup(self, path: Path) -> bool:
        """Whether the entry exists (and mark it most recently used)."""
        return self.disk.lookup(path)

    def staging(self) -> Path:
        return self.disk.staging()

    def commit(self, staging: Path, path: Path) -> None:
        self.disk.commit(staging, path)

    def discard(self, staging: Path) -> None:
        self.disk.discard(staging)

    def entries(self) -> list[Path]:
        return sorted(directory for directory, _, _ in self.disk.entries())
