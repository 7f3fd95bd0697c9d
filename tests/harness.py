"""Starting real wsgate processes for tests: nats-server and the roles, on 127.0.0.1 with
ports chosen by the kernel, each waited for by its readiness signal, each stopped by PID.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar, overload

from wsgate.config import StateConfig
from wsgate.procs import Child, python_role_argv, spawn, start_nats_server

T = TypeVar("T")


@dataclass
class Stack:
    """A running set of processes and where their logs go."""

    log_dir: Path
    nats: Child | None = None
    state: Child | None = None
    #: State replicas over PostgreSQL (start_replica), beside or instead of ``state``.
    replicas: list[Child] = field(default_factory=list)
    workers: list[Child] = field(default_factory=list)
    gateways: list[Child] = field(default_factory=list)
    _logs: list[IO[Any]] = field(default_factory=list)

    @property
    def nats_url(self) -> str:
        assert self.nats is not None
        return str(self.nats.info["url"])

    @property
    def url(self) -> str:
        """The first gateway's base URL."""
        return str(self.gateways[0].info["url"])

    def ws_url(self, path: str, gateway: int = 0) -> str:
        return str(self.gateways[gateway].info["url"]).replace("http://", "ws://", 1) + path

    def gateway_port(self, gateway: int = 0) -> int:
        return int(self.gateways[gateway].info["port"])

    def worker_metrics_url(self, worker: int = 0) -> str:
        return f"http://127.0.0.1:{self.workers[worker].info['probe_port']}/metrics"

    def log_file(self, name: str) -> IO[Any]:
        handle = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(handle)
        return handle

    def start_nats(self) -> Child:
        log = self.log_file("nats")
        self.nats = start_nats_server(self.log_dir / "nats", stdout=log, stderr=log)
        return self.nats

    def state_child(self) -> Child:
        """The running state service."""
        assert self.state is not None, "no state service running"
        return self.state

    def state_info(self, key: str) -> Any:
        """What the state service reported when ready (``address``, ``pid``)."""
        return self.state_child().info[key]

    def restart_state(self, address: str) -> Child:
        """Start the state service again on ``address``'s port and the same file, as a
        supervisor restarts it (workers keep their address)."""
        port = address.rsplit(":", 1)[1]
        return self.start_state(self.log_dir / "state.sqlite3", "--port", port)

    def start_state(self, db_path: Path | None = None, *extra: str) -> Child:
        db = db_path or self.log_dir / "state.sqlite3"
        log = self.log_file("state")
        argv = python_role_argv(
            "state",
            "--nats-url",
            self.nats_url,
            "--port",
            "0",
            "--probe-port",
            "0",
            "--db-path",
            str(db),
            *extra,
        )
        self.state = spawn("state", argv, stdout=log, stderr=log, env=_env())
        return self.state

    def start_replica(self, dsn: str, *extra: str, replica_id: str = "") -> Child:
        """Start one state replica over the PostgreSQL at ``dsn`` (schema migrated at
        start); ``replica_id`` defaults to ``replica<n>``."""
        replica_id = replica_id or f"replica{len(self.replicas)}"
        log = self.log_file(replica_id)
        argv = python_role_argv(
            "state",
            "--nats-url",
            self.nats_url,
            "--port",
            "0",
            "--probe-port",
            "0",
            "--dsn",
            dsn,
            "--migrate",
            "yes",
            "--replica-id",
            replica_id,
            *extra,
        )
        child = spawn(replica_id, argv, stdout=log, stderr=log, env=_env())
        self.replicas.append(child)
        return child

    def start_worker(
        self,
        app: str = "wsgate.examples.app:app",
        *extra: str,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """A worker serving ``app``; ``env`` adds to its environment (the app's own
        settings, such as ``WSGATE_JWT_*``)."""
        log = self.log_file(f"worker{len(self.workers)}")
        argv = python_role_argv(
            "worker", "--nats-url", self.nats_url, "--app", app, "--port", "0", *extra
        )
        if self.state is not None:
            argv += ["--state-address", str(self.state.info["address"])]
        elif self.replicas:
            # Only until the worker hears the replicas on the bus.
            argv += ["--state-address", str(self.replicas[0].info["address"])]
        child = spawn("worker", argv, stdout=log, stderr=log, env=_env() | dict(env or {}))
        self.workers.append(child)
        return child

    def start_gateway(self, *extra: str) -> Child:
        log = self.log_file(f"gateway{len(self.gateways)}")
        argv = python_role_argv("gateway", "--nats-url", self.nats_url, "--port", "0", *extra)
        child = spawn("gateway", argv, stdout=log, stderr=log, env=_env())
        self.gateways.append(child)
        return child

    def kill(self, child: Child) -> None:
        """``kill -9`` a child and forget it (it cannot exit cleanly)."""
        os.kill(child.pid, signal.SIGKILL)
        child.process.wait()
        self.forget(child)

    def forget(self, child: Child) -> None:
        """Stop tracking a child the test has stopped itself."""
        for group in (self.replicas, self.workers, self.gateways):
            if child in group:
                group.remove(child)
        if child is self.nats:
            self.nats = None
        if child is self.state:
            self.state = None

    def children(self) -> list[Child]:
        found = [self.nats, self.state, *self.replicas, *self.workers, *self.gateways]
        return [c for c in found if c is not None]

    def stop(self) -> dict[str, int]:
        """Stop everything, gateways first. Returns each child's exit status."""
        statuses: dict[str, int] = {}
        for i, child in enumerate(reversed(self.children())):
            statuses[f"{child.name}{i}"] = child.stop()
        for handle in self._logs:
            handle.close()
        self._logs.clear()
        return statuses

    def dump_logs(self) -> None:
        """Print every log, for pytest to show when a test failed."""
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            print(f"----- {path.name} -----\n{text[-6000:]}", file=sys.stderr)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("WSGATE_LOG_LEVEL", "DEBUG")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def in_process_state_config(tmp_path: Path, nats_url: str, **settings: Any) -> StateConfig:
    """The config of a StateServer run inside the test process: every port chosen by the
    kernel, the database in ``tmp_path``; ``settings`` override the rest."""
    return StateConfig(
        **{
            "host": "127.0.0.1",
            "port": 0,
            "probe_port": 0,
            "db_path": tmp_path / "state.sqlite3",
            "nats_url": nats_url,
            **settings,
        }
    )


async def write_results(stub: Any, request: Any) -> list[Any]:
    """Every result of a raw ``State.Write`` call (a stream), in the order of the writes."""
    results = [result async for response in stub.Write(request) for result in response.results]
    return sorted(results, key=lambda result: result.index)


def stack_context(
    log_dir: Path,
    *,
    worker: bool = True,
    state: bool = True,
    app: str = "wsgate.examples.app:app",
    workers: int = 1,
    gateway: bool = True,
    gateway_args: tuple[str, ...] = (),
    state_args: tuple[str, ...] = (),
    worker_args: tuple[str, ...] = (),
    worker_env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """Nats, state service, workers and one gateway; stopped (and checked) after."""
    stack = Stack(log_dir)
    try:
        stack.start_nats()
        if state:
            stack.start_state(None, *state_args)
        for _ in range(workers if worker else 0):
            stack.start_worker(app, *worker_args, env=worker_env)
        if gateway:
            stack.start_gateway(*gateway_args)
        yield stack
    finally:
        statuses = stack.stop()
        stack.dump_logs()
    bad = {name: s for name, s in statuses.items() if s not in (0, -signal.SIGTERM)}
    assert not bad, f"processes did not exit cleanly: {bad}"


def start_dev(data_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``wsgate dev`` in its own process group (as a shell runs a foreground job)."""
    return subprocess.Popen(
        [sys.executable, "-m", "wsgate", "dev", "--port", "0", "--data-dir", str(data_dir), *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        process_group=0,
        env=_env() | {"WSGATE_LOG_LEVEL": "INFO"},
    )


_DEV_URL = re.compile(rb"serving \S+ at (http://127\.0\.0\.1:(\d+))")


def wait_for_dev_url(
    proc: subprocess.Popen[bytes], timeout_s: float = 60
) -> tuple[str, int, bytes]:
    """Read dev's output until it prints the URL it serves (its readiness line)."""
    assert proc.stdout is not None
    output = b""
    deadline = time.monotonic() + timeout_s
    while (m := _DEV_URL.search(output)) is None:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"wsgate dev printed no URL:\n{output.decode(errors='replace')}"
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"wsgate dev exited ({proc.wait()}):\n{output.decode(errors='replace')}"
            output += chunk
    return m.group(1).decode(), int(m.group(2)), output


@overload
async def eventually(
    probe: Callable[[], Awaitable[T]], what: str, *, timeout_s: float = ..., interval_s: float = ...
) -> T: ...
@overload
async def eventually(
    probe: Callable[[], T], what: str, *, timeout_s: float = ..., interval_s: float = ...
) -> T: ...
async def eventually(
    probe: Callable[[], Any],
    what: str,
    *,
    timeout_s: float = 20.0,
    interval_s: float = 0.02,
) -> Any:
    """Poll ``probe`` until it returns something truthy, and return that; fail after
    ``timeout_s`` with an AssertionError naming ``what`` was awaited and the last value seen.

    The tests' one waiting helper. ``probe`` is sync (``lambda: len(seen) >= 2``) or async
    (a coroutine function that asks a /metrics page or a server). The bound is on a
    condition that is polled, not a wait standing in for it: where the code under test
    offers an event (a future, an ``asyncio.Event``, a readiness line), await that instead.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {what} (last seen: {value!r:.200})"
            )
        await asyncio.sleep(interval_s)  # the poll's interval, bounded by the deadline above


async def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample's value from a Prometheus /metrics page (0 if absent)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return float(sample.value)
    return 0.0
