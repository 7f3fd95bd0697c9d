"""The worker's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from wsgate.fastmetrics import LATENCY_BUCKETS, FastMetrics


class WorkerMetrics:
    """Everything the worker counts. Labels are fixed sets, never user strings."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connects = Counter(
            "wsgate_worker_connects", "Connect decisions, by outcome", ["outcome"], registry=r
        )
        self.redelivered = Counter(
            "wsgate_worker_events_redelivered", "Events that arrived marked redelivered", registry=r
        )
        self.handler_errors = Counter(
            "wsgate_worker_handler_errors", "Handlers that raised", registry=r
        )
        self.garbage = Counter("wsgate_worker_garbage", "Unreadable envelopes dropped", registry=r)
        self.gate_waits = Counter(
            "wsgate_worker_output_gate_waits",
            "Handler runs whose output had to wait at the gate for storage writes",
            registry=r,
        )
        fast = FastMetrics(r)  # updated per event: no locks
        self.message_events = fast.counter("wsgate_worker_message_events", "Message events handled")
        self.closed_events = fast.counter("wsgate_worker_closed_events", "Close events handled")
        self.handler_seconds = fast.histogram(
            "wsgate_worker_handler_seconds", "Time spent in one handler call", LATENCY_BUCKETS
        )
        self.in_flight = fast.gauge("wsgate_worker_in_flight", "Requests being handled now")
        self.commands = fast.counter("wsgate_worker_commands", "Gateway commands published")
