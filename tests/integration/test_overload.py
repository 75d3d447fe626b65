"""Admission control (multiserve.admission) on a real server: a bounded wait per model version
(503 with Retry-After at once), deadlines (queued requests dropped unrun, 504), clients that
went away are not run, and a hot model's overload does not reach a quiet one."""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from multiserve.backends import BackendRegistry
from tests.conftest import RunningServer, StartServer
from tests.helpers import AUTH, wait_for
from tests.npz_backend import write_npz_model

BODY = {"inputs": [[1.0, 2.0]]}


PREDICTOR = """
import time


class Predictor:
    def __init__(self, model_dir, config):
        self.delay = float(config["predict_delay_s"])

    def predict(self, payload):
        time.sleep(self.delay)
        return {"y": payload["inputs"]}
"""


def slow_repo(root: Path, delay: float, name: str = "slow", kind: str = "npz") -> Path:
    """A model that takes ``delay`` per request: tensors (npz) or payloads (a predictor)."""
    if kind == "npz":
        write_npz_model(root / name / "1", np.eye(2, dtype=np.float32))
    else:
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "predictor.py").write_text(PREDICTOR)
    (root / name / "config.toml").write_text(f"predict_delay_s = {delay}\nwarmup = false\n")
    return root


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """One series' value from /metrics (0 when absent)."""
    text = httpx.get(server.url + "/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def runs(server: RunningServer, model: str = "slow") -> float:
    """Times the model's predict ran."""
    return metric(server, "multiserve_inference_duration_seconds_count", model=model, version="1")


def post(server: RunningServer, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        server.url + "/models/slow/1/predict", json=BODY, headers=headers or {}, timeout=30
    )


def loaded(server: RunningServer) -> RunningServer:
    assert post(server).status_code == 200  # loaded, and its first run counted
    return server


def test_past_max_queue_requests_get_503_with_retry_after_at_once(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    server = loaded(start_server(slow_repo(tmp_path, 1.0), npz_registry, max_queue=2, grpc_port=0))

    def timed() -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        response = post(server)
        return response, time.perf_counter() - started

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: timed(), range(8)))
    shed = [(r, s) for r, s in answers if r.status_code == 503]
    served = [r for r, _ in answers if r.status_code == 200]
    # One running and two waiting at most: the rest are refused at once.
    assert len(served) + len(shed) == 8
    assert 3 <= len(served) <= 4, [r.status_code for r, _ in answers]
    for response, _ in shed:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "overloaded"
    # At once, not after waiting for the model (1 s a request); the median, as one answer
    # may be late on a busy machine.
    assert sorted(seconds for _, seconds in shed)[len(shed) // 2] < 0.5
    counted = metric(server, "multiserve_requests_shed_total", model="slow", reason="queue_full")
    assert counted == len(shed)


@pytest.mark.parametrize("where", ["header", "setting"])
def test_a_request_past_its_deadline_is_504_and_queued_ones_never_run(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry, where: str
) -> None:
    settings: dict[str, object] = {"grpc_port": 0}
    headers = {}
    if where == "header":
        headers = {"x-request-timeout": "0.3"}
        settings["request_timeout_s"] = 30  # the header asks for less
    else:
        settings["request_timeout_s"] = 0.3
    server = start_server(slow_repo(tmp_path, 0.8), npz_registry, **settings)
    with httpx.Client(timeout=30) as client:  # loaded, not through the deadline
        assert client.post(server.url + "/admin/models/slow/1/load", headers=AUTH).is_success
    before = runs(server)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(server, headers), range(4)))
    assert [r.status_code for r in answers] == [504] * 4
    assert all(r.json()["error"]["code"] == "deadline_exceeded" for r in answers)
    time.sleep(1.0)  # the one that started has finished by now; the others were skipped
    assert runs(server) - before == 1
    assert metric(server, "multiserve_requests_shed_total", model="slow", reason="deadline") == 4


@pytest.mark.parametrize("kind", ["npz", "predictor"])
def test_clients_that_went_away_while_waiting_are_not_run(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry, kind: str
) -> None:
    server = loaded(
        start_server(
            slow_repo(tmp_path, 1.5, kind=kind),
            npz_registry,
            grpc_port=0,
            allow_python_predictors=True,
        )
    )
    before = runs(server)
    host, port = server.url.removeprefix("http://").split(":")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, server)  # runs for 1.5 s
        time.sleep(0.1)
        body = b'{"inputs": [[1.0, 2.0]]}'
        request = (
            b"POST /models/slow/1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
            + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        waiting = [socket.create_connection((host, int(port))) for _ in range(3)]
        for sock in waiting:
            sock.sendall(request)
        # Queued behind the first (4 in flight), then their clients give up.
        entry = server.model_server.lifecycle.cache.peek(("slow", 1))
        assert entry is not None
        wait_for(lambda: entry.in_flight == 4, 5, "three requests queued behind the first")
        for sock in waiting:
            sock.close()
        assert first.result().status_code == 200
    wait_for(
        lambda: (
            metric(server, "multiserve_requests_shed_total", model="slow", reason="disconnected")
            == 3
        ),
        5,
        "three disconnections counted",
    )
    time.sleep(0.5)
    assert runs(server) - before == 1  # only the first ran
    assert post(server).status_code == 200  # and nothing waits: a fresh request runs at once


def test_a_quiet_model_is_served_while_a_hot_one_sheds(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    """The bound is each version's own: the hot model's overflow is refused while every
    request of the quiet one is served, promptly."""
    slow_repo(tmp_path, 0.5, "hot")
    slow_repo(tmp_path, 0.0, "quiet")
    server = start_server(tmp_path, npz_registry, max_queue=2, grpc_port=0)
    stop = threading.Event()
    hot: list[int] = []

    def hammer() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                hot.append(client.post(server.url + "/models/hot/1/predict", json=BODY).status_code)

    with httpx.Client(timeout=30) as client:
        assert client.post(server.url + "/models/quiet/1/predict", json=BODY).status_code == 200
        threads = [threading.Thread(target=hammer) for _ in range(12)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: 503 in hot, 10, "the hot model to shed")
            quiet = []
            for _ in range(20):
                started = time.perf_counter()
                response = client.post(server.url + "/models/quiet/1/predict", json=BODY)
                quiet.append((response.status_code, time.perf_counter() - started))
                time.sleep(0.02)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert [status for status, _ in quiet] == [200] * 20
    assert sorted(seconds for _, seconds in quiet)[len(quiet) // 2] < 0.4  # not the hot one's 0.5 s
    assert hot.count(503) > 0
    assert set(hot) <= {200, 503}


def test_grpc_calls_past_their_deadline_are_not_run(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    """A gRPC client's deadline (grpc-timeout) bounds the call's wait in the model's queue:
    the queued calls are never run."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    server = loaded(start_server(slow_repo(tmp_path, 0.8), npz_registry))
    before = runs(server)
    request = pb.ModelInferRequest(model_name="slow", model_version="1")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.ones((1, 2), np.float32).tobytes())

    def call(_: int) -> grpc.StatusCode:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                stub.ModelInfer(request, timeout=0.3)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(call, range(4)))
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4
    time.sleep(1.2)
    assert runs(server) - before == 1
