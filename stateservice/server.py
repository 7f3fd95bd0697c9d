"""The state service role: durable objects over grpc.aio, on the bus, backed by SQLite (one
replica) or PostgreSQL (N replicas, each serving the objects that rendezvous hashing over
the live replicas gives it: :mod:`wsgate.stateservice.ownership`, :mod:`wsgate.placement`).

One process serves four gRPC services (``wsgate.v1.State``, ``wsgate.v1.Membership``,
``wsgate.v1.Alarms``, ``wsgate.v1.Activations``), each built by its own part
(:mod:`wsgate.stateservice.component`), and the standard gRPC health service
(``grpc.health.v1.Health``), which reports SERVING for ``""`` and each service name while
the server accepts calls, and NOT_SERVING once it is closing; ``grpc_health_probe`` reads
it (with its TLS flags when the port speaks TLS; Kubernetes' own gRPC probes cannot).

The gRPC port is plaintext, TLS, or mTLS (a client certificate signed by
``WSGATE_TLS_CLIENT_CA`` required), as :mod:`wsgate.grpc_tls` builds it from the config. A
refused handshake never reaches Python: gRPC's core logs it on stderr ("Handshake failed
...") and no metric can count it here; the client side logs and counts its failures.

Calls with bad input are refused with INVALID_ARGUMENT, a readable details string, and an
ErrorInfo in the trailing metadata (see :mod:`wsgate.state_errors`). The limits are
checked here, at the service boundary (an activation checks them too, where a handler
writes, but the service is the authority).
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from nats.aio.client import Client as NatsClient
from prometheus_client import Counter

from wsgate.bus import connect_bus, drain_bus
from wsgate.config import StateConfig
from wsgate.errors import ConfigError
from wsgate.grpc_tls import ServerTls, add_port, server_tls
from wsgate.placement import Replica, ReplicaDirectory, ReplicaWatch
from wsgate.probes import ProbeServer
from wsgate.service import Service, ServicePhase
from wsgate.stateservice.activations import ActivationsComponent
from wsgate.stateservice.alarms import AlarmsComponent
from wsgate.stateservice.component import Component, StateContext
from wsgate.stateservice.idempotency import IdempotencyPruner
from wsgate.stateservice.kv_service import KeyValueComponent
from wsgate.stateservice.leases import ObjectLeases
from wsgate.stateservice.locks import ObjectLocks
from wsgate.stateservice.membership import MembershipComponent
from wsgate.stateservice.metrics import BACKGROUND_TASKS, state_registry
from wsgate.stateservice.ownership import Ownership
from wsgate.stateservice.presence import PresenceStats
from wsgate.stateservice.quotas import Quotas
from wsgate.stateservice.storage import PostgresStorage, SqliteStorage, Storage
from wsgate.stateservice.undecodable import RefuseUndecodable
from wsgate.supervision import Supervisor, Teardown
from wsgate.v1 import state_pb2 as pb

log = logging.getLogger(__name__)

#: How long a starting replica waits to hear the replicas already on the bus (each answers
#: a newcomer's announcement at once with its own) before it serves.
JOIN_SETTLE_S = 0.3

#: The largest request the server takes: a batch at every limit fits with room to spare.
MAX_REQUEST_BYTES = 32 * 1024 * 1024

#: The health service's names for the services (their full protobuf names).
STATE_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["State"].full_name
SERVICE_NAMES: tuple[str, ...] = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())


class StateServer(Service):
    """One state service process's server.

    Use ``async with StateServer(config) as server`` or call :meth:`start`, then
    :meth:`close`. ``close`` is idempotent; :meth:`wait_closed` returns once it finished.
    """

    def __init__(self, config: StateConfig) -> None:
        super().__init__()
        self.config = config
        self.storage: Storage = open_storage(config)
        self.locks = ObjectLocks()
        self.leases = ObjectLeases(self.storage, config.lease_s)
        #: Quotas on objects and the disk, shared by the parts; their refusals are counted.
        self.quotas = Quotas(config)
        registry = state_registry(
            self.storage,
            self.locks,
            self._presence_stats,
            lambda: len(self.leases.table),
            lambda: self.ownership,
            lambda: self.nats_permission_violations,
            self._garbage_counts,
            self.quotas,
        )
        crashes = Counter(
            "wsgate_state_background_crashes",
            "Background tasks that ended with an error, by task (each turns /readyz to 503 "
            "for good: restart the replica)",
            ["task"],
            registry=registry,
        )
        for task in BACKGROUND_TASKS:
            crashes.labels(task)
        #: The background loops; a crash turns /readyz to 503.
        self._supervisor = Supervisor(
            "state", on_crash=lambda task: crashes.labels(task).inc(), logger=log
        )
        #: What start() did, undone by close() (newest first).
        self._teardown = Teardown("state service", log)
        self._probes = ProbeServer(
            config.host,
            config.probe_port,
            is_ready=self._is_ready,
            registry=registry,
            not_ready_reason=self._not_ready_reason,
        )
        self.replica_id = config.replica_id or f"state-{uuid.uuid4().hex[:12]}"
        self.ownership: Ownership | None = None
        self._watch: ReplicaWatch | None = None
        self._membership: MembershipComponent | None = None
        self._alarms: AlarmsComponent | None = None
        self._components: list[Component] = []
        self._started: list[Component] = []
        self._nc: NatsClient | None = None
        self._server: Any = None  # grpc.aio.Server once started
        self._health: health_aio.HealthServicer | None = None
        self._port: int | None = None
        self._tls: ServerTls | None = None
        #: How long calls in flight may finish at close (close()'s ``grace_s``).
        self._grace_s = 5.0
        #: Publishes and subscriptions NATS refused this replica's identity.
        self.nats_permission_violations = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, connect to NATS, listen, and report SERVING.

        Call once. Raises OSError if the address cannot be bound (the port is taken),
        ``sqlite3.Error`` or OSError if the database cannot be opened, BusUnavailable if
        NATS cannot be reached; the server is then closed. ConfigError if a TLS file
        cannot be used (before anything is opened).
        """
        config = self.config
        self._tls = server_tls(config)
        if self._tls is not None and not self._tls.mutual:
            log.warning(
                "the gRPC port speaks TLS without client certificates: any client that "
                "reaches it is served; set --tls-client-ca (WSGATE_TLS_CLIENT_CA) for mTLS"
            )
        if config.postgres and not config.advertise and _is_wildcard(config.host):
            raise ConfigError(
                f"listening on {config.host}, this replica cannot tell the others where to "
                "reach it: set --advertise (WSGATE_STATE_ADVERTISE) to host:port, e.g. the "
                "pod's IP and the state port"
            )
        self._enter_running()
        # Each step registers its undo once done: close() undoes exactly what was started,
        # newest first; where a step's undo must come later than the start order gives,
        # it is registered earlier (the parts' close, after the gRPC server stopped).
        undo = self._teardown.push
        try:
            undo("probes", self._probes.close)  # also undoes a start that failed halfway
            await self._probes.start()
            await self.storage.start()
            # After the server: every handler has returned, so no write is left queued.
            undo("storage", self.storage.close)
            if not self.config.postgres:
                # Before listening: a holder that renews right after a restart keeps its
                # objects. (Over PostgreSQL leases are adopted from the table on demand:
                # the objects a replica serves change as replicas come and go.)
                await self.leases.load(time.monotonic())
            self._nc = await connect_bus(
                self.config,
                f"wsgate-state {self.replica_id}",
                role="state",
                on_permission_violation=self._permission_violation,
            )
            undo("nats", functools.partial(drain_bus, self._nc))
            undo("parts", self._close_components)
            # No SO_REUSEPORT (gRPC's default is on): a second state service started on the
            # same port must fail, not silently share the traffic.
            server = grpc.aio.server(
                # A request that does not parse is the caller's fault: INVALID_ARGUMENT,
                # not gRPC's own INTERNAL.
                interceptors=[RefuseUndecodable()],
                options=[
                    ("grpc.so_reuseport", 0),
                    # One put may carry 128 keys of 2 KiB and values of 128 KiB (~16.3 MiB).
                    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                    # gRPC cancels calls beyond ~1,000 waiting to be picked up; a worker
                    # alone may have 1,024 events in flight, each making calls.
                    ("grpc.server.max_pending_requests", 100_000),
                ],
            )
            self._server = server
            # Calls in flight finish for up to close()'s grace (then they are cancelled).
            undo("grpc server", lambda: server.stop(self._grace_s))
            target = f"{_host_for_address(self.config.host)}:{self.config.port}"
            try:
                self._port = add_port(server, target, self._tls)
            except RuntimeError as exc:
                raise OSError(f"state service cannot listen on {target}: {exc}") from exc
            ownership = await self._join_replicas()
            context = StateContext(
                self.config,
                self.storage,
                self.locks,
                self._nc,
                self.leases,
                ownership,
                quotas=self.quotas,
                spawn=self._supervisor.spawn,
            )
            self._membership = MembershipComponent(context)
            self._alarms = alarms = AlarmsComponent(context)
            self._components = [
                KeyValueComponent(context),
                self._membership,
                alarms,
                ActivationsComponent(
                    context,
                    on_alarm_set=alarms.scheduler.alarm_set,
                    on_member_joined=self._membership.presence.member_joined,
                ),
                IdempotencyPruner(context),
            ]
            health = health_aio.HealthServicer()
            self._health = health
            # First undone: NOT_SERVING, and the other replicas take this one's objects
            # over (the watch's undo, registered in _join_replicas).
            undo("health", health.enter_graceful_shutdown)
            for service in ("", *SERVICE_NAMES):
                await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            for component in self._components:
                component.register(server)
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            await server.start()
            for component in self._components:
                await component.start()
                self._started.append(component)
            for service in ("", *SERVICE_NAMES):
                await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self.close()
            raise
        log.info(
            "state replica %s listening on %s (%s), data in %s%s",
            self.replica_id,
            self.address,
            "plaintext" if self._tls is None else self._tls.describe(),
            self.storage.label,
            "" if self._watch is None else f", with {len(self._watch.live()) - 1} other(s)",
        )

    async def _join_replicas(self) -> Ownership:
        """This replica's ownership: everything (SQLite), or the objects rendezvous hashing
        gives it among the replicas on the bus (PostgreSQL). A replica announces itself and
        hears the others before it serves: each replica that hears a newcomer announces
        itself at once, so a round trip on the bus is enough."""
        own = Replica(self.replica_id, self.config.advertise or self.address)
        if not self.config.postgres:
            self.ownership = Ownership(own)
            return self.ownership
        ownership = Ownership(own)
        watch = ReplicaWatch(
            self._nc,
            self.config.prefix,
            ReplicaDirectory(own),
            timeout_s=self.config.replica_timeout_s,
            announce=True,
            on_change=self._replicas_changed,
        )
        ownership.watch = watch
        self.ownership = ownership
        self.leases.verify = True
        self._watch = watch
        await watch.start(self._supervisor.spawn)
        # Undone before the gRPC server stops: workers stop sending it new calls while
        # those in flight finish.
        self._teardown.push("replica watch", watch.close)
        assert self._nc is not None
        await self._nc.flush()
        await watch.settled(JOIN_SETTLE_S)
        return ownership

    def _replicas_changed(self, live: list[Replica]) -> None:
        ownership = self.ownership
        if ownership is None:
            return
        # Leases of objects that moved away: their new owner's table is the authority now
        # (it adopts them from the database), and ours would go stale.
        dropped = self.leases.table.forget_unless(ownership.owns)
        self.leases.replicas_changed()
        if dropped:
            log.info("%d lease(s) moved to other replicas", dropped)
        ownership.changed(live)

    def _permission_violation(self) -> None:
        self.nats_permission_violations += 1

    def _garbage_counts(self) -> dict[str, int]:
        """Messages from NATS dropped as garbage, by kind of subject (see metrics.py)."""
        presence = self._presence_stats()
        return {
            "presence": 0 if presence is None else presence.garbage,
            "replicas": 0 if self._watch is None else self._watch.garbage,
            "alarm_reply": 0 if self._alarms is None else self._alarms.scheduler.garbage,
        }

    def _presence_stats(self) -> PresenceStats | None:
        return None if self._membership is None else self._membership.presence.stats

    def _is_ready(self) -> bool:
        nc = self._nc
        return (
            self.phase is ServicePhase.RUNNING
            and self._server is not None
            and nc is not None
            and nc.is_connected
        )

    @property
    def probe_port(self) -> int:
        """The port of /healthz, /readyz and /metrics."""
        return self._probes.port

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0). Only after :meth:`start`."""
        if self._port is None:
            raise RuntimeError("state server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` actually bound, as
        :class:`~wsgate.worker.state_client.StateClient` takes."""
        return f"{_host_for_address(self.config.host)}:{self.port}"

    async def close(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish for up to
        ``grace_s`` seconds (then cancel them), stop the parts' background work, and close
        NATS and the database.

        Idempotent; a second caller waits for the first. A write cancelled by the deadline
        was not acknowledged, so its client sees an error, never a lost write.
        """
        if not await self._enter_closing():
            return
        self._grace_s = grace_s
        try:
            await self._teardown.unwind()
        finally:
            self._mark_closed()
            log.info("state service closed")

    async def _close_components(self) -> None:
        """Stop the parts' background work, newest first, each even if one failed."""
        for component in reversed(self._started):
            try:
                await component.close()
            except Exception:
                log.exception("closing %s failed", type(component).__name__)
        self._started.clear()

    def _not_ready_reason(self) -> str | None:
        # A low disk refuses writes: traffic is better sent to a replica with room.
        return self._supervisor.not_ready_reason() or self.quotas.not_ready_reason()


def open_storage(config: StateConfig) -> Storage:
    """The storage ``config`` names: PostgreSQL when it has a DSN, else the SQLite file."""
    if config.postgres:
        return PostgresStorage(config.dsn, migrate=config.migrates_at_start)
    return SqliteStorage(config.db_path, migrate=config.migrates_at_start)


def _is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def _host_for_address(host: str) -> str:
    # An IPv6 literal needs brackets before ":port".
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
