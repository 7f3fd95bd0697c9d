"""``wsgate bench echo``: messages per second and round-trip latency through the full
path (client → gateway → NATS → worker → NATS → gateway → client), beside a plain aiohttp
echo server (the baseline) measured the same way in the same run.

Load: ``connections`` WebSockets split over ``clients`` load-generator processes, each a
closed loop (send one message, wait for its echo, send the next). Nothing is counted
during the warm-up; then every round trip that completes within ``duration_s`` is.

Each round measures both targets, one right after the other, so the ratios of one round
(msgs/s and p99, full over baseline) compare two measurements made under about the same
conditions; the report gives their medians beside the median rounds' figures. The CPU other
processes use during each measurement is measured too (:mod:`.machine`).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsgate.bench.config import ECHO_PATH, EchoBenchConfig
from wsgate.bench.histogram import LatencyHistogram
from wsgate.bench.machine import OtherLoad, OtherLoadMeter, warn_if_busy
from wsgate.bench.processes import (
    BenchError,
    collect_results,
    load_clients,
    running_baseline,
    running_stack,
    start_loops,
    ws_url,
)
from wsgate.errors import WsgateError

log = logging.getLogger("wsgate.bench")

#: Extra time, beyond warm-up and window, for the clients to report.
RESULT_GRACE_S = 30.0


@dataclass(frozen=True)
class EchoFigures:
    """What one target sustained."""

    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    round_trips: int
    errors: int
    #: CPU the load generators used, in cores (their CPU time over their run time): a
    #: client process near 1.0 would be a bottleneck.
    client_cores: float

    def to_json(self) -> dict[str, float]:
        """The figures ``--json`` prints."""
        return {
            "msgs_per_s": round(self.msgs_per_s, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
        }


@dataclass(frozen=True)
class EchoRound:
    """Both targets measured in one round, one right after the other."""

    full: EchoFigures
    baseline: EchoFigures
    #: The CPU other processes used while each was measured.
    full_load: OtherLoad
    baseline_load: OtherLoad

    @property
    def ratio(self) -> float:
        """Full path msgs/s over baseline msgs/s in this round."""
        return self.full.msgs_per_s / self.baseline.msgs_per_s

    @property
    def p99_ratio(self) -> float:
        """Full path p99 over baseline p99 in this round."""
        return self.full.p99_ms / self.baseline.p99_ms

    def to_json(self) -> dict[str, float]:
        """The round's ratios and how busy the rest of the machine was."""
        return {
            "ratio": round(self.ratio, 4),
            "p99_ratio": round(self.p99_ratio, 3),
            "other_cpu_share": round(max(self.full_load.share, self.baseline_load.share), 3),
        }


@dataclass(frozen=True)
class EchoReport:
    """Both measurements of one run: each target's median round, and every round's
    ratios."""

    config: EchoBenchConfig
    full: EchoFigures
    baseline: EchoFigures
    rounds: tuple[EchoRound, ...] = ()

    @property
    def ratio(self) -> float:
        """The median rounds' full path msgs/s over baseline msgs/s (each target's median
        round, chosen apart)."""
        return self.full.msgs_per_s / self.baseline.msgs_per_s

    @property
    def p99_ratio(self) -> float:
        """The median rounds' full path p99 over baseline p99."""
        return self.full.p99_ms / self.baseline.p99_ms

    @property
    def round_ratio(self) -> float:
        """The median of the per-round msgs/s ratios (``ratio`` without rounds)."""
        return statistics.median(r.ratio for r in self.rounds) if self.rounds else self.ratio

    @property
    def round_p99_ratio(self) -> float:
        """The median of the per-round p99 ratios (``p99_ratio`` without rounds)."""
        if not self.rounds:
            return self.p99_ratio
        return statistics.median(r.p99_ratio for r in self.rounds)

    @property
    def other_share(self) -> float:
        """The most of the machine's CPU other processes used during any measurement."""
        loads = [load for r in self.rounds for load in (r.full_load, r.baseline_load)]
        return max((load.share for load in loads), default=0.0)

    def to_json(self) -> dict[str, object]:
        """``{"full": {...}, "baseline": {...}, "ratio", "p99_ratio", "round_ratio",
        "round_p99_ratio", "rounds": [{"ratio", "p99_ratio", "other_cpu_share"}, ...],
        "other_cpu_share"}``."""
        return {
            "full": self.full.to_json(),
            "baseline": self.baseline.to_json(),
            "ratio": round(self.ratio, 4),
            "p99_ratio": round(self.p99_ratio, 3),
            "round_ratio": round(self.round_ratio, 4),
            "round_p99_ratio": round(self.round_p99_ratio, 3),
            "rounds": [r.to_json() for r in self.rounds],
            "other_cpu_share": round(self.other_share, 3),
        }

    def render(self) -> str:
        """A small table for people."""
        c = self.config
        lines = [
            f"wsgate bench echo: {c.connections} connections, {c.size_bytes}-byte messages, "
            f"{c.duration_s:g} s after {c.warmup_s:g} s warm-up, {c.clients} client process(es), "
            f"median of {c.rounds} round(s)",
            f"{'':10} {'msgs/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'client CPU':>11}",
        ]
        for name, f in (("full path", self.full), ("baseline", self.baseline)):
            lines.append(
                f"{name:10} {f.msgs_per_s:10.0f} {f.p50_ms:8.2f} {f.p99_ms:8.2f} {f.errors:7d} "
                f"{f.client_cores:6.2f} core"
            )
        lines.append(
            f"ratio full/baseline, median rounds: msgs/s {self.ratio:.3f}, p99 {self.p99_ratio:.2f}"
        )
        per_round = ", ".join(f"{r.ratio:.3f}" for r in self.rounds)
        per_round_p99 = ", ".join(f"{r.p99_ratio:.2f}" for r in self.rounds)
        lines.append(
            f"ratio full/baseline, median of rounds: msgs/s {self.round_ratio:.3f} "
            f"({per_round}), p99 {self.round_p99_ratio:.2f} ({per_round_p99})"
        )
        lines.append(
            f"other processes used {100 * self.other_share:.0f}% of the CPU at most "
            "during a measurement"
        )
        return "\n".join(lines)


