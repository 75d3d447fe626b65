"""Payload samples: a sampled log of requests and their answers, as JSON Lines, to retrain and
debug from.

The models' worker threads offer each answered request (`PayloadLog.offer`, after the answers
were handed back); a sampled one is queued for one background thread that encodes and writes
it. Nothing here blocks or fails a request: when the queue is full, or the directory cannot be
written (a full disk, a read-only mount), the sample is dropped and counted.

Each line: ``{"timestamp": <unix seconds>, "model": ..., "version": ..., "inputs": {name:
{"dtype", "shape", "data"}}, "outputs": {...}}`` (``data`` left out with ``shapes_only``).
The file being written is ``payloads.jsonl``; past ``file_bytes`` it is renamed to
``payloads-<unix ns>.jsonl`` and the oldest renamed files are deleted while all of them
together hold more than ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from multiserve.monitor import Observed
from multiserve.types import Array

logger = logging.getLogger("multiserve.samples")

CURRENT = "payloads.jsonl"
# Samples waiting for the writer; past it, samples are dropped rather than held in memory.
QUEUE_SIZE = 1024
# Least time between two warnings about dropped samples.
_WARN_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class SampleSettings:
    directory: Path
    rate: float = 0.01  # fraction of requests logged
    shapes_only: bool = False
    file_bytes: int = 16 * 1024**2  # the current file is rotated past this size
    max_bytes: int = 256 * 1024**2  # bound on all the files together


_Sample = tuple[float, str, int, Mapping[str, Array], Mapping[str, Array]]


class PayloadLog:
    """One per server. ``offer`` from any thread; ``close`` writes what is queued and stops."""

    def __init__(self, settings: SampleSettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._random = (rng or random.Random()).random
        self._queue: queue.Queue[_Sample | None] = queue.Queue(QUEUE_SIZE)
        self.written = 0
        self.dropped = 0
        self._warned_at = -_WARN_EVERY_S
        self._file: Any = None
        self._size = 0
        self._thread = threading.Thread(
            target=self._write_forever, name="multiserve-payload-log", daemon=True
        )
        self._thread.start()

    def offer(self, name: str, version: int, observed: Observed) -> None:
        """Sample the requests just answered (call from the worker, never raises)."""
        rate = self.settings.rate
        for inputs, outputs in observed:
            if rate < 1.0 and self._random() >= rate:
                continue
            try:
                self._queue.put_nowait((time.time(), name, version, inputs, outputs))
            except queue.Full:
                self._drop("the writer is behind")

    @property
    def idle(self) -> bool:
        """Every sample queued so far is written or dropped."""
        return self._queue.unfinished_tasks == 0

    def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)

    # --- in the writer thread ---------------------------------------------------------------

    def _drop(self, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            logger.warning("payload samples dropped (%d so far): %s", self.dropped, why)

    def _write_forever(self) -> None:
        while True:
            sample = self._queue.get()
            if sample is None:
                break
            try:
                self._write_one(sample)
            finally:
                self._queue.task_done()
        self._close_file()

    def _write_one(self, sample: _Sample) -> None:
        try:
            line = self._encode(sample)
        except Exception as exc:  # a model's odd output must not stop the writer
            self._drop(f"a sample could not be encoded: {exc}")
            return
        try:
            self._write(line)
            self.written += 1
        except OSError as exc:
            self._close_file()
            self._drop(f"cannot write to {self.settings.directory}: {exc}")

    def _encode(self, sample: _Sample) -> bytes:
        timestamp, name, version, inputs, outputs = sample
        shapes_only = self.settings.shapes_only
        record = {
            "timestamp": round(timestamp, 6),
            "model": name,
            "version": str(version),
            "inputs": {k: _tensor(v, shapes_only) for k, v in inputs.items()},
            "outputs": {k: _tensor(v, shapes_only) for k, v in outputs.items()},
        }
        return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"

    def _write(self, line: bytes) -> None:
        settings = self.settings
        if self._file is not None and self._size + len(line) > settings.file_bytes:
            self._rotate()
        if self._file is None:
            settings.directory.mkdir(parents=True, exist_ok=True)
            path = settings.directory / CURRENT
            self._file = open(path, "ab")  # noqa: SIM115 (kept open between samples)
            self._size = path.stat().st_size
            if self._size and self._size + len(line) > settings.file_bytes:
                self._rotate()
                return self._write(line)
        self._file.write(line)
        self._file.flush()
        self._size += len(line)

    def _rotate(self) -> None:
        self._close_file()
        directory = self.settings.directory
        os.replace(directory / CURRENT, directory / f"payloads-{time.time_ns()}.jsonl")
        self._size = 0
        self._trim()

    def _trim(self) -> None:
        """Delete the oldest rotated files while all the files hold more than max_bytes."""
        directory = self.settings.directory
        rotated = sorted(directory.glob("payloads-*.jsonl"))
        sizes = {path: path.stat().st_size for path in rotated}
        total = sum(sizes.values())
        current = directory / CURRENT
        if current.exists():
            total += current.stat().st_size
        for path in rotated:
            if total <= self.settings.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= sizes[path]

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _tensor(value: Array, shapes_only: bool) -> dict[str, Any]:
    array = np.asarray(value)
    described: dict[str, Any] = {"dtype": str(array.dtype), "shape": list(array.shape)}
    if not shapes_only:
        if array.dtype.kind in "USO" or array.ndim == 0:
            described["data"] = array.astype(str).tolist()
        else:
            described["data"] = np.ascontiguousarray(array)
    return described
