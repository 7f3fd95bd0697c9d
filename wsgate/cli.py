"""The ``wsgate`` command: ``dev``, ``gateway``, ``worker``, ``state`` (and ``bench``,
see :mod:`wsgate.bench`; ``nats-auth``, which writes the NATS users and permissions of
the roles, see :mod:`wsgate.nats_permissions`).

``wsgate state`` serves; ``wsgate state migrate``, ``backup PATH`` and ``restore PATH`` are
administrative actions on its database, done by :mod:`wsgate.stateservice.admin` (dispatched here).

Each role's flags come from its config dataclass (:mod:`wsgate.config`): ``--nats-url``
for ``nats_url`` and so on, each defaulting to its ``WSGATE_*`` environment variable,
then to the dataclass default. The environment is read here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import resource
import signal
import sys
import typing
from collections.abc import Callable, Collection, Coroutine
from pathlib import Path
from typing import Any

from wsgate import __version__
from wsgate.bench import add_bench_parser, run_bench
from wsgate.config import DEFAULT_PREFIX, DevConfig, GatewayConfig, StateConfig, WorkerConfig
from wsgate.errors import ConfigError, WsgateError
from wsgate.objects_command import COMMAND as OBJECTS
from wsgate.objects_command import add_objects_parser, run_objects
from wsgate.readiness import notify_ready

log = logging.getLogger("wsgate")

_ROLES: dict[str, tuple[type, str]] = {
    "dev": (DevConfig, "run everything: embedded NATS, state service, a worker and a gateway"),
    "gateway": (GatewayConfig, "terminate WebSockets and forward their events over NATS"),
    "worker": (WorkerConfig, "run the app's handlers for events from NATS"),
    "state": (StateConfig, "serve durable object storage over gRPC"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wsgate`` console script."""
    from wsgate.procs import die_with_parent_if_asked

    die_with_parent_if_asked()
    parser = build_parser(os.environ)
    args = parser.parse_args(argv)
    if args.role is None:
        parser.print_help()
        return 2
    if args.role == "bench":
        return run_bench(args)
    if args.role == NATS_AUTH:
        return _run_nats_auth(args, parser)
    if args.role == OBJECTS:
        return run_objects(args, parser)
    action = getattr(args, "action", None)
    config_type, _ = _ROLES[args.role]
    try:
        config = config_type(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)}
        )
    except ConfigError as exc:
        parser.exit(2, f"wsgate {args.role}: {exc}\n")
    _setup_logging(args.role, args.log_level)
    if args.role == "state" and action not in (None, "serve"):
        return _run_state_action(action, config, args)
    app_dir = Path(args.app_dir).resolve() if getattr(args, "app_dir", None) else Path.cwd()
    try:
        if args.role == "dev":
            from wsgate.dev import run_dev

            return run_dev(config, app_dir=app_dir, log_level=args.log_level)
        return _run_async(_serve(args.role, config, args.ready_fd, app_dir))
    except WsgateError as exc:
        log.error("%s", exc)
        return 1


def build_parser(environ: typing.Mapping[str, str]) -> argparse.ArgumentParser:
    """The argument parser, with defaults taken from ``environ``."""
    parser = argparse.ArgumentParser(
        prog="wsgate",
        description="Cloudflare-Workers-style WebSockets with Durable Objects, self-hosted.",
    )
    parser.add_argument("--version", action="version", version=f"wsgate {__version__}")
    sub = parser.add_subparsers(dest="role", metavar="ROLE")
    for role, (config_type, help_text) in _ROLES.items():
        p = sub.add_parser(role, help=help_text, description=help_text)
        _add_config_options(p, config_type, environ)
        p.add_argument(
            "--log-level",
            default=environ.get("WSGATE_LOG_LEVEL", "INFO").upper(),
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help="logging threshold [WSGATE_LOG_LEVEL]",
        )
        if role in ("dev", "worker"):
            p.add_argument(
                "--app-dir",
                default=environ.get("WSGATE_APP_DIR", ""),
                help="directory put first on sys.path to import the app (default: the "
                "current directory) [WSGATE_APP_DIR]",
            )
        if role != "dev":
            p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
        if role == "state":
            _add_state_actions(p, environ)
    add_bench_parser(sub)
    _add_nats_auth_parser(sub, environ)
    add_objects_parser(sub, environ, _add_config_options)
    return parser


