"""The ``python`` backend's contract without a server: loading predictor.py, what predict gets
and may return, batches, async predict, options, and the request type it reads."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from multiserve_python import PythonBackend

from multiserve.errors import MalformedRequest, ModelLoadFailed, PredictionFailed
from multiserve.types import (
    AsyncPayloadModel,
    BatchingPayloadModel,
    PayloadModel,
    PayloadRequest,
    Reply,
)


def predictor(tmp_path: Path, source: str, version: int = 1, **files: str) -> Path:
    version_dir = tmp_path / "model" / str(version)
    version_dir.mkdir(parents=True)
    for name, text in files.items():
        (version_dir / name).write_text(textwrap.dedent(text))
    (version_dir / "predictor.py").write_text(textwrap.dedent(source))
    return version_dir


def load(version_dir: Path, **options: Any) -> PayloadModel:
    return PythonBackend().load(version_dir, options)


def json_request(body: bytes) -> PayloadRequest:
    return PayloadRequest(body, "application/json")


def test_requests_decode_json_once_and_pass_other_bodies_as_bytes() -> None:
    assert json_request(b'{"a": [1, 2]}').payload == {"a": [1, 2]}
    assert PayloadRequest(b'{"a": 1}', "").payload == {"a": 1}  # no content type: JSON
    assert PayloadRequest(b'{"a": 1}', "application/vnd.api+json").payload == {"a": 1}
    assert PayloadRequest(b"\x89PNG", "image/png").payload == b"\x89PNG"
    with pytest.raises(MalformedRequest, match="not valid JSON"):
        _ = json_request(b"{oops").payload
    request = PayloadRequest(b"x", "text/csv", MappingProxyType({"q": "1"}))
    assert request.query_params["q"] == "1"
    assert dict(request.headers) == {}


def test_a_cortex_predictor_loads_as_it_is(tmp_path: Path) -> None:
    version_dir = predictor(
        tmp_path,
        """
        class PythonPredictor:
            def __init__(self, config):
                self.factor = config["factor"]

            def predict(self, payload, query_params, headers):
                return {"y": payload["x"] * self.factor, "q": query_params.get("q"),
                        "h": headers.get("x-h")}
        """,
    )
    model = load(version_dir, factor=3)
    request = PayloadRequest(
        b'{"x": 2}', "application/json", {"q": "yes"}, MappingProxyType({"x-h": "hi"})
    )
    assert model.answer(request) == Reply(b'{"y":6,"q":"yes","h":"hi"}')
    assert isinstance(model, PayloadModel)
    assert not isinstance(model, BatchingPayloadModel | AsyncPayloadModel)
    model.close()


def test_return_values_become_replies(tmp_path: Path) -> None:
    version_dir = predictor(
        tmp_path,
        """
        import numpy as np
        from multiserve_python import Response

        class Predictor:
            def predict(self, payload):
                return {
                    "array": lambda: np.arange(4).reshape(2, 2)[:, 0],  # a strided view
                    "text": lambda: Response("plain"),
                    "status": lambda: Response({"no": "rows"}, status=422),
                    "typed": lambda: Response(b"%PDF", headers={"Content-Type": "application/pdf"}),
                    "none": lambda: None,
                    "set": lambda: {1, 2},
                    "bad status": lambda: Response(status="200"),
                }[payload]()
        """,
    )
    model = load(version_dir)

    def answer(name: str) -> Reply:
        return model.answer(json_request(f'"{name}"'.encode()))

    assert answer("array") == Reply(b"[0,2]")
    assert answer("text") == Reply(b"plain", 200, "text/plain; charset=utf-8")
    assert answer("status") == Reply(b'{"no":"rows"}', 422)
    assert answer("typed") == Reply(b"%PDF", 200, "application/pdf")
    assert answer("none") == Reply(b"null")
    with pytest.raises(PredictionFailed, match="set, which is not JSON-serialisable"):
        answer("set")
    with pytest.raises(PredictionFailed, match="status must be an integer"):
        answer("bad status")
    with pytest.raises(PredictionFailed, match="predict raised KeyError: 'missing'"):
        answer("missing")
    assert answer("none") == Reply(b"null")  # and it keeps answering


def test_predict_batch_and_async_predict(tmp_path: Path) -> None:
    batching = load(
        predictor(
            tmp_path,
            """
            class Predictor:
                def predict(self, payload):
                    return [payload]

                def predict_batch(self, payloads, query_params):
                    return [[p, len(payloads), q.get("k")] for p, q in zip(payloads, query_params)]
            """,
        )
    )
    assert isinstance(batching, BatchingPayloadModel)
    requests = [PayloadRequest(str(i).encode(), "", {"k": str(i)}) for i in range(3)]
    assert [r.body for r in batching.answer_batch(requests)] == [
        b'[0,3,"0"]',
        b'[1,3,"1"]',
        b'[2,3,"2"]',
    ]
    assert batching.answer(requests[0]).body == b"[0]"

    awaiting = load(
        predictor(
            tmp_path,
            """
            import asyncio

            class Predictor:
                async def predict(self, payload):
                    await asyncio.sleep(0)
                    return {"awaited": payload}
            """,
            version=2,
        )
    )
    assert isinstance(awaiting, AsyncPayloadModel)
    reply = asyncio.run(awaiting.answer_async(json_request(b"1")))
    assert reply.body == b'{"awaited":1}'
    assert awaiting.answer(json_request(b"2")).body == b'{"awaited":2}'  # the warm-up's way


def test_modules_beside_predictor_py_are_each_versions_own(tmp_path: Path) -> None:
    source = """
        import helpers

        class Predictor:
            def predict(self, payload):
                return helpers.VERSION
    """
    one = load(predictor(tmp_path, source, 1, **{"helpers.py": "VERSION = 1\n"}))
    two = load(predictor(tmp_path, source, 2, **{"helpers.py": "VERSION = 2\n"}))
    assert one.answer(json_request(b"0")).body == b"1"
    assert two.answer(json_request(b"0")).body == b"2"


def test_memory_is_what_init_grew_the_process_by(tmp_path: Path) -> None:
    version_dir = predictor(
        tmp_path,
        """
        import numpy as np

        class Predictor:
            def __init__(self):
                self.table = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, written

            def predict(self, payload):
                return float(self.table[0])
        """,
    )
    model = load(version_dir)
    assert model.memory_bytes >= 60 * 1024 * 1024
    model.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"isolation": "threads"}, "isolation must be 'none' or 'process'"),
        ({"timeout_s": 5}, 'timeout_s applies to isolation = "process" only'),
        ({"predictor_class": "Missing"}, "defines no class 'Missing'"),
        ({"isolation": "process", "memory_limit": "lots"}, "memory_limit must be a size"),
        ({"isolation": "process", "timeout_s": 0}, "timeout_s must be a number of seconds > 0"),
    ],
)
def test_bad_options_are_load_errors(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    version_dir = predictor(
        tmp_path, "class Predictor:\n    def predict(self, p):\n        return p\n"
    )
    with pytest.raises((ValueError, ModelLoadFailed), match=message):
        load(version_dir, **options)


def test_predict_must_take_the_payload(tmp_path: Path) -> None:
    version_dir = predictor(
        tmp_path,
        """
        class Predictor:
            def predict(self, payload, model_name):
                return payload
        """,
    )
    with pytest.raises(ModelLoadFailed, match="predict takes 'model_name'"):
        load(version_dir)
