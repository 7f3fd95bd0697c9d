"""The gateway's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from wsgate.fastmetrics import LATENCY_BUCKETS, FastMetrics

#: The kinds of subject the gateway takes messages on (the ``subject`` label of ``garbage``):
#: its command subject, its per-event ack subjects, its acks subject, and the reply inbox
#: of its connect requests.
GARBAGE_SUBJECTS = ("command", "ack", "acks", "connect_reply")


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
            "is gone), write_failed, slow_consumer, stale (sent by a late copy of an event "
            "that was acknowledged already, or an ack of an event no longer waited for); "
            "unreadable or invalid envelopes are wsgate_gateway_garbage_total",
            ["reason"],
            registry=r,
        )
        self.garbage = Counter(
            "wsgate_gateway_garbage",
            "Messages from NATS dropped because they are not the envelope their subject "
            "carries or break its contract, by the kind of subject: command, ack, acks, "
            "connect_reply",
            ["subject"],
            registry=r,
        )
        for subject in GARBAGE_SUBJECTS:
            self.garbage.labels(subject)  # every kind shows, at 0, before the first
        self.closes = Counter(
            "wsgate_gateway_closes",
            "Connections ended, by who started it",
            ["initiator"],
            registry=r,
        )