#: The command that writes nats-server's authorization block.
NATS_AUTH = "nats-auth"


def _add_nats_auth_parser(sub: Any, environ: typing.Mapping[str, str]) -> None:
    help_text = "write nats-server's users and permissions of the roles (an authorization block)"
    p = sub.add_parser(
        NATS_AUTH,
        help=help_text,
        description=help_text + ": one user per identity (a node name, WSGATE_NODE_NAME), "
        "allowed only the subjects its role needs. deploy/k8s/base/nats/authorization.conf "
        "is its output for the Kubernetes manifests.",
    )
    p.add_argument(
        "--prefix",
        default=environ.get("WSGATE_PREFIX", DEFAULT_PREFIX),
        help=f"subject prefix [WSGATE_PREFIX, default: {DEFAULT_PREFIX}]",
    )
    for role in ("gateway", "worker", "state"):
        p.add_argument(
            f"--{role}",
            metavar="NODE",
            action="append",
            default=None,
            help=f"a {role} identity (its WSGATE_NODE_NAME); repeat for several (default: {role})",
        )
    p.add_argument(
        "--nkey",
        metavar="NODE=PUBLIC_KEY",
        action="append",
        default=[],
        help="log identity NODE in by this user nkey (U..., `nk -gen user -pubout`; the role "
        "then sets WSGATE_NATS_NKEY_SEED) instead of a user and password; repeat for several",
    )
    p.add_argument(
        "--output", metavar="PATH", default="", help="write the block to PATH (default: stdout)"
    )


