"""What each step between the HTTP floor and a full predict costs, measured on minimal apps.

    .venv/bin/python benchmarks/dispatch_cost.py [--rounds 3] [--seconds 5]

One uvicorn process (the same defaults as multiserve) serves eight POST routes, and multiserve
serves the same small MLP beside it; wrk (``-t2 -c16``) drives each in turns, the other server
paused:

- ``floor``: starlette route, read the body, answer fixed bytes (the HTTP floor);
- ``hop``: the floor plus one ``anyio.to_thread.run_sync`` of a function that does nothing;
- ``inline``: starlette route that decodes the JSON (orjson), runs onnxruntime and encodes the
  answer on the event loop;
- ``threaded``: the same work in ``anyio.to_thread.run_sync``, as multiserve did before its
  per-model dispatchers;
- ``raw_inline``: the same work in a bare ASGI callable in front of starlette (no Request, no
  middleware, no router);
- ``raw_executor``: the bare callable handing the work to the event loop's default executor,
  one thread hop per request;
- ``raw_drain``: the bare callable queueing the work for one worker thread that takes every
  job waiting at once and hands the answers back in one ``call_soon_threadsafe`` (what
  multiserve's dispatcher does with default settings);
- ``raw_batched``: the same, with the waiting jobs' inputs stacked into one ``session.run``
  (what multiserve's dispatcher does with ``max_batch_size`` > 1);
- ``multiserve``: ``POST /models/mlp/1/predict``, default settings;
- ``multiserve_batched``: the same with ``max_batch_size = 16`` in the model's config.toml.

Prints req/s and p99 per route (medians of the rounds) and writes
``benchmarks/results/dispatch_cost.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import models, wrk
from benchmarks.harness import (
    RESULTS_DIR,
    Deadline,
    display_path,
    free_port,
    median,
    only_running,
    result_header,
    start_server,
    write_json,
)
from benchmarks.suite import JSON_HEADERS, multiserve_argv, wait_until_ok

ROUTES = (
    "floor",
    "hop",
    "inline",
    "threaded",
    "raw_inline",
    "raw_executor",
    "raw_drain",
    "raw_batched",
)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def serve(port: int, model: str) -> None:
    """The minimal apps (run in a subprocess: ``dispatch_cost.py --serve PORT --model PATH``)."""
    import anyio.to_thread
    import numpy as np
    import onnxruntime as ort
    import orjson
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    answer = b"0" * 107

    def work(body: bytes) -> bytes:
        x = np.asarray(orjson.loads(body)["inputs"], dtype=np.float32)
        y = session.run(["probabilities"], {"x": x})[0]
        payload = {"model_name": "mlp", "model_version": "1", "outputs": {"probabilities": y}}
        return bytes(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY))

    def nothing() -> None:
        return None

    async def floor(request: Request) -> Response:
        await request.body()
        return Response(answer, media_type="application/json")

    async def hop(request: Request) -> Response:
        await request.body()
        await anyio.to_thread.run_sync(nothing)
        return Response(answer, media_type="application/json")

    async def inline(request: Request) -> Response:
        return Response(work(await request.body()), media_type="application/json")

    async def threaded(request: Request) -> Response:
        body = await request.body()
        content = await anyio.to_thread.run_sync(work, body)
        return Response(content, media_type="application/json")

    async def ready(request: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    app = Starlette(
        routes=[
            Route("/floor", floor, methods=["POST"]),
            Route("/hop", hop, methods=["POST"]),
            Route("/inline", inline, methods=["POST"]),
            Route("/threaded", threaded, methods=["POST"]),
            Route("/readyz", ready, methods=["GET"]),
        ]
    )

    import asyncio
    import queue
    import threading

    queues: dict[str, queue.SimpleQueue[Any]] = {}
    loop_box: list[asyncio.AbstractEventLoop] = []

    def complete(done: list[tuple[asyncio.Future[bytes], bytes]]) -> None:
        for future, content in done:
            future.set_result(content)

    def drain_worker(jobs: queue.SimpleQueue[Any], batched: bool) -> None:
        while True:
            batch = [jobs.get()]
            while len(batch) < 16:
                try:
                    batch.append(jobs.get_nowait())
                except queue.Empty:
                    break
            if batched:
                xs = [
                    np.asarray(orjson.loads(body)["inputs"], dtype=np.float32) for body, _ in batch
                ]
                ys = session.run(["probabilities"], {"x": np.concatenate(xs)})[0]
                done = []
                for i, (_, future) in enumerate(batch):
                    payload = {
                        "model_name": "mlp",
                        "model_version": "1",
                        "outputs": {"probabilities": ys[i : i + 1]},
                    }
                    done.append(
                        (future, bytes(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)))
                    )
            else:
                done = [(future, work(body)) for body, future in batch]
            loop_box[0].call_soon_threadsafe(complete, done)

    async def raw(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/raw_"):
            chunks = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            path = scope["path"]
            if path == "/raw_inline":
                content = work(body)
            elif path == "/raw_executor":
                content = await asyncio.get_running_loop().run_in_executor(None, work, body)
            else:
                if not loop_box:
                    loop_box.append(asyncio.get_running_loop())
                if path not in queues:
                    queues[path] = queue.SimpleQueue()
                    threading.Thread(
                        target=drain_worker,
                        args=(queues[path], path == "/raw_batched"),
                        daemon=True,
                    ).start()
                future: asyncio.Future[bytes] = loop_box[0].create_future()
                queues[path].put((body, future))
                content = await future
            headers = [(b"content-type", b"application/json")]
            headers.append((b"content-length", str(len(content)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": content})
            return
        await app(scope, receive, send)

    uvicorn.run(raw, host="127.0.0.1", port=port, log_config=None, log_level="warning")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "dispatch_cost.json")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.model)
        return 0

    deadline = Deadline(120 + args.rounds * (len(ROUTES) + 2) * (args.seconds + 2))
    with tempfile.TemporaryDirectory(prefix="multiserve-dispatch-") as workdir:
        root = Path(workdir) / "models"
        model = models.write_mlp(root / "mlp" / "1" / "model.onnx")
        (model.parent / "READY").touch()
        bodies = tuple(models.json_body(x) for x in models.inputs(models.MLP_FEATURES))
        apps_port = free_port()
        apps_argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(apps_port)]
        apps = start_server(
            "minimal-apps",
            [*apps_argv, "--model", str(model)],
            apps_port,
            Path(workdir),
            "/readyz",
            deadline,
        )
        batched_root = Path(workdir) / "models-batched"
        shutil.copytree(root, batched_root)
        (batched_root / "mlp" / "config.toml").write_text("max_batch_size = 16\n")
        servers = [apps]
        targets = [(name, apps, f"/{name}") for name in ROUTES]
        try:
            for name, repository in (("multiserve", root), ("multiserve_batched", batched_root)):
                port = free_port()
                argv = multiserve_argv(repository, port)
                server = start_server(name, argv, port, Path(workdir), "/readyz", deadline)
                servers.append(server)
                wait_until_ok(port, "/models/mlp/1/predict", bodies[0], JSON_HEADERS, 30, server)
                targets.append((name, server, "/models/mlp/1/predict"))
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
            for _ in range(args.rounds):
                for name, target, path in targets:
                    deadline.check("timing the dispatch steps")
                    with only_running(target, servers):
                        result = wrk.run(
                            target.port,
                            wrk.Load(path, bodies, JSON_HEADERS),
                            duration_s=args.seconds,
                            connections=16,
                            threads=2,
                        )
                    runs[name].append(result.summary())
        finally:
            for started in servers:
                started.stop()

    floor_rps = median([r["requests_per_s"] for r in runs["floor"]])
    figures = {
        name: {
            "requests_per_s": round(median([r["requests_per_s"] for r in results]), 1),
            "p99_ms": round(median([r["p99_ms"] for r in results]), 3),
            "over_floor": round(median([r["requests_per_s"] for r in results]) / floor_rps, 3),
            "runs": results,
        }
        for name, results in runs.items()
    }
    write_json(
        args.output,
        {
            **result_header("benchmarks/dispatch_cost.py"),
            "settings": {"rounds": args.rounds, "seconds": args.seconds, "wrk": "-t2 -c16"},
            "figures": figures,
        },
    )
    print(f"{'route':<20}{'req/s':>9}{'p99 ms':>9}{'x floor':>9}")
    for name, figure in figures.items():
        print(
            f"{name:<20}{figure['requests_per_s']:>9.0f}{figure['p99_ms']:>9.1f}"
            f"{figure['over_floor']:>9.2f}"
        )
    print(f"wrote {display_path(args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
