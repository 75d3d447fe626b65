"""The HTTP floor: multiserve's HTTP stack (uvicorn with the same defaults, so uvloop and
httptools; starlette routing on the same path pattern) reading the request body and answering
fixed bytes of the size multiserve answers, with its headers. No model, no codec: what HTTP alone
costs.

    python benchmarks/floor.py --port PORT --json-bytes N --npy-bytes M
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json-bytes", type=int, required=True)
    parser.add_argument("--npy-bytes", type=int, required=True)
    args = parser.parse_args(argv)

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    json_answer = b"0" * args.json_bytes
    npy_answer = b"0" * args.npy_bytes

    async def predict(request: Request) -> Response:
        await request.body()
        headers = {
            "X-Model-Name": request.path_params["name"],
            "X-Model-Version": request.path_params["version"],
        }
        if request.headers.get("content-type", "") == NPY_TYPE:
            return Response(npy_answer, media_type=NPY_TYPE, headers=headers)
        return Response(json_answer, media_type=JSON_TYPE, headers=headers)

    async def readyz(request: Request) -> Response:
        return Response(b'{"status":"ready"}', media_type=JSON_TYPE)

    app = Starlette(
        routes=[
            Route("/readyz", readyz, methods=["GET"]),
            Route("/models/{name}/{version}/predict", predict, methods=["POST"]),
        ]
    )
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
