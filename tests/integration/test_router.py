"""Replicas behind the real router (HAProxy with deploy/router/haproxy.cfg): each model's
traffic, native or V2, goes to one replica, so each model loads once; a replica stopped under
load costs no request, and its models come back to it when it returns."""

from __future__ import annotations

import signal
import sys
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.harness import Deadline, ServerProcess, free_port, start_server
from benchmarks.router import Router
from examples.make_models import write_mlp_onnx
from tests.conftest import ADMIN_TOKEN
from tests.helpers import AUTH, require_tool, wait_for

MODELS = [f"m{i}" for i in range(6)]
X = [[1.0, 2.0, 3.0, 4.0]]
V2_BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X[0]}]}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("router-models")
    for seed, name in enumerate(MODELS):
        write_mlp_onnx(root / name / "1" / "model.onnx", seed=seed)
    return root


class Replicas:
    def __init__(self, repository: Path, workdir: Path) -> None:
        self.repository = repository
        self.workdir = workdir
        self.processes: dict[str, ServerProcess] = {}
        self.ports: dict[str, int] = {}

    def start(self, name: str, port: int | None = None) -> None:
        port = port or free_port()
        argv = [sys.executable, "-m", "multiserve", "serve", "--models", str(self.repository)]
        argv += ["--port", str(port), "--admin-token", ADMIN_TOKEN, "--log-level", "warning"]
        argv += ["--grpc-port", "0"]  # replicas side by side: HTTP only
        # Room for every model: round robin then loads each on every replica.
        argv += ["--max-models", str(len(MODELS)), "--settle-window-s", "0"]
        self.processes[name] = start_server(
            name, argv, port, self.workdir, "/readyz", Deadline(60), ready_timeout_s=60
        )
        self.ports[name] = port

    def stats(self, name: str) -> dict[str, int]:
        answer = httpx.get(f"http://127.0.0.1:{self.ports[name]}/admin/cache", headers=AUTH)
        stats: dict[str, int] = answer.json()["stats"]
        return stats

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.stop()


@pytest.fixture
def replicas(repository: Path, tmp_path: Path) -> Iterator[Replicas]:
    started = Replicas(repository, tmp_path)
    yield started
    started.stop_all()


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    haproxy = require_tool("haproxy")
    routers: list[Router] = []

    def start(replicas: Replicas, **options: object) -> Router:
        servers = sorted(replicas.ports.items())
        balance = str(options.get("balance", "hash"))
        router = Router(haproxy, servers, tmp_path, balance=balance)
        routers.append(router)
        return router.start(expect_up=len(servers))

    yield start
    for router in routers:
        router.stop()


def predict(client: httpx.Client, model: str, v2: bool) -> httpx.Response:
    if v2:
        return client.post(f"/v2/models/{model}/infer", json=V2_BODY)
    return client.post(f"/models/{model}/predict", json={"inputs": X})


def served_by(client: httpx.Client, rounds: int = 3) -> dict[str, set[str]]:
    """Which replicas answered each model, over native and V2 requests."""
    seen: dict[str, set[str]] = defaultdict(set)
    for _ in range(rounds):
        for model in MODELS:
            for v2 in (False, True):
                answer = predict(client, model, v2)
                assert answer.status_code == 200, answer.text
                seen[model].add(answer.headers["X-Multiserve-Replica"])
    return seen


def test_consistent_hashing_sends_each_model_to_one_replica_which_loads_it_once(
    replicas: Replicas, router: Callable[..., Router]
) -> None:
    for name in ("replica1", "replica2", "replica3"):
        replicas.start(name)
    front = router(replicas)
    with httpx.Client(base_url=f"http://127.0.0.1:{front.port}", timeout=30) as client:
        seen = served_by(client)
        # The native and the V2 path of a model go to the same replica, every time.
        assert all(len(names) == 1 for names in seen.values()), seen
        owner = {model: next(iter(names)) for model, names in seen.items()}
        assert len(set(owner.values())) > 1, f"every model on one replica: {owner}"
        loads = {name: replicas.stats(name)["loads"] for name in replicas.ports}
        assert sum(loads.values()) == len(MODELS), loads  # each model loaded once, in all
        for name in replicas.ports:
            assert loads[name] == Counter(owner.values())[name]
        # An admin action on a model goes to the replica that serves it.
        admin = client.post("/admin/models/m0/1/load", headers=AUTH)
        assert admin.status_code == 200, admin.text
        assert admin.headers["X-Multiserve-Replica"] == owner["m0"]
        # A route that names no model is served all the same (round robin).
        assert client.get("/models").status_code == 200


