"""``wsgate dev``: one command runs the whole stack, and stopping it leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.harness import start_dev, wait_for_dev_url

pytestmark = pytest.mark.timeout(90)


@contextlib.contextmanager
def _dev(data_dir: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_dev(data_dir, *extra)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _drain(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> bytes:
    assert proc.stdout is not None
    out, _ = proc.communicate(timeout=timeout_s)
    return out


def _nothing_listens_on(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


async def _echo_once(url: str) -> None:
    ws_url = url.replace("http://", "ws://") + "/echo"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
        await ws.send_str("through dev")
        assert (await ws.receive(timeout=10)).data == "through dev"
        await ws.send_bytes(b"\x00dev")
        assert (await ws.receive(timeout=10)).data == b"\x00dev"


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
async def test_dev_serves_the_example_and_stops_cleanly(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    with _dev(tmp_path / "data") as proc:
        url, port, _ = wait_for_dev_url(proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = sorted(
            " ".join(c.cmdline()[2:4]) if "python" in c.name() else c.name() for c in children
        )
        assert names == ["nats-server", "wsgate gateway", "wsgate state", "wsgate worker"], names
        await _echo_once(url)
        assert (tmp_path / "data" / "state.sqlite3").exists()

        # Ctrl-C in a terminal signals the whole foreground process group.
        os.killpg(proc.pid, stop_signal)
        output = _drain(proc)
        assert proc.returncode == 0, output.decode(errors="replace")
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"
    assert _nothing_listens_on(port)


async def test_children_die_with_a_killed_dev(tmp_path: Path) -> None:
    with _dev(tmp_path / "data") as proc:
        wait_for_dev_url(proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 4
        # SIGKILL: no chance to clean up; the kernel's parent-death signal stops the children.
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, f"left running: {alive}"


async def test_dev_exits_nonzero_when_a_child_fails(tmp_path: Path) -> None:
    with _dev(tmp_path / "data", "--app", "no_such_module:app") as proc:
        output = _drain(proc)
    assert proc.returncode == 1
    assert b"no_such_module" in output
