"""The gateway's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from wsgate.fastmetrics import LATENCY_BUCKETS, FastMetrics

#: The kinds of subject the gateway takes messages on (the ``subject`` label of ``garbage``):
#: its command subject (final acks and commands), its per-event ack subjects (progress,
#: retry), and the reply inbox of its connect requests.
GARBAGE_SUBJECTS = ("command", "ack", "connect_reply")

#: The gateway's supervised background tasks (the ``task`` label of ``background_crashes``).
BACKGROUND_TASKS = ("delivery_sweep", "presence", "tls_watch")


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
        self.http_requests = Counter(
            "wsgate_gateway_http_requests",
            "Plain HTTP requests (no upgrade) answered, by the status's class (2xx...)",
            ["status"],
            registry=r,
        )
        self.upgrades_refused = Counter(
            "wsgate_gateway_upgrades_refused",
            "Upgrade requests answered without a WebSocket, by reason",
            ["reason"],
            registry=r,
        )
        # The edge (gateway/listener.py): every label is set up front, so each shows 0.
        self.handshake_timeouts = Counter(
            "wsgate_gateway_handshake_timeouts",
            "Connections closed at the handshake deadline, by stage: proxy (in the PROXY "
            "header), tls (in the TLS handshake), headers (in the request headers: 408)",
            ["stage"],
            registry=r,
        )
        self.ip_limit_refusals = Counter(
            "wsgate_gateway_ip_limit_refusals",
            "Connections over their client address's limit, by stage: accept (closed), "
            "upgrade (429: the client named by a trusted proxy's X-Forwarded-For)",
            ["stage"],
            registry=r,
        )
        self.proxy_protocol_errors = Counter(
            "wsgate_gateway_proxy_protocol_errors",
            "Connections from a trusted proxy closed for a missing or malformed PROXY header",
            registry=r,
        )
        self.tls_handshake_errors = Counter(
            "wsgate_gateway_tls_handshake_errors",
            "TLS handshakes that failed other than by the deadline",
            registry=r,
        )
        self.tls_reloads = Counter(
            "wsgate_gateway_tls_reloads",
            "Reloads of the TLS certificate and key (SIGHUP, file change), by result: ok, "
            "failed (the previous certificate stays in use)",
            ["result"],
            registry=r,
        )
        for stage in ("proxy", "tls", "headers"):
            self.handshake_timeouts.labels(stage)
        for stage in ("accept", "upgrade"):
            self.ip_limit_refusals.labels(stage)
        for result in ("ok", "failed"):
            self.tls_reloads.labels(result)
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
        self.rate_limited = Counter(
            "wsgate_gateway_rate_limited",
            "Connections closed with 1008 for sending messages faster than WSGATE_MESSAGE_RATE "
            "allows (counted once each, at the first message over the limit)",
            registry=r,
        )
        self.outbound_bytes = Gauge(
            "wsgate_gateway_outbound_bytes",
            "Bytes queued to all clients and not yet written (against "
            "WSGATE_OUTBOUND_BUDGET_BYTES)",
            registry=r,
        )
        self.budget_shed = Counter(
            "wsgate_gateway_budget_shed",
            "Connections closed with 1013 because the outbound budget was exceeded (those "
            "with the most bytes queued first)",
            registry=r,
        )
        self.nats_permission_violations = Counter(
            "wsgate_gateway_nats_permission_violations",
            "Publishes and subscriptions NATS refused this gateway's identity (a gap in its "
            "permissions, or the process acting beyond its role)",
            registry=r,
        )
        self.garbage = Counter(
            "wsgate_gateway_garbage",
            "Messages from NATS dropped because they are not the envelope their subject "
            "carries or break its contract, by the kind of subject: command (final acks and "
            "commands), ack (progress and retry), connect_reply",
            ["subject"],
            registry=r,
        )
        for subject in GARBAGE_SUBJECTS:
            self.garbage.labels(subject)  # every kind shows, at 0, before the first
        self.background_crashes = Counter(
            "wsgate_gateway_background_crashes",
            "Background tasks that ended with an error, by task (each turns /readyz to 503 "
            "for good: restart the gateway)",
            ["task"],
            registry=r,
        )
        for task in BACKGROUND_TASKS:
            self.background_crashes.labels(task)
        self.closes = Counter(
            "wsgate_gateway_closes",
            "Connections ended, by who started it",
            ["initiator"],
            registry=r,
        )
