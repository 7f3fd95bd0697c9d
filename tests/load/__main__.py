"""``./scripts/load [SCENARIO|all] [DURATION_S] [--json] [--out DIR]``: the load and chaos
scenarios against the cluster in containers; see docs/load-testing.md.

Writes ``results.json``, ``timeline.png`` (and ``churn-memory.png`` for the churn) into the
output directory and prints a summary (with ``--json``: one JSON object on stdout, the rest
on stderr). Exits 0 only when every scenario held its assertions; 1 when one did not; 2 on
bad arguments; 130 when interrupted (the containers are removed in every case).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

from tests.load.cluster import running_cluster
from tests.load.containers import ContainerSession, Interrupted
from tests.load.images import Images, build_images
from tests.load.report import plot_timeline, plot_usage, summary, text_summary, write_json
from tests.load.scenarios import CHURN, SCENARIOS, Result, run_churn, run_scenario
from tests.load.traffic import Shape

NAMES = {
    **{s.name: s.name for s in SCENARIOS.values()},
    **{s.letter: s.name for s in SCENARIOS.values()},
    CHURN.name: CHURN.name,
    CHURN.letter: CHURN.name,
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/load", description=__doc__.split("\n\n")[0])
    choices = ", ".join(f"{s.letter}/{s.name}" for s in (*SCENARIOS.values(), CHURN))
    parser.add_argument("scenario", nargs="?", default="all", help=f"all (default), or {choices}")
    parser.add_argument(
        "duration", nargs="?", type=float, default=60.0,
        help="seconds of load per scenario (default 60; the churn runs until done)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--churn", type=int, default=100_000, help="connections of the churn (g)")
    parser.add_argument(
        "--small", action="store_true", help="a quarter of the connections (a quick look)"
    )
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.scenario.split(",")]
    if wanted == ["all"]:
        args.names = [*SCENARIOS, CHURN.name]
    else:
        unknown = [w for w in wanted if w not in NAMES]
        if unknown:
            parser.error(f"unknown scenario {', '.join(unknown)}; choose from all, {choices}")
        args.names = [NAMES[w] for w in wanted]
    if args.duration < 10:
        parser.error("duration must be at least 10 seconds")
    return args


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run(
    args: argparse.Namespace, images: Images, session: ContainerSession, out: Path
) -> list[Result]:
    shape = Shape() if not args.small else SMALL
    results = []
    with running_cluster(session, images, out / "cluster") as cluster:
        say(f"cluster up: {len(cluster.nodes)} containers")
        for name in args.names:
            say(f"running {name} ...")
            if name == CHURN.name:
                result = await run_churn(cluster, args.churn, shape)
            else:
                result = await run_scenario(cluster, SCENARIOS[name], args.duration, shape)
            say(text_summary([result.as_dict()]).splitlines()[1])
            results.append(result)
    return results


SMALL = Shape(echo_clients=24, rooms=3, members=3, counters=4, counter_clients=2)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = args.out or Path("load-results") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    say("building images (cached when unchanged) ...")
    images = build_images()
    try:
        with ContainerSession() as session:
            results = asyncio.run(run(args, images, session, out))
    except (KeyboardInterrupt, Interrupted):
        say("interrupted: every container removed")
        return 130
    dicts = [r.as_dict() for r in results]
    meta = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": args.duration,
    }
    write_json(dicts, out / "results.json", meta)
    timeline = [d for d in dicts if d["name"] != CHURN.name] or dicts
    plot_timeline(timeline, out / "timeline.png")
    for d in dicts:
        if d["name"] == CHURN.name:
            plot_usage(d, out / "churn-memory.png")
    say(text_summary(dicts))
    say(f"results: {out}/results.json, {out}/timeline.png")
    if args.json:
        print(json.dumps(summary(dicts)))
    return 0 if all(d["ok"] for d in dicts) else 1


if __name__ == "__main__":
    sys.exit(main())
