"""``wsgate bench``: benchmarks that print figures (speed is never asserted by tests).

- ``wsgate bench echo``: msgs/s and round-trip p50/p99 through the full path (gateway,
  NATS, worker) beside a plain aiohttp echo server, in one run (:mod:`.echo`).
- ``wsgate bench idle``: the gateway's resident memory per idle connection (:mod:`.idle`).
- ``wsgate bench state``: durable writes/s through the state service beside a naive SQLite
  baseline, in one run (:mod:`.state`; its command line is in :mod:`.state_command`).
- ``wsgate bench object``: turns/s of a durable object (the naive counter) through the
  full path, on one object and spread over many, beside the full path's echo, in one run
  (:mod:`.objects`).

Both start every process they need on 127.0.0.1 (:mod:`.processes`), drive the load from
separate load-generator processes (:mod:`.loadgen`, picows on uvloop) and stop everything
by PID. ``--json`` prints exactly one JSON object on stdout; logs go to stderr. This
module only builds the command line and dispatches; the heavy imports happen on use.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from wsgate.bench.config import EchoBenchConfig, IdleBenchConfig, ObjectBenchConfig
from wsgate.bench.state_command import add_state_parser, run_state_command
from wsgate.errors import ConfigError, WsgateError

if TYPE_CHECKING:
    from wsgate.bench.echo import EchoReport
    from wsgate.bench.idle import IdleReport
    from wsgate.bench.objects import ObjectReport

log = logging.getLogger("wsgate.bench")

__all__ = ["add_bench_parser", "run_bench"]


def add_bench_parser(subparsers: Any) -> None:
    """Add ``bench`` with its ``echo`` and ``idle`` subcommands to the ``wsgate`` parser's
    subparsers (``argparse``'s ``add_subparsers()`` result)."""
    help_text = "measure the full path against a baseline, and memory per idle connection"
    bench = subparsers.add_parser("bench", help=help_text, description=help_text)
    kinds = bench.add_subparsers(dest="bench", metavar="BENCHMARK")

    echo_defaults = EchoBenchConfig()
    echo = kinds.add_parser(
        "echo",
        help="closed-loop echo: msgs/s, p50 and p99 of the full path and of plain aiohttp",
        description="N connections, each sending a message and waiting for its echo "
        "before the next, through a stack it starts and through a plain aiohttp echo "
        "server, measured the same way in the same run.",
    )
    echo.add_argument(
        "--connections",
        type=int,
        default=echo_defaults.connections,
        help=f"concurrent connections (default: {echo_defaults.connections})",
    )
    echo.add_argument(
        "--size",
        dest="size_bytes",
        metavar="BYTES",
        type=int,
        default=echo_defaults.size_bytes,
        help=f"message size in bytes (default: {echo_defaults.size_bytes})",
    )
    _add_loop_options(
        echo,
        echo_defaults,
        "rounds, each measuring both targets afresh; the median round of each is reported, "
        "and the median of the rounds' ratios",
    )

    idle_defaults = IdleBenchConfig()
    idle = kinds.add_parser(
        "idle",
        help="the gateway's resident memory per idle connection, beside plain aiohttp's",
        description="Open N idle connections to a stack it starts and report the "
        "gateway's RSS growth per connection; then the same for a plain aiohttp echo server.",
    )
    idle.add_argument(
        "--connections",
        type=int,
        default=idle_defaults.connections,
        help=f"idle connections to open (default: {idle_defaults.connections})",
    )
    idle.add_argument(
        "--clients",
        type=int,
        default=idle_defaults.clients,
        help=f"client processes (default: {idle_defaults.clients})",
    )
    idle.add_argument("--json", action="store_true", help="print one JSON object")
    _add_object_parser(kinds)
    add_state_parser(kinds)
    bench.set_defaults(bench_parser=bench)


def _add_object_parser(kinds: Any) -> None:
    defaults = ObjectBenchConfig()
    obj = kinds.add_parser(
        "object",
        help="a durable object's turns/s (the naive counter), on one object and on many, "
        "beside the full path's echo",
        description="Closed loops of increments of the example app's counter (get, then "
        "put) through a stack it starts: N connections on one object, then one connection "
        "on each of M objects, beside echo through the same stack; counters are checked "
        "against the increments acknowledged.",
    )
    obj.add_argument(
        "--connections",
        type=int,
        default=defaults.connections,
        help=f"connections on the one object and on echo (default: {defaults.connections})",
    )
    obj.add_argument(
        "--objects",
        type=int,
        default=defaults.objects,
        help=f"objects of the spread, a connection each (default: {defaults.objects})",
    )
    _add_loop_options(
        obj, defaults, "rounds on fresh processes; the round with the median ratio is reported"
    )


def _add_loop_options(
    parser: Any, defaults: EchoBenchConfig | ObjectBenchConfig, rounds_help: str
) -> None:
    """The options of a closed-loop benchmark: window, warm-up, clients, rounds, --json."""
    parser.add_argument(
        "--duration-s",
        type=float,
        default=defaults.duration_s,
        help=f"measurement window (default: {defaults.duration_s:g})",
    )
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=defaults.warmup_s,
        help=f"load before the window, not counted (default: {defaults.warmup_s:g})",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=defaults.clients,
        help=f"load-generator processes (default: {defaults.clients})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help=f"{rounds_help} (default: {defaults.rounds})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` names and print its figures. Returns the exit status:
    0 done, 1 failed (the reason is logged), 2 bad usage."""
    if args.bench is None:
        args.bench_parser.print_help()
        return 2
    if args.bench == "state":  # no load-generator processes, so no picows
        return run_state_command(args)
    config: EchoBenchConfig | IdleBenchConfig | ObjectBenchConfig
    try:
        if args.bench == "object":
            config = ObjectBenchConfig(
                connections=args.connections,
                objects=args.objects,
                duration_s=args.duration_s,
                warmup_s=args.warmup_s,
                clients=args.clients,
                rounds=args.rounds,
            )
        elif args.bench == "echo":
            config = EchoBenchConfig(
                connections=args.connections,
                size_bytes=args.size_bytes,
                duration_s=args.duration_s,
                warmup_s=args.warmup_s,
                clients=args.clients,
                rounds=args.rounds,
            )
        else:
            config = IdleBenchConfig(connections=args.connections, clients=args.clients)
    except ConfigError as exc:
        args.bench_parser.exit(2, f"wsgate bench {args.bench}: {exc}\n")
    if importlib.util.find_spec("picows") is None:
        print(
            "wsgate bench: the load generator needs picows: pip install 'wsgate[bench]'",
            file=sys.stderr,
        )
        return 1
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)-7s bench %(name)s: %(message)s",
        stream=sys.stderr,
    )
    report: EchoReport | IdleReport | ObjectReport
    try:
        if isinstance(config, ObjectBenchConfig):
            from wsgate.bench.objects import run_object

            report = run_object(config)
        elif isinstance(config, EchoBenchConfig):
            from wsgate.bench.echo import run_echo

            report = run_echo(config)
        else:
            from wsgate.bench.idle import run_idle

            report = run_idle(config)
    except WsgateError as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(report.to_json()) if args.json else report.render(), flush=True)
    return 0