def _run_nats_auth(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from wsgate.nats_permissions import Identity, render_authorization

    nkeys: dict[str, str] = {}
    for given in args.nkey:
        node, _, key = given.partition("=")
        if not key:
            parser.exit(2, f"wsgate {NATS_AUTH}: --nkey {given!r}: give NODE=PUBLIC_KEY\n")
        nkeys[node] = key
    identities = [
        Identity(role, node, nkeys.pop(node, ""))
        for role in ("gateway", "worker", "state")
        for node in (getattr(args, role) or [role])
    ]
    if nkeys:
        parser.exit(2, f"wsgate {NATS_AUTH}: --nkey for no identity: {', '.join(nkeys)}\n")
    words = [f"wsgate {NATS_AUTH}"]
    if args.prefix != DEFAULT_PREFIX:
        words.append(f"--prefix {args.prefix}")
    words += [f"--{i.role} {i.node}" for i in identities if i.node != i.role]
    words += [f"--nkey {i.node}={i.nkey}" for i in identities if i.nkey]
    command = " ".join(words)
    try:
        text = render_authorization(args.prefix, identities, command=command)
    except ConfigError as exc:
        parser.exit(2, f"wsgate {NATS_AUTH}: {exc}\n")
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


#: ``wsgate state``'s actions; serving is the default (no action).
_STATE_ACTIONS: dict[str, str] = {
    "serve": "serve durable object storage over gRPC (the default)",
    "migrate": "create or migrate the database's schema to this version's, then exit",
    "backup": "write an online snapshot of the SQLite file to PATH (state service may run)",
    "restore": "replace the SQLite file with the snapshot PATH (state service stopped)",
}

#: The settings an administrative action reads: where the database is.
_STORAGE_SETTINGS = ("db_path", "dsn")


def _add_state_actions(parser: argparse.ArgumentParser, environ: typing.Mapping[str, str]) -> None:
    """``wsgate state [ACTION]``. Each action's parser takes the flags it uses again, so
    they may come before or after the action word; there they default to SUPPRESS, which
    leaves the value parsed before the action (or the environment's) in place."""
    actions = parser.add_subparsers(
        dest="action",
        metavar="ACTION",
        title="actions",
        description="without one, the state service serves",
    )
    for name, help_text in _STATE_ACTIONS.items():
        p = actions.add_parser(name, help=help_text, description=help_text)
        if name == "serve":
            _add_config_options(p, StateConfig, environ, inherit=True)
            p.add_argument(
                "--ready-fd", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
        else:
            _add_config_options(p, StateConfig, environ, only=_STORAGE_SETTINGS, inherit=True)
        p.add_argument(
            "--log-level",
            default=argparse.SUPPRESS,
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help="logging threshold [WSGATE_LOG_LEVEL]",
        )
        if name == "backup":
            p.add_argument("path", type=Path, metavar="PATH", help="the snapshot file to write")
            p.add_argument("--force", action="store_true", help="replace PATH if it exists")
        elif name == "restore":
            p.add_argument("path", type=Path, metavar="PATH", help="the snapshot to restore")


def _run_state_action(action: str, config: StateConfig, args: argparse.Namespace) -> int:
    """Run an administrative action of ``wsgate state``: its report on stdout, exit 0; or
    one line on stderr and the action's exit status."""
    from wsgate.stateservice import admin

    try:
        if action == "migrate":
            report: object = admin.migrate(config)
        elif action == "backup":
            report = admin.backup(config, args.path, force=args.force)
        else:
            report = admin.restore(config, args.path)
    except admin.AdminError as exc:
        print(f"wsgate state {action}: {exc}", file=sys.stderr)
        return exc.exit_code
    print(report)
    return 0


def _add_config_options(
    parser: argparse.ArgumentParser,
    config_type: type,
    environ: typing.Mapping[str, str],
    *,
    only: Collection[str] | None = None,
    inherit: bool = False,
) -> None:
    """One flag per field of ``config_type`` (those in ``only``, if given). ``inherit``:
    the flags default to SUPPRESS (a subcommand's repeat of its parent's flags); their
    help still shows the real default."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        if only is not None and f.name not in only:
            continue
        kind = hints[f.name]
        env = f.metadata["env"]
        default = f.default
        if env in environ:
            try:
                default = kind(environ[env])
            except ValueError:
                parser.exit(2, f"wsgate: {env}={environ[env]!r} is not a valid {kind.__name__}\n")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=argparse.SUPPRESS if inherit else default,
            help=f"{f.metadata['help']} [{env}, default: {default}]",
        )


def _setup_logging(role: str, level: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s {role} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # grpc logs every event loop it sees at DEBUG; that drowns everything else.
    logging.getLogger("grpc").setLevel(max(logging.INFO, logging.getLevelName(level)))


def _run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop where it is installed, else on the default loop."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


async def _serve(role: str, config: Any, ready_fd: int | None, app_dir: Path) -> int:
    """Start one role, report readiness, run until SIGINT/SIGTERM, then close it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server: Any
    if role == "gateway":
        from wsgate.gateway.server import Gateway

        _raise_open_files_limit()  # one descriptor per client: 1024 is far too few
        server = Gateway(config)
    elif role == "worker":
        from wsgate.worker.loader import load_app
        from wsgate.worker.runtime import Worker

        server = Worker(config, load_app(config.app, app_dir=app_dir))
    else:
        from wsgate.stateservice.server import StateServer

        server = StateServer(config)
    async with server:
        if role == "gateway":
            # SIGHUP reloads the TLS certificate and key (and no longer ends the process).
            loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
        # Everything allocated so far lives as long as the process: keep the collector off
        # it, and collect the young generation less often (hot paths allocate a lot of
        # short-lived objects that reference counting frees anyway).
        gc.freeze()
        gc.set_threshold(10_000, 20, 50)
        notify_ready(ready_fd, _ready_info(role, server))
        await stop.wait()
        log.info("stopping")
    return 0


def _raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard limit (what the process may do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d: %s", soft, exc)


def _ready_info(role: str, server: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"role": role, "pid": os.getpid()}
    if role == "gateway":
        info.update(url=server.url, port=server.port, gateway_id=server.gateway_id)
    elif role == "worker":
        info.update(
            probe_port=server.probe_port,
            worker_id=server.worker_id,
            api_port=server.api_port,
            api_grpc_port=server.api_grpc_port,
        )
    elif role == "state":
        info.update(
            address=server.address, probe_port=server.probe_port, replica_id=server.replica_id
        )
    return info
