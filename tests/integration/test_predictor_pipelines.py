"""Python predictors that call other models (pipelines), batch, run on the event loop, and
are hot-swapped under load."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from examples.make_models import IRIS_SCALING
from tests.conftest import StartServer
from tests.helpers import error_of, wait_for
from tests.integration.test_predictors import write_predictor

ROWS = [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3},
]
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def test_the_iris_example_scales_calls_mlp_through_the_lifecycle_and_labels(
    start_server: StartServer, model_repo: Path
) -> None:
    server = start_server(model_repo, allow_python_predictors=True)
    with server.client() as client:
        assert client.get("/models/mlp").json()["versions"][0]["state"] == "available"
        response = client.post("/models/iris/predict", json={"rows": ROWS})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]

        # What mlp (latest: version 2) says in-process for the same scaled rows.
        mean = np.array([IRIS_SCALING["mean"][f] for f in FEATURES], dtype=np.float32)
        std = np.array([IRIS_SCALING["std"][f] for f in FEATURES], dtype=np.float32)
        x = (np.array([[row[f] for f in FEATURES] for row in ROWS], np.float32) - mean) / std
        session = ort.InferenceSession(str(model_repo / "mlp/2/model.onnx"))
        expected = session.run(None, {"x": x})[0]
        classes = ("setosa", "versicolor", "virginica")
        for prediction, row in zip(predictions, expected, strict=True):
            assert prediction["label"] == classes[int(np.argmax(row))]
            got = [prediction["probabilities"][c] for c in classes]
            np.testing.assert_allclose(got, row, atol=1e-4)

        # mlp was loaded on demand (by iris's warm-up), and its inferences are counted.
        assert client.get("/models/mlp/2").json()["state"] == "ready"
        metrics = client.get("/metrics").text
        assert 'multiserve_inference_duration_seconds_count{model="mlp",version="2"}' in metrics
        assert 'multiserve_inference_duration_seconds_count{model="iris",version="1"}' in metrics

        refused = client.post("/models/iris/predict", json={"rows": [{"sepal_length": 1}]})
        assert refused.status_code == 400
        assert "each row needs" in refused.json()["error"]


ROUTER = """
from multiserve.errors import MultiserveError
from multiserve_python import Response

class Predictor:
    def __init__(self, models):
        self.models = models

    def predict(self, payload):
        try:
            outputs = self.models.predict(payload["model"], payload.get("version", "latest"),
                                          payload["inputs"])
        except MultiserveError as exc:
            return Response({"caught": exc.code, "message": exc.message}, status=422)
        return {name: value for name, value in outputs.items()}
"""

ASYNC_ROUTER = """
import threading

class Predictor:
    def __init__(self, models):
        self.models = models

    async def predict(self, payload):
        outputs = await self.models.predict_async("adder", 1, {"a": [[1, 2, 3]], "b": [[1, 1, 1]]})
        return {"sum": outputs["sum"], "thread": threading.current_thread().name}
"""


def test_a_pipeline_gets_other_models_by_name_version_or_label_and_catches_errors(
    start_server: StartServer, model_repo: Path
) -> None:
    write_predictor(model_repo, "router", 1, ROUTER)
    write_predictor(model_repo, "async-router", 1, ASYNC_ROUTER)
    server = start_server(model_repo, allow_python_predictors=True)
    with server.client() as client:
        one_input = client.post(
            "/models/router/predict",
            json={"model": "mlp", "version": 1, "inputs": [[1, 2, 3, 4]]},
        )
        assert one_input.status_code == 200, one_input.text
        assert len(one_input.json()["probabilities"][0]) == 3
        named = client.post(
            "/models/router/predict",
            json={"model": "adder", "inputs": {"a": [[1, 2, 3]], "b": [[10, 20, 30]]}},
        )
        assert named.json() == {"sum": [[11.0, 22.0, 33.0]], "product": [[10.0, 40.0, 90.0]]}
        label = client.put(
            "/admin/models/mlp/labels/stable",
            json={"version": "1"},
            headers={"Authorization": "Bearer test-admin-token"},
        )
        assert label.status_code == 200
        labelled = client.post(
            "/models/router/predict",
            json={"model": "mlp", "version": "stable", "inputs": [[1, 2, 3, 4]]},
        )
        assert labelled.json() == one_input.json()

        # Errors are the server's own, and the predictor can catch them.
        for payload, code in [
            ({"model": "nope", "inputs": [1]}, "model_not_found"),
            ({"model": "mlp", "version": 9, "inputs": [[1, 2, 3, 4]]}, "version_not_found"),
            ({"model": "mlp", "inputs": [[1, 2]]}, "invalid_input"),
            ({"model": "router", "inputs": [1]}, "payload_model"),
        ]:
            caught = client.post("/models/router/predict", json=payload)
            assert caught.status_code == 422, caught.text
            assert caught.json()["caught"] == code

        # An async predictor awaits the call, on the event loop, not in a worker thread.
        awaited = client.post("/models/async-router/predict", json={})
        assert awaited.status_code == 200, awaited.text
        assert awaited.json()["sum"] == [[2.0, 3.0, 4.0]]
        assert not awaited.json()["thread"].startswith("multiserve-")


def test_models_cannot_be_called_from_init(start_server: StartServer, model_repo: Path) -> None:
    source = """
        class Predictor:
            def __init__(self, models):
                models.predict("mlp", "latest", [[1, 2, 3, 4]])

            def predict(self, payload):
                return payload
    """
    write_predictor(model_repo, "eager", 1, source)
    with start_server(model_repo, allow_python_predictors=True).client() as client:
        error = error_of(client.post("/models/eager/predict", json={}), 503)
        assert "cannot be called from __init__" in error["message"]


BATCHER = """
import threading
import time