def run_echo(config: EchoBenchConfig) -> EchoReport:
    """Measure the full path, then the baseline, ``config.rounds`` times, each with fresh
    processes; report the median round of each (by msgs/s) and the median of the rounds'
    ratios. Raises BenchError (the logs of the run are then kept in a temporary directory
    named in the message)."""
    log_dir = Path(tempfile.mkdtemp(prefix="wsgate-bench-echo-"))
    rounds: list[EchoRound] = []
    meter = OtherLoadMeter()
    try:
        for n in range(config.rounds):
            round_dir = log_dir / f"round{n}"
            with running_stack(round_dir / "full") as stack:
                meter.start()
                full = measure(stack.ws_url(ECHO_PATH), config, round_dir / "full")
                full_load = meter.stop()
            warn_if_busy(full_load, f"round {n + 1}'s full path")
            log.info(
                "round %d, full path: %.0f msgs/s, p50 %.2f ms, p99 %.2f ms (clients: %.2f core)",
                n + 1, full.msgs_per_s, full.p50_ms, full.p99_ms, full.client_cores,
            )  # fmt: skip
            with running_baseline(round_dir / "baseline") as baseline:
                meter.start()
                base = measure(ws_url(baseline, ECHO_PATH), config, round_dir / "baseline")
                base_load = meter.stop()
            warn_if_busy(base_load, f"round {n + 1}'s baseline")
            log.info(
                "round %d, baseline: %.0f msgs/s, p50 %.2f ms, p99 %.2f ms (clients: %.2f core)",
                n + 1, base.msgs_per_s, base.p50_ms, base.p99_ms, base.client_cores,
            )  # fmt: skip
            rounds.append(EchoRound(full, base, full_load, base_load))
            log.info(
                "round %d: ratio %.3f, p99 ratio %.2f", n + 1, rounds[-1].ratio,
                rounds[-1].p99_ratio,
            )  # fmt: skip
    except WsgateError as exc:
        raise BenchError(f"{exc} (logs kept in {log_dir})") from exc
    shutil.rmtree(log_dir, ignore_errors=True)
    return EchoReport(
        config=config,
        full=_median_round([r.full for r in rounds]),
        baseline=_median_round([r.baseline for r in rounds]),
        rounds=tuple(rounds),
    )


def _median_round(rounds: list[EchoFigures]) -> EchoFigures:
    """The round with the median msgs/s (the lower middle one for an even count)."""
    ordered = sorted(rounds, key=lambda figures: figures.msgs_per_s)
    return ordered[(len(ordered) - 1) // 2]


def measure(url: str, config: EchoBenchConfig, log_dir: Path) -> EchoFigures:
    """Run the closed loops against ``url`` and merge the clients' results."""
    extra = [
        "--size", str(config.size_bytes),
        "--warmup-s", str(config.warmup_s),
        "--duration-s", str(config.duration_s),
    ]  # fmt: skip
    with load_clients("echo", url, config.connections, config.clients, log_dir, extra) as clients:
        start_loops(clients)
        timeout_s = config.warmup_s + config.duration_s + RESULT_GRACE_S
        results = collect_results(clients, timeout_s)
    return merge_results(results, url)


def merge_results(results: list[dict[str, Any]], url: str) -> EchoFigures:
    """Add up the clients' counts and merge their histograms. Raises BenchError if no
    round trip was measured."""
    histogram = LatencyHistogram()
    rate = 0.0
    errors = 0
    cores = 0.0
    for result in results:
        try:
            histogram.merge(LatencyHistogram.from_json(result["histogram"]))
            rate += int(result["count"]) / float(result["window_s"])
            errors += int(result["errors"])
            cores += float(result["cpu_s"]) / max(float(result["run_s"]), 1e-9)
        except (KeyError, TypeError, ValueError) as exc:
            raise BenchError(f"malformed client result: {exc!r}") from exc
    if errors:
        log.warning("%s: %d connection(s) failed or stalled during the run", url, errors)
    if not histogram.total:
        raise BenchError(f"no round trip to {url} completed in the measurement window")
    return EchoFigures(
        msgs_per_s=rate,
        p50_ms=histogram.percentile_ms(50),
        p99_ms=histogram.percentile_ms(99),
        round_trips=histogram.total,
        errors=errors,
        client_cores=cores,
    )
