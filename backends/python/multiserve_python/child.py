"""The child process of an isolated predictor: ``python -m multiserve_python.child FD``.

It reads messages from the socket ``FD`` (pickled by `multiprocessing.connection`): first
``("init", spec)``, answered ``("ready", info)`` or ``("failed", message)``; then
``("predict", batch, requests)``, answered ``("replies", [...])`` or ``("error", code,
message)``; and ``("close",)``. It exits when the server closes the socket, so it never
outlives the server for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import resource
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from types import MappingProxyType
from typing import Any

from multiserve.types import ModelLoadFailed, MultiserveError, PayloadRequest, Reply
from multiserve_python import contract


def main(argv: list[str]) -> int:
    connection = Connection(int(argv[1]))
    faulthandler.enable()  # a segfault prints the Python stack before the process dies
    # Ctrl-C in the server's terminal reaches its whole process group: the server ends this
    # process itself (or its end of the socket closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _, spec = connection.recv()
    except (EOFError, OSError):
        return 0
    logging.basicConfig(
        level=spec["log_level"],
        format=f"%(asctime)s %(levelname)s predictor {spec['label']} [{os.getpid()}]: %(message)s",
    )
    _prefer_as_oom_victim()
    if spec["memory_limit"]:
        resource.setrlimit(resource.RLIMIT_DATA, (spec["memory_limit"], spec["memory_limit"]))
    try:
        predictor = contract.load(
            Path(spec["version_dir"]),
            spec["config"],
            spec["class_name"],
            None,
            spec["label"],
            isolated=True,
        )
    except ModelLoadFailed as exc:
        connection.send(("failed", exc.message))
        return 1
    except BaseException as exc:
        connection.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    connection.send(
        (
            "ready",
            {
                "class": predictor.class_name,
                "batches": predictor.batches,
                "is_async": predictor.is_async,
            },
        )
    )
    loop = asyncio.new_event_loop() if predictor.is_async else None
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return 0  # the server went away
        if message[0] == "close":
            with contextlib.suppress(Exception):
                predictor.close()
            with contextlib.suppress(OSError):
                connection.send(("closed",))
            return 0
        _, batch, wire = message
        connection.send(_answer(predictor, loop, batch, wire))


def _answer(
    predictor: contract.Predictor,
    loop: asyncio.AbstractEventLoop | None,
    batch: bool,
    wire: list[tuple[bytes, str, dict[str, str], dict[str, str]]],
) -> tuple[Any, ...]:
    requests = [
        PayloadRequest(body, content_type, MappingProxyType(query), MappingProxyType(headers))
        for body, content_type, query, headers in wire
    ]
    replies: list[Reply]
    try:
        if batch:
            replies = predictor.predict_batch(requests)
        elif loop is not None:
            replies = [loop.run_until_complete(predictor.predict_async(r)) for r in requests]
        else:
            replies = [predictor.predict(r) for r in requests]
    except MultiserveError as exc:
        return ("error", exc.code, exc.message)
    except Exception as exc:
        return ("error", "prediction_failed", f"{type(exc).__name__}: {exc}")
    return ("replies", [(r.status, r.media_type, r.headers, r.body) for r in replies])


def _prefer_as_oom_victim() -> None:
    """Ask the kernel to kill this process, not the server, when memory runs out."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
        adj.write("1000")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
