"""The gateway's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from wsgate.fastmetrics import LATENCY_BUCKETS, FastMetrics


class GatewayMetrics:
    """Everything the gateway counts. Labels are fixed sets, never user strings."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections_open = Gauge(
            "wsgate_gateway_connections_open", "WebSocket connections open now", registry=r
        )
        self.connections = Counter(
            "wsgate_gateway_connections", "WebSocket connections accepted", registry=r
        )
        self.upgrades_refused = Counter(
            "wsgate_gateway_upgrades_refused",
            "Upgrade requests answered without a WebSocket, by reason",
            ["reason"],
            registry=r,
        )
        fast = FastMetrics(r)  # updated per message: no locks
        self.messages_in = fast.counter(
            "wsgate_gateway_messages_in", "Messages received from clients"
        )
        self.messages_out = fast.counter(
            "wsgate_gateway_messages_out", "Messages queued to clients"
        )
        self.auto_responses = Counter(
            "wsgate_gateway_auto_responses", "Messages answered by the gateway itself", registry=r
        )
        self.event_round_trip = fast.histogram(
            "wsgate_gateway_event_round_trip_seconds",
            "From publishing an event to its final acknowledgement",
            LATENCY_BUCKETS,
        )
        self.redeliveries = Counter(
            "wsgate_gateway_redeliveries", "Events published again (same sequence)", registry=r
        )
        self.undeliverable = Counter(
            "wsgate_gateway_events_undeliverable",
            "Events given up after the delivery timeout",
            registry=r,
        )
        self.drops = Counter(
            "wsgate_gateway_drops",
            "Things dropped, by reason: unknown_connection (a command for a connection that "
            "is gone), garbage (an unreadable envelope), write_failed, slow_consumer, stale "
            "(sent by a late copy of an event that was acknowledged already)",
            ["reason"],
            registry=r,
        )
        self.nats_permission_violations = Counter(
            "wsgate_gateway_nats_permission_violations",
            "Publishes and subscriptions NATS refused this gateway's identity (a gap in its "
            "permissions, or the process acting beyond its role)",
            registry=r,
        )
        self.closes = Counter(
            "wsgate_gateway_closes",
            "Connections ended, by who started it",
            ["initiator"],
            registry=r,
        )
