"""HAProxy in front of multiserve replicas on loopback, configured by the file users deploy
(``deploy/router/haproxy.cfg``) with only the addresses changed: the replicas' ports for its
``server`` lines and free ports for its two listeners. The scale-out benchmark and the router's
integration test both drive it."""

from __future__ import annotations

import contextlib
import csv
import io
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import HOST, REPO_ROOT, BenchmarkError, call, free_port

CONFIG = REPO_ROOT / "deploy" / "router" / "haproxy.cfg"
_SERVER_LINE = re.compile(r"^\s+server\s+\S+\s+\S+.*$\n?", re.MULTILINE)


def render(
    servers: Sequence[tuple[str, int]],
    port: int,
    stats_port: int,
    *,
    balance: str = "hash",
    hash_balance_factor: int | None = None,
    template: str | None = None,
) -> str:
    """The shipped config with ``servers`` (name, port on 127.0.0.1) as its replicas.

    ``balance="roundrobin"`` swaps consistent hashing for round robin (the baseline the
    benchmark compares with); ``hash_balance_factor`` overrides the bounded-load factor
    (0 turns the bound off).
    """
    text = template if template is not None else CONFIG.read_text()
    for listener, new in ((":8080", port), (":8404", stats_port)):
        if f"bind {listener}\n" not in text:
            raise BenchmarkError(f"{CONFIG}: no 'bind {listener}' line to point at port {new}")
        text = text.replace(f"bind {listener}\n", f"bind {HOST}:{new}\n")
    lines = [f"    server {name} {HOST}:{server_port}\n" for name, server_port in servers]
    first = _SERVER_LINE.search(text)
    if first is None:
        raise BenchmarkError(f"{CONFIG}: no server lines to replace")
    text = text[: first.start()] + "".join(lines) + _SERVER_LINE.sub("", text[first.start() :])
    if balance == "roundrobin":
        kept = [line for line in text.splitlines() if line.strip().split(" ")[0] != "hash-type"]
        text = "\n".join(
            line for line in kept if not line.strip().startswith("hash-balance-factor")
        )
        text = text.replace("balance hash var(txn.model)", "balance roundrobin") + "\n"
    elif hash_balance_factor is not None:
        text = re.sub(
            r"hash-balance-factor \d+", f"hash-balance-factor {hash_balance_factor}", text
        )
    return text


class Router:
    """An HAProxy process (``haproxy -db``, in the foreground) with a rendered config."""

    def __init__(
        self,
        haproxy: str,
        servers: Sequence[tuple[str, int]],
        workdir: Path,
        *,
        balance: str = "hash",
        hash_balance_factor: int | None = None,
    ) -> None:
        self.haproxy = haproxy
        self.port = free_port()
        self.stats_port = free_port()
        self.config_path = workdir / f"haproxy-{self.port}.cfg"
        self.log_path = workdir / f"haproxy-{self.port}.log"
        config = render(
            servers,
            self.port,
            self.stats_port,
            balance=balance,
            hash_balance_factor=hash_balance_factor,
        )
        self.config_path.write_text(config)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, expect_up: int, timeout_s: float = 30.0) -> Router:
        check = subprocess.run(
            [self.haproxy, "-c", "-q", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check.returncode != 0:
            raise BenchmarkError(f"haproxy -c {self.config_path}:\n{check.stdout}{check.stderr}")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [self.haproxy, "-db", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_up(expect_up, timeout_s)
        return self

    def servers(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it (UP, DOWN, ...), from its stats CSV."""
        answer = call(self.stats_port, "GET", "/stats;csv", timeout_s=5)
        rows = csv.DictReader(io.StringIO(answer.body.decode().lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_up(self, count: int, timeout_s: float = 30.0) -> None:
        """Until ``count`` replicas pass their health check."""
        give_up = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise BenchmarkError(f"haproxy exited:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if sum(state.startswith("UP") for state in self.servers().values()) >= count:
                    return
            if time.monotonic() > give_up:
                raise BenchmarkError(f"fewer than {count} replicas up after {timeout_s:g} s")
            time.sleep(0.05)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
