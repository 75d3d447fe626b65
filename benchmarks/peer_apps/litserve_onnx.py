"""A minimal LitServe server for one ONNX model with onnxruntime: the peer that
``benchmarks/run.py`` compares multiserve with. Runs in LitServe's own virtualenv.

    python litserve_onnx.py --model model.onnx --port PORT [--fast-queue]

Takes the same JSON body as multiserve's native route, ``{"inputs": [[...]]}``, and answers
``{"outputs": {"<output name>": [[...]]}}``.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run
# time, and only a real `Request` makes it hand over the parsed JSON body.
import argparse
from typing import Any

import litserve as ls  # type: ignore[import-not-found, unused-ignore]
import numpy as np
import onnxruntime as ort
from starlette.requests import Request


class OnnxAPI(ls.LitAPI):  # type: ignore[misc, unused-ignore]
    def __init__(self, model_path: str) -> None:
        super().__init__()
        self.model_path = model_path

    def setup(self, device: str) -> None:
        self.session = ort.InferenceSession(self.model_path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def decode_request(self, request: Request) -> Any:
        # Annotated `Request` so that LitServe parses the body as JSON; what arrives is that JSON.
        payload: Any = request
        return np.asarray(payload["inputs"], dtype=np.float32)

    def predict(self, x: Any) -> Any:
        return self.session.run(None, {self.input_name: x})

    def encode_response(self, output: Any) -> Any:
        return {
            "outputs": {
                name: value.tolist() for name, value in zip(self.output_names, output, strict=True)
            }
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers-per-device", type=int, default=1)
    parser.add_argument("--fast-queue", action="store_true")
    args = parser.parse_args()
    server = ls.LitServer(
        OnnxAPI(args.model),
        accelerator="cpu",
        devices=1,
        workers_per_device=args.workers_per_device,
        fast_queue=args.fast_queue,
    )
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