def test_round_robin_loads_each_model_on_several_replicas(
    replicas: Replicas, router: Callable[..., Router]
) -> None:
    for name in ("replica1", "replica2", "replica3"):
        replicas.start(name)
    front = router(replicas, balance="roundrobin")
    with httpx.Client(base_url=f"http://127.0.0.1:{front.port}", timeout=30) as client:
        seen = served_by(client)
    # Round robin ignores the model: each lands on several replicas, and loads on each.
    assert all(len(names) >= 2 for names in seen.values()), seen
    loads = sum(replicas.stats(name)["loads"] for name in replicas.ports)
    assert loads == sum(len(names) for names in seen.values()) >= 2 * len(MODELS)


def test_a_replica_stopped_under_load_costs_no_request_and_gets_its_models_back(
    replicas: Replicas, router: Callable[..., Router]
) -> None:
    for name in ("replica1", "replica2", "replica3"):
        replicas.start(name)
    front = router(replicas)
    url = f"http://127.0.0.1:{front.port}"
    with httpx.Client(base_url=url, timeout=30) as client:
        owner = {model: next(iter(names)) for model, names in served_by(client, 1).items()}
    victim = Counter(owner.values()).most_common(1)[0][0]
    moved = sorted(model for model, name in owner.items() if name == victim)

    failures: list[str] = []
    answers: Counter[str] = Counter()
    served_during: dict[str, set[str]] = defaultdict(set)
    stop = threading.Event()
    lock = threading.Lock()

    def load(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            i = offset
            while not stop.is_set():
                model = MODELS[i % len(MODELS)]
                try:
                    answer = predict(client, model, v2=bool(i % 2))
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(f"{model}: {type(exc).__name__}: {exc}")
                    continue
                finally:
                    i += 1
                with lock:
                    answers[str(answer.status_code)] += 1
                    if answer.status_code != 200:
                        failures.append(f"{model}: {answer.status_code} {answer.text}")
                    else:
                        served_during[model].add(answer.headers["X-Multiserve-Replica"])

    threads = [threading.Thread(target=load, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: answers["200"] >= 30, 30, "requests to flow")
        port = replicas.ports[victim]
        process = replicas.processes[victim]
        process.process.send_signal(signal.SIGTERM)  # as Kubernetes stops a pod
        assert process.process.wait(timeout=30) in (0, -signal.SIGTERM)
        wait_for(lambda: front.servers()[victim].startswith("DOWN"), 30, f"{victim} down")
        before = answers["200"]
        wait_for(lambda: answers["200"] >= before + 60, 60, "requests with a replica down")
        with lock:
            for model in moved:
                served_during[model].clear()
        before = answers["200"]
        wait_for(lambda: answers["200"] >= before + 30, 60, "more requests with it down")
        with lock:
            elsewhere = {model: set(served_during[model]) for model in moved}
        assert all(names and victim not in names for names in elsewhere.values()), elsewhere
        replicas.start(victim, port)  # the same address, so the same place on the ring
        wait_for(lambda: front.servers()[victim].startswith("UP"), 30, f"{victim} up again")
        before = answers["200"]
        wait_for(lambda: answers["200"] >= before + 30, 60, "requests after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert failures == [], failures[:5]
    with httpx.Client(base_url=url, timeout=30) as client:
        back = {model: next(iter(names)) for model, names in served_by(client, 1).items()}
    assert back == owner
