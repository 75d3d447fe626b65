"""The gRPC floor: multiserve's gRPC stack (grpcio's asyncio server started in the lifespan of a
uvicorn app, on uvicorn's event loop, with the same options) answering ``ModelInfer`` with fixed
bytes of the size multiserve answers. No model, no protobuf parsing, no codec: what gRPC alone
costs in multiserve's process layout. ``GET /readyz`` on the HTTP port says it is up.

    python benchmarks/grpc_floor.py --port PORT --grpc-port GPORT --answer REQUEST:ANSWER ...

``--answer 57:31`` answers a 57-byte request with 31 bytes; a request of another size gets the
first answer's size.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--answer", action="append", required=True, metavar="REQUEST:ANSWER")
    args = parser.parse_args(argv)

    import grpc
    import uvicorn
    from grpc import aio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    answers = {}
    for pair in args.answer:
        request_bytes, answer_bytes = pair.split(":")
        answers[int(request_bytes)] = b"0" * int(answer_bytes)
    default = next(iter(answers.values()))

    async def model_infer(request: bytes, context: Any) -> bytes:
        return answers.get(len(request), default)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server = aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)},
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
        await server.start()
        try:
            yield
        finally:
            await server.stop(1)

    async def readyz(request: Request) -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")

    app = Starlette(routes=[Route("/readyz", readyz, methods=["GET"])], lifespan=lifespan)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
