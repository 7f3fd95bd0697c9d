"""The processes of a benchmark run, from the parent's side: the stack under test, the
baseline server, the load-generator clients, and what ``/proc`` says about them.

Everything is started through :mod:`wsgate.procs` (readiness over a descriptor, own
process group, death with the parent) on 127.0.0.1 with ports chosen by the kernel, and
stopped by PID with :meth:`Child.stop`, in ``finally`` blocks. Every wait is bounded.
Linux only (``/proc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp

from wsgate.bench.config import DEFAULT_APP
from wsgate.errors import WsgateError
from wsgate.procs import Child, python_role_argv, spawn, start_nats_server

log = logging.getLogger("wsgate.bench")

#: Descriptors a process needs besides its WebSocket connections (NATS, logs, listeners).
FD_MARGIN = 64
#: The roles log at this level during a benchmark, whatever WSGATE_LOG_LEVEL says, so a
#: debug setting in the environment does not distort the figures.
ROLE_LOG_LEVEL = "INFO"


class BenchError(WsgateError):
    """A benchmark could not run or its measurement is invalid; the message says why."""


@dataclass
class BenchStack:
    """A running full stack: nats-server, state service, one worker, one gateway."""

    nats: Child
    state: Child
    worker: Child
    gateway: Child

    def roles(self) -> dict[str, Child]:
        """Each process of the stack by its role."""
        return {
            "gateway": self.gateway,
            "nats": self.nats,
            "worker": self.worker,
            "state": self.state,
        }

    def ws_url(self, path: str) -> str:
        """The gateway's WebSocket URL for ``path``."""
        return str(self.gateway.info["url"]).replace("http://", "ws://", 1) + path


class _Logs:
    """Log files of the children of one run, closed together."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._handles: list[IO[Any]] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def open(self, name: str) -> IO[Any]:
        handle = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._handles.append(handle)
        return handle

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()


@contextlib.contextmanager
def running_stack(log_dir: Path, app: str = DEFAULT_APP) -> Iterator[BenchStack]:
    """Start nats-server, the state service, a worker serving ``app`` and a gateway, each
    waited for; stop them (gateway first) on exit. Logs go to ``log_dir``."""
    logs = _Logs(log_dir)
    children: list[Child] = []
    common = ["--log-level", ROLE_LOG_LEVEL]
    try:
        out = logs.open("nats")
        nats = start_nats_server(log_dir / "nats", stdout=out, stderr=out)
        children.append(nats)
        nats_url = str(nats.info["url"])
        out = logs.open("state")
        db = str(log_dir / "state.sqlite3")
        argv = python_role_argv(
            "state", "--nats-url", nats_url, "--port", "0", "--probe-port", "0",
            "--db-path", db, *common,
        )  # fmt: skip
        state = spawn("state", argv, stdout=out, stderr=out)
        children.append(state)
        out = logs.open("worker")
        argv = python_role_argv(
            "worker", "--nats-url", nats_url, "--state-address", str(state.info["address"]),
            "--port", "0", "--app", app, *common,
        )  # fmt: skip
        worker = spawn("worker", argv, stdout=out, stderr=out)
        children.append(worker)
        out = logs.open("gateway")
        # No message rate limit: a benchmark's closed loops send as fast as the path answers,
        # which is what it measures. No per-address limit: every client is on 127.0.0.1.
        argv = python_role_argv(
            "gateway", "--nats-url", nats_url, "--port", "0", "--message-rate", "0",
            "--max-connections-per-ip", "0", *common
        )  # fmt: skip
        gateway = spawn("gateway", argv, stdout=out, stderr=out)
        children.append(gateway)
        log.info(
            "stack up: gateway pid %d at %s, worker pid %d, logs in %s",
            gateway.pid, gateway.info["url"], worker.pid, log_dir,
        )  # fmt: skip
        yield BenchStack(nats=nats, state=state, worker=worker, gateway=gateway)
    finally:
        for child in reversed(children):
            child.stop()
        logs.close()


@contextlib.contextmanager
def running_baseline(log_dir: Path) -> Iterator[Child]:
    """Start the baseline echo server (:mod:`wsgate.bench.baseline`); stop it on exit."""
    logs = _Logs(log_dir)
    out = logs.open("baseline")
    child: Child | None = None
    try:
        argv = [sys.executable, "-m", "wsgate.bench.baseline", "--port", "0"]
        child = spawn("baseline", argv, stdout=out, stderr=out)
        log.info("baseline up: pid %d at %s", child.pid, child.info["url"])
        yield child
    finally:
        if child is not None:
            child.stop()
        logs.close()


def ws_url(child: Child, path: str) -> str:
    """The WebSocket URL of ``path`` on a child that reported an ``http://`` url."""
    return str(child.info["url"]).replace("http://", "ws://", 1) + path


