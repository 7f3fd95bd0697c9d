"""``wsgate bench object``: turns per second of a durable object through the full path
(client → gateway → NATS → worker → state service → back), beside the full path's echo,
in one run.

The object is the example app's counter (``/counter/{name}``), written as a Worker author
writes it: ``get`` the value, ``put`` it plus one, send it. Three measurements share one
stack (nats-server, state service, one worker, one gateway), started afresh each round:

1. **echo**: ``connections`` closed loops on ``/echo`` (the stateless baseline);
2. **one object**: ``connections`` closed loops of increments, all on one object, so
   every turn queues behind the others in the object's one activation;
3. **spread**: one connection on each of ``objects`` objects.

After each measurement the counters are read from the state service and checked against
the increments the clients saw answered: ``lost`` is what a client saw acknowledged and
the object does not hold (0, or the counter is wrong). ``ratio`` is one object's turns/s
over echo's msgs/s in the same round; the round with the median ratio is reported.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wsgate.bench.config import COUNTER_PATH, ECHO_PATH, EchoBenchConfig, ObjectBenchConfig
from wsgate.bench.echo import RESULT_GRACE_S, EchoFigures, measure, merge_results
from wsgate.bench.processes import (
    BenchError,
    BenchStack,
    collect_results,
    cpu_seconds,
    load_clients,
    running_stack,
    start_loops,
)
from wsgate.errors import WsgateError

log = logging.getLogger("wsgate.bench")

#: The example app's counter: its namespace and key.
COUNTER_NAMESPACE = "counter"
COUNTER_KEY = "value"
#: Counters read from the state service at once when checking a spread.
READ_CONCURRENCY = 64


@dataclass(frozen=True)
class CountFigures:
    """What one counter measurement sustained, and whether the counters are exact."""

    turns_per_s: float
    p50_ms: float
    p99_ms: float
    #: Increments the clients saw answered (warm-up included) ...
    answered: int
    #: ... and what the objects hold, less the increment each connection's open made.
    counted: int
    objects: int
    #: CPU each process of the stack spent per answered turn, in microseconds: where a
    #: turn's time goes.
    cpu_us_per_turn: dict[str, float]

    @property
    def lost(self) -> int:
        """Acknowledged increments the objects do not hold (negative: counted twice)."""
        return self.answered - self.counted

    def to_json(self) -> dict[str, float | int]:
        """The figures ``--json`` prints."""
        return {
            "turns_per_s": round(self.turns_per_s, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "lost": self.lost,
        }


@dataclass(frozen=True)
class ObjectRound:
    """The three measurements of one round."""

    echo: EchoFigures
    one_object: CountFigures
    spread: CountFigures

    @property
    def ratio(self) -> float:
        """One object's turns/s over echo's msgs/s."""
        return self.one_object.turns_per_s / self.echo.msgs_per_s


@dataclass(frozen=True)
class ObjectReport:
    """The reported round, and what every round lost."""

    config: ObjectBenchConfig
    round: ObjectRound
    #: Increments lost over all rounds (each round is checked, not only the reported one).
    lost: int

    def to_json(self) -> dict[str, object]:
        """``{"one_object": {...}, "spread": {...}, "echo": {...}, "ratio": r}``."""
        one = self.round.one_object.to_json() | {"lost": self.lost}
        return {
            "one_object": one,
            "spread": self.round.spread.to_json(),
            "echo": self.round.echo.to_json(),
            "ratio": round(self.round.ratio, 4),
        }

    def render(self) -> str:
        """A small table for people."""
        c, r = self.config, self.round
        lines = [
            f"wsgate bench object: {c.connections} connections on one object and one on each "
            f"of {c.objects} objects, {c.duration_s:g} s after {c.warmup_s:g} s warm-up, "
            f"{c.clients} client process(es), the median of {c.rounds} round(s)",
            f"{'':12} {'per s':>10} {'p50 ms':>8} {'p99 ms':>8} {'lost':>6}",
            f"{'echo':12} {r.echo.msgs_per_s:10.0f} {r.echo.p50_ms:8.2f} {r.echo.p99_ms:8.2f}",
        ]
        for name, f in (("one object", r.one_object), ("spread", r.spread)):
            cpu = "  ".join(f"{role} {us:.0f}" for role, us in f.cpu_us_per_turn.items())
            lines.append(
                f"{name:12} {f.turns_per_s:10.0f} {f.p50_ms:8.2f} {f.p99_ms:8.2f} {f.lost:6d}"
                f"   CPU µs/turn: {cpu}"
            )
        lines.append(
            f"ratio one object/echo: {r.ratio:.3f}; increments lost in all rounds: {self.lost}"
        )
        return "\n".join(lines)


def run_object(config: ObjectBenchConfig) -> ObjectReport:
    """Measure ``config.rounds`` rounds, each on fresh processes; report the round with
    the median ratio. Raises BenchError (the logs are then kept, and the message says
    where)."""
    log_dir = Path(tempfile.mkdtemp(prefix="wsgate-bench-object-"))
    rounds: list[ObjectRound] = []
    try:
        for n in range(config.rounds):
            with running_stack(log_dir / f"round{n}") as stack:
                rounds.append(_measure_round(config, stack, log_dir / f"round{n}", n))
            r = rounds[-1]
            log.info(
                "round %d: echo %.0f msgs/s, one object %.0f turns/s (lost %d), "
                "spread %.0f turns/s (lost %d): ratio %.3f",
                n + 1, r.echo.msgs_per_s, r.one_object.turns_per_s, r.one_object.lost,
                r.spread.turns_per_s, r.spread.lost, r.ratio,
            )  # fmt: skip
    except WsgateError as exc:
        raise BenchError(f"{exc} (logs kept in {log_dir})") from exc
    shutil.rmtree(log_dir, ignore_errors=True)
    ordered = sorted(rounds, key=lambda r: r.ratio)
    lost = sum(r.one_object.lost + r.spread.lost for r in rounds)
    return ObjectReport(config=config, round=ordered[(len(ordered) - 1) // 2], lost=lost)


def _measure_round(
    config: ObjectBenchConfig, stack: BenchStack, log_dir: Path, n: int
) -> ObjectRound:
    echo_config = EchoBenchConfig(
        connections=config.connections,
        duration_s=config.duration_s,
        warmup_s=config.warmup_s,
        clients=config.clients,
    )
    echo = measure(stack.ws_url(ECHO_PATH), echo_config, log_dir / "echo")
    one_name = f"one-{n}"
    one = _measure_counters(
        config, stack, log_dir / "one", [one_name], config.connections, spread=False
    )
    spread_names = [f"spread-{n}-{i}" for i in range(config.objects)]
    spread = _measure_counters(
        config, stack, log_dir / "spread", spread_names, config.objects, spread=True
    )
    return ObjectRound(echo=echo, one_object=one, spread=spread)


def _measure_counters(
    config: ObjectBenchConfig,
    stack: BenchStack,
    log_dir: Path,
    names: list[str],
    connections: int,
    *,
    spread: bool,
) -> CountFigures:
    extra = ["--warmup-s", str(config.warmup_s), "--duration-s", str(config.duration_s)]
    if spread:
        url = stack.ws_url(COUNTER_PATH + names[0].rsplit("-", 1)[0] + "-")
        extra += ["--spread", str(len(names))]
    else:
        url = stack.ws_url(COUNTER_PATH + names[0])
    with load_clients(
        "count", url, connections, config.clients, log_dir, extra, numbered=spread
    ) as clients:
        cpu_before = {role: cpu_seconds(child.pid) for role, child in stack.roles().items()}
        start_loops(clients)
        results = collect_results(clients, config.warmup_s + config.duration_s + RESULT_GRACE_S)
        cpu_after = {role: cpu_seconds(child.pid) for role, child in stack.roles().items()}
    figures = merge_results(results, url)
    answered = sum(int(result["answered"]) for result in results)
    cpu_us = {
        role: (cpu_after[role] - cpu_before[role]) * 1e6 / max(answered, 1) for role in cpu_after
    }
    stored = asyncio.run(_read_counters(str(stack.state.info["address"]), names))
    # Every connection's open incremented its object once (on_connect), before the loop.
    return CountFigures(
        turns_per_s=figures.msgs_per_s,
        p50_ms=figures.p50_ms,
        p99_ms=figures.p99_ms,
        answered=answered,
        counted=stored - connections,
        objects=len(names),
        cpu_us_per_turn=cpu_us,
    )


async def _read_counters(address: str, names: list[str]) -> int:
    """The sum of the counters ``names``, as the state service holds them (committed)."""
    from wsgate.worker.state_client import StateClient

    slots = asyncio.Semaphore(READ_CONCURRENCY)
    async with StateClient(address, timeout_s=30) as client:

        async def one(name: str) -> int:
            async with slots:
                value = await client.storage(COUNTER_NAMESPACE, name).get(COUNTER_KEY, 0)
            assert isinstance(value, int), f"counter {name} holds {value!r}"
            return value

        return sum(await asyncio.gather(*(one(name) for name in names)))
