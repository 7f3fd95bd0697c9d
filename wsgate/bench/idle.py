"""``wsgate bench idle``: the gateway's memory per idle WebSocket connection.

Starts a stack, pays the first connection's one-time costs, reads the gateway's resident
set size, opens ``connections`` idle connections to ``/echo`` from load-generator
processes, waits until every one is open and the size has settled, and reads it again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wsgate.bench.config import ECHO_PATH, IdleBenchConfig
from wsgate.bench.processes import (
    BenchError,
    check_fd_budget,
    load_clients,
    nofile_limits,
    prime,
    running_stack,
    settled_rss_kib,
)
from wsgate.errors import WsgateError

log = logging.getLogger("wsgate.bench")


@dataclass(frozen=True)
class IdleReport:
    """The gateway's RSS before and after, and what one connection costs."""

    connections: int
    gateway_rss_before_kib: int
    gateway_rss_after_kib: int
    gateway_nofile_soft: int | None

    @property
    def kib_per_connection(self) -> float:
        """(after - before) / connections."""
        return (self.gateway_rss_after_kib - self.gateway_rss_before_kib) / self.connections

    def to_json(self) -> dict[str, object]:
        """The object ``--json`` prints."""
        return {
            "connections": self.connections,
            "gateway_rss_before_kib": self.gateway_rss_before_kib,
            "gateway_rss_after_kib": self.gateway_rss_after_kib,
            "kib_per_connection": round(self.kib_per_connection, 3),
        }

    def render(self) -> str:
        """A few lines for people."""
        soft = self.gateway_nofile_soft
        return "\n".join(
            [
                f"wsgate bench idle: {self.connections} idle connections to {ECHO_PATH}",
                f"gateway RSS before: {self.gateway_rss_before_kib} KiB, "
                f"after: {self.gateway_rss_after_kib} KiB",
                f"per idle connection: {self.kib_per_connection:.2f} KiB",
                f"gateway soft RLIMIT_NOFILE: {soft if soft is not None else 'unlimited'}",
            ]
        )


def run_idle(config: IdleBenchConfig) -> IdleReport:
    """Measure; raises BenchError (the run's logs are then kept, the message says where),
    among others when the gateway's descriptor limit is too low for ``connections``."""
    log_dir = Path(tempfile.mkdtemp(prefix="wsgate-bench-idle-"))
    try:
        with running_stack(log_dir) as stack:
            gateway = stack.gateway
            check_fd_budget(gateway, config.connections)
            soft, _ = nofile_limits(gateway.pid)
            url = stack.ws_url(ECHO_PATH)
            prime(url)
            before = settled_rss_kib(gateway.pid)
            log.info(
                "gateway RSS before: %d KiB; opening %d connections", before, config.connections
            )
            with load_clients("idle", url, config.connections, config.clients, log_dir):
                after = settled_rss_kib(gateway.pid)
            log.info("gateway RSS with %d open: %d KiB", config.connections, after)
    except WsgateError as exc:
        raise BenchError(f"{exc} (logs kept in {log_dir})") from exc
    shutil.rmtree(log_dir, ignore_errors=True)
    return IdleReport(
        connections=config.connections,
        gateway_rss_before_kib=before,
        gateway_rss_after_kib=after,
        gateway_nofile_soft=soft,
    )