def split(total: int, parts: int) -> list[int]:
    """``total`` split into at most ``parts`` nearly equal, non-zero shares."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@contextlib.contextmanager
def load_clients(
    mode: str,
    url: str,
    connections: int,
    processes: int,
    log_dir: Path,
    extra: Sequence[str] = (),
    *,
    numbered: bool = False,
) -> Iterator[list[Child]]:
    """Start load-generator processes (:mod:`wsgate.bench.loadgen`) sharing
    ``connections`` and wait until each has opened its share; stop them on exit.
    ``numbered``: each is told the index of its first connection (``--offset``), so that
    connections are numbered across processes.

    Each child's ``info`` holds ``open``, ``failed`` and ``error``. Raises BenchError if
    not every connection opened.
    """
    shares = split(connections, processes)
    _check_client_fd_budget(max(shares))
    logs = _Logs(log_dir)
    children: list[Child] = []
    # Opening is bounded per connection by the client; this bounds the whole share.
    ready_timeout_s = 30.0 + max(shares) / 50
    try:
        for i, share in enumerate(shares):
            argv = [
                sys.executable, "-m", "wsgate.bench.loadgen", mode,
                "--url", url, "--connections", str(share), *extra,
            ]  # fmt: skip
            if numbered:
                argv += ["--offset", str(sum(shares[:i]))]
            out = logs.open(f"loadgen{i}")
            children.append(
                spawn(
                    f"loadgen{i}",
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=out,
                    ready_timeout_s=ready_timeout_s,
                )
            )
        failed = sum(int(c.info["failed"]) for c in children)
        if failed:
            errors = "; ".join(str(c.info["error"]) for c in children if c.info["error"])
            raise BenchError(f"{failed} of {connections} connections to {url} failed: {errors}")
        yield children
    finally:
        for child in children:
            child.stop()
        logs.close()


def start_loops(children: Sequence[Child]) -> None:
    """Tell every echo client to start its closed loops (SIGUSR1), all at once."""
    for child in children:
        child.process.send_signal(signal.SIGUSR1)


def collect_results(children: Sequence[Child], timeout_s: float) -> list[dict[str, Any]]:
    """Each echo client's result object (the JSON line it prints before exiting).

    Raises BenchError if one does not answer within ``timeout_s`` (in all) or prints
    something else.
    """
    deadline = time.monotonic() + timeout_s
    results: list[dict[str, Any]] = []
    for child in children:
        try:
            out, _ = child.process.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{child.name} gave no result within {timeout_s:g} s") from exc
        lines = out.decode(errors="replace").strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, ValueError) as exc:
            raise BenchError(
                f"{child.name} (status {child.process.returncode}) printed no result"
            ) from exc
        if not isinstance(result, dict):
            raise BenchError(f"{child.name} printed {lines[-1][:200]!r}, not a result")
        results.append(result)
    return results


def _check_client_fd_budget(share: int) -> None:
    # Children inherit the hard limit; each load generator raises its soft limit to it.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < share + FD_MARGIN:
        raise BenchError(
            f"a client process needs about {share + FD_MARGIN} file descriptors but the hard "
            f"RLIMIT_NOFILE is {hard}: use more --clients or raise the hard limit"
        )


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) process ``pid`` used so far, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command: state is field 3, utime and stime fields 14 and 15 (in ticks).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def settled_rss_kib(pid: int, *, timeout_s: float = 5.0, interval_s: float = 0.25) -> int:
    """RSS of ``pid`` once two samples ``interval_s`` apart agree within 0.1% (or 16 KiB),
    or the last sample after ``timeout_s``: the process is done allocating."""
    deadline = time.monotonic() + timeout_s
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        now = rss_kib(pid)
        if abs(now - last) <= max(16, last // 1000):
            return now
        last = now
    return last


def nofile_limits(pid: int) -> tuple[int | None, int | None]:
    """Soft and hard RLIMIT_NOFILE of process ``pid`` (None: unlimited), from
    ``/proc/PID/limits``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return _limit(soft), _limit(hard)
    raise BenchError(f"no 'Max open files' in /proc/{pid}/limits")


def _limit(text: str) -> int | None:
    return None if text == "unlimited" else int(text)


def check_fd_budget(child: Child, connections: int) -> None:
    """Raise BenchError if ``child`` cannot hold ``connections`` sockets plus a margin
    under its own soft RLIMIT_NOFILE."""
    soft, hard = nofile_limits(child.pid)
    needed = connections + FD_MARGIN
    if soft is not None and soft < needed:
        if hard is None or hard >= needed:
            remedy = (
                f"the {child.name} should raise its soft limit to the hard limit at start "
                "(resource.setrlimit), or run it under a higher `ulimit -Sn`"
            )
        else:
            remedy = "the hard limit is too low as well: raise it (`ulimit -n`, LimitNOFILE)"
        raise BenchError(
            f"the {child.name}'s soft RLIMIT_NOFILE is {soft} (hard: {hard or 'unlimited'}), "
            f"but {connections} connections need about {needed} descriptors: {remedy}"
        )


def prime(url: str, timeout_s: float = 10.0) -> None:
    """One echo round trip through ``url``, so that one-time costs of a first connection
    (lazy imports, caches) are paid before memory is measured."""

    async def once() -> None:
        async with (
            asyncio.timeout(timeout_s),
            aiohttp.ClientSession() as session,
            session.ws_connect(url) as ws,
        ):
            await ws.send_bytes(b"prime")
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.BINARY:
                raise BenchError(f"priming {url}: expected an echo, got {msg.type.name}")

    try:
        asyncio.run(once())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"priming {url} failed: {exc!r}") from exc
