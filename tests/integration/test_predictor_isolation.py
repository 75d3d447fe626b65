"""Python predictors in a child process of their own (``isolation = "process"``): a crash, a
memory blow-up or a kill fails only that model's requests in flight, the server and its other
models go on, and eviction ends the process."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import httpx

from multiserve.memory import rss_bytes
from tests.conftest import StartServer
from tests.helpers import AUTH, error_of, wait_for
from tests.integration.test_predictors import write_predictor

CRASHER = """
import ctypes
import os
import threading
import time

import numpy as np

class Predictor:
    def __init__(self, config):
        self.started = threading.Event()

    def predict(self, payload):
        if payload == "exit":
            os._exit(3)
        if payload == "segfault":
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        if payload == "hang":
            time.sleep(60)
        if payload == "hog":
            hog = np.ones(1 << 27)  # 1 GiB of float64, more than its memory_limit
            return {"hogged": int(hog.size)}
        if payload == "slow crash":
            time.sleep(0.5)
            os._exit(4)
        return {"pid": os.getpid()}
"""


def process_of(client: httpx.Client, name: str) -> dict[str, Any]:
    version = client.get(f"/models/{name}").json()["versions"][0]
    process: dict[str, Any] = version["predictor"]["process"]
    return process


def pid_exists(pid: int) -> bool:
    # A reaped child leaves no /proc entry; a zombie would still have one.
    return Path(f"/proc/{pid}").exists()


def test_a_crashing_predictor_fails_only_its_requests_and_the_next_request_restarts_it(
    start_server: StartServer, model_repo: Path
) -> None:
    write_predictor(model_repo, "crasher", 1, CRASHER, 'isolation = "process"\n')
    server = start_server(model_repo, allow_python_predictors=True)
    with server.client() as client:
        first_pid = client.post("/models/crasher/predict", json={}).json()["pid"]
        assert first_pid != os.getpid()
        assert process_of(client, "crasher")["state"] == "running"

        # While a request is in flight in the child when it dies, mlp keeps answering.
        answers: list[httpx.Response] = []
        crashing = threading.Thread(
            target=lambda: answers.append(client.post("/models/crasher/predict", json="slow crash"))
        )
        crashing.start()
        while crashing.is_alive():
            mlp = client.post("/models/mlp/predict", json={"inputs": [[1, 2, 3, 4]]})
            assert mlp.status_code == 200
            crashing.join(timeout=0.05)
        error = error_of(answers[0], 503)
        assert error["code"] == "model_unavailable"
        assert "exited with status 4" in error["message"]
        assert not pid_exists(first_pid)

        # The next request starts a fresh process (the first crash restarts at once).
        second_pid = client.post("/models/crasher/predict", json={}).json()["pid"]
        assert second_pid != first_pid

        # os._exit and a segfault, each answered 503 with what happened.
        exited = error_of(client.post("/models/crasher/predict", json="exit"), 503)
        assert "exited with status 3" in exited["message"]
        assert client.post("/models/crasher/predict", json={}).status_code == 200
        segfault = error_of(client.post("/models/crasher/predict", json="segfault"), 503)
        assert "killed by SIGSEGV" in segfault["message"]
        described = process_of(client, "crasher")
        assert described["last_exit"] == "was killed by SIGSEGV"
        assert described["restarts"] == 2  # after the first two crashes; the third is not yet

        # A process killed from outside while idle (as the OOM killer would) is replaced on the
        # next request, which it serves.
        idle_pid = client.post("/models/crasher/predict", json={}).json()["pid"]
        os.kill(idle_pid, 9)
        wait_for(lambda: not pid_exists(idle_pid) or _zombie(idle_pid), 5, "the kill")
        # The server sees the death as an operator would (the process's state in /models).
        # Not only the zombie: here a killed child can show as a zombie a moment before its
        # end of the socket is released, and a request sent in that moment reaches the dying
        # process and is answered 503 "killed while answering", which is what it is.
        wait_for(lambda: process_of(client, "crasher")["state"] == "crashed", 5, "crashed")
        replaced = client.post("/models/crasher/predict", json={})
        assert replaced.status_code == 200, replaced.text
        assert replaced.json()["pid"] != idle_pid

        assert client.get("/healthz").status_code == 200
        mlp = client.post("/models/mlp/predict", json={"inputs": [[1, 2, 3, 4]]})
        assert mlp.status_code == 200


def test_repeated_crashes_back_off_and_the_state_shows_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_predictor(tmp_path, "crasher", 1, CRASHER, 'isolation = "process"\n')
    server = start_server(tmp_path, allow_python_predictors=True)
    with server.client() as client:
        assert client.post("/models/crasher/predict", json="exit").status_code == 503
        # The first crash restarts at once; this request crashes the new process too.
        assert client.post("/models/crasher/predict", json="exit").status_code == 503
        waiting = client.post("/models/crasher/predict", json={})
        error = error_of(waiting, 503)
        assert "crashed 2 times in a row" in error["message"]
        assert waiting.headers["retry-after"] == "1"
        described = process_of(client, "crasher")
        assert described["state"] == "backoff"
        assert described["crashes_in_a_row"] == 2
        assert 0 < described["restart_in_s"] <= 1
        wait_for(lambda: process_of(client, "crasher")["state"] == "crashed", 5, "the backoff")
        assert client.post("/models/crasher/predict", json={}).status_code == 200
        described = process_of(client, "crasher")
        assert described["state"] == "running"
        assert described["crashes_in_a_row"] == 0


def test_a_predictor_that_hangs_is_killed_after_its_timeout(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_predictor(tmp_path, "crasher", 1, CRASHER, 'isolation = "process"\ntimeout_s = 0.5\n')
    with start_server(tmp_path, allow_python_predictors=True).client() as client:
        pid = client.post("/models/crasher/predict", json={}).json()["pid"]
        error = error_of(client.post("/models/crasher/predict", json="hang"), 503)
        assert "did not answer within timeout_s = 0.5 s" in error["message"]
        assert not pid_exists(pid)
        assert client.post("/models/crasher/predict", json={}).status_code == 200


def test_a_memory_blow_up_stays_in_the_predictors_process(
    start_server: StartServer, tmp_path: Path
) -> None:
    config = 'isolation = "process"\nmemory_limit = "512MiB"\n'
    write_predictor(tmp_path, "crasher", 1, CRASHER, config)
    with start_server(tmp_path, allow_python_predictors=True).client() as client:
        pid = client.post("/models/crasher/predict", json={}).json()["pid"]
        # The kernel's OOM killer picks this process before the server.
        assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "1000"
        before = rss_bytes()
        error = error_of(client.post("/models/crasher/predict", json="hog"), 500)
        assert "MemoryError" in error["message"]
        after = rss_bytes()
        assert before is not None
        assert after is not None
        assert after - before < 256 * 1024**2  # the gigabyte was never the server's
        assert client.post("/models/crasher/predict", json={}).json()["pid"] == pid


def test_evicting_an_isolated_predictor_ends_its_process_and_returns_its_memory(
    start_server: StartServer, tmp_path: Path
) -> None:
    source = """
        import os
        import numpy as np

        class Predictor:
            def __init__(self):
                self.weights = np.ones(200 * 1024 * 1024 // 8)  # 200 MiB, written

            def predict(self, payload):
                return {"pid": os.getpid(), "sum": float(self.weights[:10].sum())}
    """
    write_predictor(tmp_path, "heavy", 1, source, 'isolation = "process"\n')
    with start_server(tmp_path, allow_python_predictors=True).client() as client:
        server_before = rss_bytes()
        answer = client.post("/models/heavy/predict", json={}).json()
        pid = answer["pid"]
        assert answer["sum"] == 10.0
        server_after = rss_bytes()
        assert server_before is not None
        assert server_after is not None
        assert server_after - server_before < 100 * 1024**2  # the weights live in the child

        described = client.get("/models/heavy/1").json()
        assert described["memory_bytes"] >= 200 * 1024**2  # charged the child's memory
        assert described["predictor"]["process"]["pid"] == pid
        assert described["predictor"]["process"]["rss_bytes"] >= 200 * 1024**2

        evicted = client.post("/admin/models/heavy/1/evict", headers=AUTH)
        assert evicted.status_code == 200
        # Ended and reaped: the kernel has its memory back.
        wait_for(lambda: not pid_exists(pid), 10, "the predictor's process to end")
        version = client.get("/models/heavy").json()["versions"][0]
        assert version["state"] == "available"
        # The next request loads it again, in a new process.
        assert client.post("/models/heavy/predict", json={}).json()["pid"] != pid


def test_the_server_wide_default_isolates_every_predictor(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_predictor(tmp_path, "crasher", 1, CRASHER)
    server = start_server(tmp_path, allow_python_predictors=True, predictor_isolation="process")
    with server.client() as client:
        assert client.post("/models/crasher/predict", json={}).json()["pid"] != os.getpid()
        assert client.post("/models/crasher/predict", json="exit").status_code == 503
        assert client.get("/healthz").status_code == 200


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return False


def test_isolated_predictors_batch_and_await_too(start_server: StartServer, tmp_path: Path) -> None:
    batching = """
        import os

        class Predictor:
            def predict(self, payload):
                return {"alone": payload}

            def predict_batch(self, payloads):
                return [{"echo": p, "pid": os.getpid()} for p in payloads]
    """
    awaiting = """
        import asyncio
        import os

        class Predictor:
            async def predict(self, payload, headers):
                await asyncio.sleep(0)
                return {"awaited": payload, "agent": headers.get("x-agent"), "pid": os.getpid()}
    """
    isolated = 'isolation = "process"\n'
    write_predictor(tmp_path, "batching", 1, batching, isolated + "max_batch_size = 4\n")
    write_predictor(tmp_path, "awaiting", 1, awaiting, isolated)
    with start_server(tmp_path, allow_python_predictors=True).client() as client:
        batched = client.post("/models/batching/predict", json=5).json()
        assert batched["echo"] == 5
        assert batched["pid"] != os.getpid()
        awaited = client.post("/models/awaiting/predict", json=7, headers={"X-Agent": "a"})
        assert awaited.json()["awaited"] == 7
        assert awaited.json()["agent"] == "a"
        assert awaited.json()["pid"] != os.getpid()
