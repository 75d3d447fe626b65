"""Ray Serve with model multiplexing over a directory of ONNX models: the peer that
``benchmarks/manymodels.py`` compares multiserve's cache with. Runs in Ray's own virtualenv.

    python ray_serve_onnx.py --models ROOT --port PORT --max-models 10 [--num-cpus 2]

Starts a local Ray (no dashboard, ``--num-cpus`` CPUs, its files under ``--temp-dir``), then one
replica of a deployment whose loader is ``@serve.multiplexed(max_num_models_per_replica=
--max-models)`` and creates the same onnxruntime session from ``ROOT/<name>/<version>/model.onnx``
as multiserve does. Routes, as multiserve's:

- ``POST /models/<name>/<version>/predict`` with ``{"inputs": [[...]]}`` answers
  ``{"outputs": {"<output name>": [[...]]}}``; the model id (``<name>/<version>``) comes from the
  path and is passed to the multiplexed loader (wrk walks paths, it sets no header);
- ``GET /readyz``: 200 once the replica answers;
- ``GET /admin/cache``: ``{"stats": {"hits", "misses", "loads"}}`` counted by the replica (a
  request is a hit when its model was loaded as it arrived, as multiserve counts).

Stops Ray (``serve.shutdown``, ``ray.shutdown``) on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import ray  # type: ignore[import-not-found, unused-ignore]
from ray import serve  # type: ignore[import-not-found, unused-ignore]
from starlette.requests import Request  # type: ignore[import-not-found, unused-ignore]
from starlette.responses import JSONResponse  # type: ignore[import-not-found, unused-ignore]


class Loaded:
    """One model's session. Ray calls ``__del__`` when it evicts the model."""

    def __init__(self, model_id: str, path: Path, registry: dict[str, Loaded]) -> None:
        self.model_id = model_id
        self.registry = registry
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __del__(self) -> None:
        # Ray calls this on eviction; Python may call it again at collection, after a reload.
        if self.registry.get(self.model_id) is self:
            del self.registry[self.model_id]


def build_app(root: str, max_models: int) -> Any:
    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1})  # type: ignore[misc, unused-ignore]
    class MultiplexedOnnx:
        def __init__(self, root: str) -> None:
            self.root = Path(root)
            self.loaded: dict[str, Loaded] = {}
            self.stats = {"hits": 0, "misses": 0, "loads": 0}

        @serve.multiplexed(max_num_models_per_replica=max_models)  # type: ignore[untyped-decorator, misc, unused-ignore]
        async def get_model(self, model_id: str) -> Loaded:
            name, version = model_id.split("/")
            path = self.root / name / version / "model.onnx"
            # Off the replica's event loop, as multiserve loads off its own.
            model = await asyncio.to_thread(Loaded, model_id, path, self.loaded)
            self.loaded[model_id] = model
            self.stats["loads"] += 1
            return model

        async def __call__(self, request: Request) -> Any:
            parts = request.url.path.strip("/").split("/")
            if request.method == "GET" and parts == ["readyz"]:
                return JSONResponse({"ready": True})
            if request.method == "GET" and parts == ["admin", "cache"]:
                return JSONResponse({"stats": dict(self.stats)})
            if request.method != "POST" or len(parts) != 4 or parts[0] != "models":
                return JSONResponse({"error": "not found"}, status_code=404)
            if parts[3] != "predict" or not (self.root / parts[1] / parts[2]).is_dir():
                return JSONResponse({"error": "no such model"}, status_code=404)
            model_id = f"{parts[1]}/{parts[2]}"
            try:
                x = np.asarray((await request.json())["inputs"], dtype=np.float32)
            except (ValueError, KeyError, TypeError) as exc:
                return JSONResponse({"error": f"bad body: {exc}"}, status_code=400)
            self.stats["hits" if model_id in self.loaded else "misses"] += 1
            model = await self.get_model(model_id)
            outputs = model.session.run(None, {model.input_name: x})
            return JSONResponse(
                {
                    "outputs": {
                        name: value.tolist()
                        for name, value in zip(model.output_names, outputs, strict=True)
                    }
                }
            )

    return MultiplexedOnnx.bind(root)  # type: ignore[attr-defined, unused-ignore]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-models", type=int, required=True)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args()
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _temp_dir=args.temp_dir,
        _node_ip_address="127.0.0.1",
        logging_level="warning",
        log_to_driver=False,
    )
    # After ray.init, which installs its own SIGTERM handler.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(args.models, args.max_models), route_prefix="/", blocking=False)
        print(json.dumps({"serving": args.port}), flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
