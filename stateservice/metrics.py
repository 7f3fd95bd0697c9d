"""The state service's Prometheus metrics, in a registry of its own.

Storage figures are read from :class:`~wsgate.stateservice.storage.CommitStats` at scrape time,
so the storage thread never touches a metric: ``writes / commits`` is the group commit's
batching, the figure that says how many writers one fsync served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from wsgate.stateservice.locks import ObjectLocks
from wsgate.stateservice.ownership import Ownership
from wsgate.stateservice.presence import PresenceStats
from wsgate.stateservice.quotas import Quotas
from wsgate.stateservice.storage import Storage

#: The kinds of subject a state service takes messages on (the ``subject`` label of
#: ``wsgate_state_garbage_total``): gateways' presence, the replicas' announcements (over
#: PostgreSQL), and the reply inbox of its alarm events.
GARBAGE_SUBJECTS = ("presence", "replicas", "alarm_reply")

#: The state service's supervised background tasks (the ``task`` label of
#: ``wsgate_state_background_crashes_total``).
BACKGROUND_TASKS = (
    "alarm_scheduler",
    "presence_sweep",
    "departed_pruner",
    "turn_pruner",
    "idempotency_pruner",
    "replica_watch",
)


class _StorageCollector(Collector):
    def __init__(
        self,
        storage: Storage,
        locks: ObjectLocks,
        presence: Callable[[], PresenceStats | None],
        leases: Callable[[], int],
        ownership: Callable[[], Ownership | None],
        permission_violations: Callable[[], int],
        garbage: Callable[[], Mapping[str, int]],
        quotas: Quotas | None,
    ) -> None:
        self._ownership = ownership
        self._permission_violations = permission_violations
        self._garbage = garbage
        self._quotas = quotas
        self._storage = storage
        self._locks = locks
        self._presence = presence
        self._leases = leases

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._storage.stats
        yield CounterMetricFamily(
            "wsgate_state_commits",
            "Database commits, one per batch (one fsync each); rate() is commits/s",
            value=stats.commits,
        )
        yield CounterMetricFamily(
            "wsgate_state_writes", "Write operations committed", value=stats.writes
        )
        yield CounterMetricFamily(
            "wsgate_state_operations", "Operations (reads and writes) run", value=stats.operations
        )
        yield GaugeMetricFamily(
            "wsgate_state_objects_held",
            "Objects held by a transaction or waited for",
            value=self._locks.held(),
        )
        yield GaugeMetricFamily(
            "wsgate_state_leases",
            "Objects whose activation a worker holds (or held, until another asks)",
            value=self._leases(),
        )
        yield CounterMetricFamily(
            "wsgate_state_batch_retries",
            "PostgreSQL batches run again after a deadlock or serialization failure",
            value=stats.retries,
        )
        yield CounterMetricFamily(
            "wsgate_state_nats_permission_violations",
            "Publishes and subscriptions NATS refused this replica's identity (a gap in its "
            "permissions, or the process acting beyond its role)",
            value=self._permission_violations(),
        )
        quotas = self._quotas
        if quotas is not None:
            refusals = CounterMetricFamily(
                "wsgate_state_quota_refusals",
                "Calls or writes refused by a quota: object_name, keys, bytes, members, or "
                "disk (below WSGATE_MIN_FREE_DISK_BYTES, or the database's disk full)",
                labels=["quota"],
            )
            for label, count in sorted(quotas.refusals.items()):
                refusals.add_metric([label], count)
            yield refusals
            if quotas.disk is not None:
                try:
                    free = quotas.disk.free_bytes()
                except OSError:
                    free = -1
                yield GaugeMetricFamily(
                    "wsgate_state_disk_free_bytes",
                    "Free space on the SQLite file's filesystem (-1: cannot be measured); "
                    "writes are refused below wsgate_state_disk_min_free_bytes",
                    value=free,
                )
                yield GaugeMetricFamily(
                    "wsgate_state_disk_min_free_bytes",
                    "The free space threshold (WSGATE_MIN_FREE_DISK_BYTES)",
                    value=quotas.disk.min_free_bytes,
                )
        ownership = self._ownership()
        if ownership is not None:
            yield GaugeMetricFamily(
                "wsgate_state_replicas",
                "State replicas alive on the bus, as this one sees them (itself included)",
                value=ownership.live(),
            )
            yield GaugeMetricFamily(
                "wsgate_state_objects",
                "Objects this replica served calls about in the last minute",
                value=ownership.served(),
            )
            yield CounterMetricFamily(
                "wsgate_state_not_owner",
                "Calls refused with NOT_OWNER: another replica owns their object",
                value=ownership.refused,
            )
        garbage = CounterMetricFamily(
            "wsgate_state_garbage",
            "Messages from NATS dropped because they are not the envelope their subject "
            "carries or break its contract, by the kind of subject: presence, replicas, "
            "alarm_reply",
            labels=["subject"],
        )
        counts = self._garbage()
        for subject in GARBAGE_SUBJECTS:
            garbage.add_metric([subject], counts.get(subject, 0))
        yield garbage
        presence = self._presence()
        if presence is not None:
            yield CounterMetricFamily(
                "wsgate_state_presence_announcements",
                "Gateway presence announcements heard",
                value=presence.announcements,
            )
            yield CounterMetricFamily(
                "wsgate_state_presence_garbage",
                "Unreadable gateway presence announcements dropped",
                value=presence.garbage,
            )
            yield CounterMetricFamily(
                "wsgate_state_presence_impostors",
                "Presence announcements dropped because they named another gateway than "
                "their subject's (a gateway speaking for another)",
                value=presence.impostors,
            )
            yield CounterMetricFamily(
                "wsgate_state_gateways_swept",
                "Gateways whose lease ended and whose members were removed",
                value=presence.gateways_swept,
            )
            yield CounterMetricFamily(
                "wsgate_state_members_swept",
                "Members removed because their gateway's lease ended",
                value=presence.members_swept,
            )
            yield CounterMetricFamily(
                "wsgate_state_sweep_failures",
                "Sweeps of a gateway's members that failed (retried)",
                value=presence.sweep_failures,
            )


def state_registry(
    storage: Storage,
    locks: ObjectLocks,
    presence: Callable[[], PresenceStats | None] = lambda: None,
    leases: Callable[[], int] = lambda: 0,
    ownership: Callable[[], Ownership | None] = lambda: None,
    permission_violations: Callable[[], int] = lambda: 0,
    garbage: Callable[[], Mapping[str, int]] = dict,
    quotas: Quotas | None = None,
) -> CollectorRegistry:
    """A registry exposing the storage's figures, the objects' leases, the membership
    leases' once ``presence()`` has them (the membership part exists only once the server
    started), and the garbage dropped, by kind of subject (``garbage()``)."""
    registry = CollectorRegistry()
    registry.register(
        _StorageCollector(
            storage, locks, presence, leases, ownership, permission_violations, garbage, quotas
        )
    )
    return registry
