"""The state service role: durable objects over grpc.aio, backed by SQLite, on the bus.

One process serves four gRPC services (``wsgate.v1.State``, ``wsgate.v1.Membership``,
``wsgate.v1.Alarms``, ``wsgate.v1.Activations``), each built by its own part
(:mod:`stateservice.component`), and the standard gRPC health service
(``grpc.health.v1.Health``), which reports SERVING for ``""`` and each service name while
the server accepts calls, and NOT_SERVING once it is closing; Kubernetes' gRPC probes and
``grpc_health_probe`` read it.

Calls with bad input are refused with INVALID_ARGUMENT, a readable details string, and an
ErrorInfo in the trailing metadata (see :mod:`wsgate.state_errors`). The limits are
checked here, at the service boundary (an activation checks them too, where a handler
writes, but the service is the authority).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from nats.aio.client import Client as NatsClient

from stateservice.activations import ActivationsComponent
from stateservice.alarms import ALARMS_SCHEMA, AlarmsComponent
from stateservice.component import Component, StateContext
from stateservice.idempotency import IDEMPOTENCY_SCHEMA, IdempotencyPruner
from stateservice.kv_service import KeyValueComponent
from stateservice.leases import LEASES_SCHEMA, ObjectLeases
from stateservice.locks import ObjectLocks
from stateservice.membership import MEMBERSHIP_SCHEMA, MembershipComponent
from stateservice.metrics import state_registry
from stateservice.presence import PresenceStats
from stateservice.storage import SqliteStorage
from stateservice.turns import TURNS_SCHEMA
from wsgate.bus import connect_bus
from wsgate.config import StateConfig
from wsgate.probes import ProbeServer
from wsgate.service import Service, ServicePhase
from wsgate.v1 import state_pb2 as pb

log = logging.getLogger(__name__)

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
        self.storage = SqliteStorage(
            config.db_path,
            schemas=(
                IDEMPOTENCY_SCHEMA,
                MEMBERSHIP_SCHEMA,
                ALARMS_SCHEMA,
                LEASES_SCHEMA,
                TURNS_SCHEMA,
            ),
        )
        self.locks = ObjectLocks()
        self.leases = ObjectLeases(self.storage, config.lease_s)
        self._probes = ProbeServer(
            config.host,
            config.probe_port,
            is_ready=self._is_ready,
            registry=state_registry(
                self.storage, self.locks, self._presence_stats, lambda: len(self.leases.table)
            ),
        )
        self._membership: MembershipComponent | None = None
        self._components: list[Component] = []
        self._started: list[Component] = []
        self._nc: NatsClient | None = None
        self._server: Any = None  # grpc.aio.Server once started
        self._health: health_aio.HealthServicer | None = None
        self._port: int | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, connect to NATS, listen, and report SERVING.

        Call once. Raises OSError if the address cannot be bound (the port is taken),
        ``sqlite3.Error`` or OSError if the database cannot be opened, BusUnavailable if
        NATS cannot be reached; the server is then closed.
        """
        self._enter_running()
        try:
            await self._probes.start()
            await self.storage.start()
            # Before listening: a holder that renews right after a restart keeps its objects.
            await self.leases.load(time.monotonic())
            self._nc = await connect_bus(self.config, "wsgate-state")
            context = StateContext(self.config, self.storage, self.locks, self._nc, self.leases)
            self._membership = MembershipComponent(context)
            alarms = AlarmsComponent(context)
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
            # No SO_REUSEPORT (gRPC's default is on): a second state service started on the
            # same port must fail, not silently share the traffic.
            server = grpc.aio.server(
                options=[
                    ("grpc.so_reuseport", 0),
                    # One put may carry 128 keys of 2 KiB and values of 128 KiB (~16.3 MiB).
                    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                    # gRPC cancels calls beyond ~1,000 waiting to be picked up; a worker
                    # alone may have 1,024 events in flight, each making calls.
                    ("grpc.server.max_pending_requests", 100_000),
                ]
            )
            self._server = server
            health = health_aio.HealthServicer()
            self._health = health
            for service in ("", *SERVICE_NAMES):
                await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            for component in self._components:
                component.register(server)
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            target = f"{_host_for_address(self.config.host)}:{self.config.port}"
            try:
                self._port = server.add_insecure_port(target)
            except RuntimeError as exc:
                raise OSError(f"state service cannot listen on {target}: {exc}") from exc
            await server.start()
            for component in self._components:
                await component.start()
                self._started.append(component)
            for service in ("", *SERVICE_NAMES):
                await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self.close()
            raise
        log.info("state service listening on %s, data in %s", self.address, self.config.db_path)

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
        """``host:port`` actually bound, as :class:`~worker.state_client.StateClient` takes."""
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
        try:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            if self._server is not None:
                await self._server.stop(grace_s)
            for component in reversed(self._started):
                try:
                    await component.close()
                except Exception:
                    log.exception("closing %s failed", type(component).__name__)
            if self._nc is not None and not self._nc.is_closed:
                try:
                    await self._nc.drain()
                except Exception:
                    log.warning("nats did not drain cleanly", exc_info=True)
            # After the server: every handler has returned, so no write is left queued.
            await self.storage.close()
            await self._probes.close()
        finally:
            self._mark_closed()
            log.info("state service closed")


def _host_for_address(host: str) -> str:
    # An IPv6 literal needs brackets before ":port".
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
