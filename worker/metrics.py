"""The worker's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WorkerMetrics:
    """Everything the worker counts. Labels are fixed sets, never user strings."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connects = Counter(
            "wsgate_worker_connects", "Connect decisions, by outcome", ["outcome"], registry=r
        )
        self.events = Counter(
            "wsgate_worker_events", "Events handled, by kind", ["kind"], registry=r
        )
        self.redelivered = Counter(
            "wsgate_worker_events_redelivered", "Events that arrived marked redelivered", registry=r
        )
        self.handler_errors = Counter(
            "wsgate_worker_handler_errors", "Handlers that raised", registry=r
        )
        self.handler_seconds = Histogram(
            "wsgate_worker_handler_seconds",
            "Time spent in one handler call",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("wsgate_worker_in_flight", "Requests being handled now", registry=r)
        self.commands = Counter("wsgate_worker_commands", "Gateway commands published", registry=r)
        self.garbage = Counter("wsgate_worker_garbage", "Unreadable envelopes dropped", registry=r)
