"""``wsgate bench idle``: the gateway's memory per idle WebSocket connection, beside the
plain aiohttp baseline's (:mod:`wsgate.bench.baseline`) measured the same way in the same
run.

For each target in turn: start it, pay the first connection's one-time costs, read the
server's resident set size, open ``connections`` idle connections to ``/echo`` from
load-generator processes, wait until every one is open and the size has settled, and read
it again. The CPU other processes use meanwhile is measured too (:mod:`.machine`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wsgate.bench.config import ECHO_PATH, IdleBenchConfig
from wsgate.bench.machine import OtherLoadMeter, warn_if_busy
from wsgate.bench.processes import (
    BenchError,
    check_fd_budget,
    load_clients,
    nofile_limits,
    prime,
    running_baseline,
    running_stack,
    settled_rss_kib,
    ws_url,
)
from wsgate.errors import WsgateError
from wsgate.procs import Child

log = logging.getLogger("wsgate.bench")


@dataclass(frozen=True)
class IdleReport:
    """The gateway's and the baseline's RSS before and after, and what one connection
    costs each."""

    connections: int
    gateway_rss_before_kib: int
    gateway_rss_after_kib: int
    gateway_nofile_soft: int | None
    baseline_rss_before_kib: int
    baseline_rss_after_kib: int
    #: The most CPU other processes used during either measurement, in cores and as a
    #: share of the machine.
    other_cores: float = 0.0
    other_share: float = 0.0

    @property
    def kib_per_connection(self) -> float:
        """The gateway's (after - before) / connections."""
        return (self.gateway_rss_after_kib - self.gateway_rss_before_kib) / self.connections

    @property
    def baseline_kib_per_connection(self) -> float:
        """The baseline's (after - before) / connections."""
        return (self.baseline_rss_after_kib - self.baseline_rss_before_kib) / self.connections

    @property
    def ratio(self) -> float:
        """The gateway's KiB per connection over the baseline's."""
        return self.kib_per_connection / self.baseline_kib_per_connection

    def to_json(self) -> dict[str, object]:
        """The object ``--json`` prints."""
        return {
            "connections": self.connections,
            "gateway_rss_before_kib": self.gateway_rss_before_kib,
            "gateway_rss_after_kib": self.gateway_rss_after_kib,
            "kib_per_connection": round(self.kib_per_connection, 3),
            "baseline_rss_before_kib": self.baseline_rss_before_kib,
            "baseline_rss_after_kib": self.baseline_rss_after_kib,
            "baseline_kib_per_connection": round(self.baseline_kib_per_connection, 3),
            "ratio": round(self.ratio, 3),
            "other_cpu_share": round(self.other_share, 3),
        }

    def render(self) -> str:
        """A few lines for people."""
        soft = self.gateway_nofile_soft
        return "\n".join(
            [
                f"wsgate bench idle: {self.connections} idle connections to {ECHO_PATH}",
                f"gateway RSS before: {self.gateway_rss_before_kib} KiB, "
                f"after: {self.gateway_rss_after_kib} KiB",
                f"baseline RSS before: {self.baseline_rss_before_kib} KiB, "
                f"after: {self.baseline_rss_after_kib} KiB",
                f"per idle connection: gateway {self.kib_per_connection:.2f} KiB, "
                f"baseline {self.baseline_kib_per_connection:.2f} KiB, "
                f"ratio {self.ratio:.2f}",
                f"gateway soft RLIMIT_NOFILE: {soft if soft is not None else 'unlimited'}",
                f"other processes used {100 * self.other_share:.0f}% of the CPU "
                f"({self.other_cores:.2f} core) at most",
            ]
        )


def run_idle(config: IdleBenchConfig) -> IdleReport:
    """Measure the gateway, then the baseline; raises BenchError (the run's logs are then
    kept, the message says where), among others when a server's descriptor limit is too
    low for ``connections``."""
    log_dir = Path(tempfile.mkdtemp(prefix="wsgate-bench-idle-"))
    meter = OtherLoadMeter()
    try:
        with running_stack(log_dir / "full") as stack:
            gateway = stack.gateway
            soft, _ = nofile_limits(gateway.pid)
            meter.start()
            before, after = measure(gateway, stack.ws_url(ECHO_PATH), config, log_dir / "full")
            full_load = meter.stop()
        warn_if_busy(full_load, "the gateway's measurement")
        with running_baseline(log_dir / "baseline") as baseline:
            meter.start()
            base_before, base_after = measure(
                baseline, ws_url(baseline, ECHO_PATH), config, log_dir / "baseline"
            )
            base_load = meter.stop()
        warn_if_busy(base_load, "the baseline's measurement")
    except WsgateError as exc:
        raise BenchError(f"{exc} (logs kept in {log_dir})") from exc
    shutil.rmtree(log_dir, ignore_errors=True)
    busiest = max(full_load, base_load, key=lambda load: load.share)
    return IdleReport(
        connections=config.connections,
        gateway_rss_before_kib=before,
        gateway_rss_after_kib=after,
        gateway_nofile_soft=soft,
        baseline_rss_before_kib=base_before,
        baseline_rss_after_kib=base_after,
        other_cores=busiest.cores,
        other_share=busiest.share,
    )


def measure(server: Child, url: str, config: IdleBenchConfig, log_dir: Path) -> tuple[int, int]:
    """``server``'s settled RSS in KiB before and with ``config.connections`` idle
    connections to ``url`` (after one echo round trip, so that one-time costs are paid
    first). Raises BenchError if its descriptor limit is too low."""
    check_fd_budget(server, config.connections)
    prime(url)
    before = settled_rss_kib(server.pid)
    log.info(
        "%s RSS before: %d KiB; opening %d connections", server.name, before, config.connections
    )
    with load_clients("idle", url, config.connections, config.clients, log_dir):
        after = settled_rss_kib(server.pid)
    log.info("%s RSS with %d open: %d KiB", server.name, config.connections, after)
    return before, after