class Predictor:
    def predict(self, payload):
        return {"echo": payload, "batch": 0}

    def predict_batch(self, payloads):
        time.sleep(0.02)  # so that requests queue up behind a call
        if any(p == "poison" for p in payloads):
            raise ValueError("poison")
        return [{"echo": p, "batch": len(payloads)} for p in payloads]
"""


def test_predict_batch_takes_waiting_requests_together_when_max_batch_size_allows(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_predictor(tmp_path, "batcher", 1, BATCHER, "max_batch_size = 8\n")
    write_predictor(tmp_path, "single", 1, BATCHER)  # max_batch_size 1: predict only
    with start_server(tmp_path, allow_python_predictors=True).client() as client:
        assert client.post("/models/single/predict", json=1).json() == {"echo": 1, "batch": 0}

        def call(i: int) -> httpx.Response:
            return client.post("/models/batcher/predict", json="poison" if i == 7 else i)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, range(64)))
        sizes = []
        for i, answer in enumerate(answers):
            if i == 7:  # fails alone: its batch is retried one request at a time
                assert "ValueError: poison" in error_of(answer, 500)["message"]
                continue
            assert answer.status_code == 200, answer.text
            assert answer.json()["echo"] == i
            sizes.append(answer.json()["batch"])
        assert max(sizes) > 1
        assert max(sizes) <= 8


def test_a_predictor_is_hot_swapped_under_load_without_a_failed_request(
    start_server: StartServer, tmp_path: Path
) -> None:
    source = """
        import time

        class Predictor:
            def __init__(self, model_dir):
                time.sleep(0.3)  # a load that takes a while: requests keep coming meanwhile
                self.version = int(model_dir.name)

            def predict(self, payload):
                return {"version": self.version, "echo": payload}
    """
    write_predictor(tmp_path, "swapped", 1, source)
    server = start_server(tmp_path, allow_python_predictors=True)
    failures: list[str] = []
    versions: set[int] = set()
    answers: list[int] = []  # one per good answer
    stop = threading.Event()

    def hammer() -> None:
        with server.client() as client:
            n = 0
            while not stop.is_set():
                n += 1
                answer = client.post("/models/swapped/predict", json=n)
                if answer.status_code != 200 or answer.json()["echo"] != n:
                    failures.append(f"{answer.status_code} {answer.text}")
                else:
                    versions.add(answer.json()["version"])
                    answers.append(n)

    with server.client() as client:
        assert client.post("/models/swapped/predict", json=0).status_code == 200
        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: 1 in versions, 10, "requests on version 1")
            write_predictor(tmp_path, "swapped", 2, source)
            wait_for(lambda: 2 in versions, 20, "requests on version 2")
            # A little load after the swap too: 50 more answers, however long they take.
            answered = len(answers)
            wait_for(lambda: len(answers) >= answered + 50, 20, "answers after the swap")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        assert failures == []
        described = {
            v["version"]: v["state"] for v in client.get("/models/swapped").json()["versions"]
        }
        assert described == {"2": "ready", "1": "available"}  # version 1 unloaded after the swap
