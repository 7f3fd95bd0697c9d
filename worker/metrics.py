"""The worker's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from wsgate.fastmetrics import LATENCY_BUCKETS, FastMetrics
from wsgate.worker.errors import AuthFailure

#: The kinds of subject a worker takes messages on (the ``subject`` label of ``garbage``).
GARBAGE_SUBJECTS = ("connect", "events", "alarm", "replicas")

#: The worker's supervised background tasks (the ``task`` label of ``background_crashes``).
BACKGROUND_TASKS = ("progress_sweep", "activation_renew", "activation_evict", "replica_watch")


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
        self.garbage = Counter(
            "wsgate_worker_garbage",
            "Messages from NATS dropped because they are not the envelope their subject "
            "carries or break its contract, by the kind of subject: connect, events, alarm "
            "(the app's subjects and this worker's own alike), replicas",
            ["subject"],
            registry=r,
        )
        for subject in GARBAGE_SUBJECTS:
            self.garbage.labels(subject)  # every kind shows, at 0, before the first
        self.auth_failures = Counter(
            "wsgate_worker_auth_failures",
            "Connects refused with 401 by a route's authenticator or an Unauthorized that "
            "on_connect let through, by reason",
            ["reason"],
            registry=r,
        )
        for reason in AuthFailure:
            self.auth_failures.labels(reason.value)
        self.state_connect_failures = Counter(
            "wsgate_worker_state_connect_failures",
            "Times a channel to a state replica failed to connect (a refused TLS handshake, "
            "a closed port, ...; one outage counts once); the reason is in the log",
            registry=r,
        )
        self.impostors = Counter(
            "wsgate_worker_impostor_requests",
            "Connect requests and events dropped because their connection id, subject and "
            "reply subject do not all name the same gateway (a gateway speaking for another)",
            registry=r,
        )
        self.nats_permission_violations = Counter(
            "wsgate_worker_nats_permission_violations",
            "Publishes and subscriptions NATS refused this worker's identity (a gap in its "
            "permissions, or the process acting beyond its role)",
            registry=r,
        )
        self.gate_waits = Counter(
            "wsgate_worker_output_gate_waits",
            "Handler runs whose output had to wait at the gate for storage writes",
            registry=r,
        )
        # Durable objects' activations (see worker/activations.py).
        self.activations = Gauge(
            "wsgate_worker_activations", "Durable object activations held now", registry=r
        )
        self.activations_started = Counter(
            "wsgate_worker_activations_started",
            "Leases asked for, by answer: granted (an activation started here) or held "
            "(another worker has it: requests forwarded there)",
            ["outcome"],
            registry=r,
        )
        self.activations_fenced = Counter(
            "wsgate_worker_activations_fenced",
            "Activations stopped because their lease was another's (refused commit, lost renewal)",
            registry=r,
        )
        self.evictions = Counter(
            "wsgate_worker_activations_evicted",
            "Activations evicted (hibernation), by reason: idle or capacity",
            ["reason"],
            registry=r,
        )
        self.forwarded = Counter(
            "wsgate_worker_requests_forwarded",
            "Requests forwarded to the worker that holds their object",
            registry=r,
        )
        self.given_back = Counter(
            "wsgate_worker_requests_given_back",
            "Requests answered with 'try again' (object unreachable, worker draining)",
            registry=r,
        )
        self.turn_timeouts = Counter(
            "wsgate_worker_turn_timeouts", "Turns cancelled at the turn limit", registry=r
        )
        self.turn_replays = Counter(
            "wsgate_worker_turn_replays",
            "Redelivered requests answered from their committed turn's record, not run again",
            registry=r,
        )
        self.commit_calls = Counter(
            "wsgate_worker_commit_calls",
            "CommitTurns calls made (each serves many turns)",
            registry=r,
        )
        self.turns_committed = Counter(
            "wsgate_worker_turns_committed", "Turns committed", registry=r
        )
        self.quota_refusals = Counter(
            "wsgate_worker_quota_refusals",
            "What activations refused for the state service's quotas, by quota: keys and "
            "bytes (a handler's write raised), members (a connect answered 503), "
            "object_name (414), disk (a commit tried again for want of space)",
            ["quota"],
            registry=r,
        )
        self.intake_stalled = Gauge(
            "wsgate_worker_intake_stalled",
            "1 while the worker takes no requests although some wait (see /readyz)",
            registry=r,
        )
        self.background_crashes = Counter(
            "wsgate_worker_background_crashes",
            "Background tasks that ended with an error, by task (each turns /readyz to 503 "
            "for good: restart the worker)",
            ["task"],
            registry=r,
        )
        for task in BACKGROUND_TASKS:
            self.background_crashes.labels(task)
        fast = FastMetrics(r)  # updated per event: no locks
        self.message_events = fast.counter("wsgate_worker_message_events", "Message events handled")
        self.closed_events = fast.counter("wsgate_worker_closed_events", "Close events handled")
        self.handler_seconds = fast.histogram(
            "wsgate_worker_handler_seconds", "Time spent in one handler call", LATENCY_BUCKETS
        )
        self.in_flight = fast.gauge("wsgate_worker_in_flight", "Requests being handled now")
        self.commands = fast.counter("wsgate_worker_commands", "Gateway commands published")
        self.turns = fast.counter_family(
            "wsgate_worker_turns",
            "Turns run by activations, by kind and outcome (ok, failed)",
            ["kind", "outcome"],
        )
        self.storage_reads = fast.counter_family(
            "wsgate_worker_storage_reads",
            "Keys read by activations, by source: memory (their cache) or state (the service)",
            ["source"],
        )
