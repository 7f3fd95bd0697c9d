"""The gateway: aiohttp terminates WebSockets; NATS carries their events to workers.

Flow of one connection::

    (the listener: PROXY header, per-address limit, TLS, handshake deadline; listener.py)
    request ──► no Upgrade header? ──► HttpRequest on <prefix>.request.<app> ──► the app's
         │      HttpResponse (a route's on_request; without one, 400 "Expected websocket")
    upgrade request ──► valid handshake? ── no ──► 400 "Invalid WebSocket handshake"
         │ yes          draining? 503 · Origin not allowed? 403 · at max_connections? 503
         │              a proxy's client over its address's limit? 429
         │              over the outbound budget? 503
         ▼
    ConnectRequest on <prefix>.connect.<app> ──► ConnectDecision
         │ reject ──► the app's status, headers and body
         ▼ accept
    101 (with the app's subprotocol) ─► Accept.messages sent ─► read loop:
        each message ─► over the message rate? close 1008
                     ─► ConnectionEvent, delivered at least once (window 1: the next
                        message is taken only once its final ack came)
    end ─► one Closed event ─► forget the connection

Every decision about one connection (window, redelivery timing, limits, close codes) is
its :class:`~wsgate.gateway.session.Session`'s, a sans-I/O class: this module feeds it what
happens on the socket and the bus, and performs the actions it returns (``_perform``).

Final acks and commands for this gateway arrive together, in GatewayBatch envelopes on
<prefix>.gw.<gateway_id>, read by one subscription that takes their items strictly in
order (``_on_command``): so a handler's commands are applied before its final ack, and
per-connection order rests on nothing but NATS' per-publisher order. Commands go to
per-connection :class:`~wsgate.gateway.outbox.Outbox` queues, so one slow socket never
stalls the others. Those for a connection still upgrading are kept until it opens (see
``Session.command``).
The bytes queued in all outboxes together are bounded by an
:class:`~wsgate.gateway.budget.OutboundBudget`; past it the furthest behind are shed (``_shed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import nats.errors
from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketError
from multidict import CIMultiDict
from nats.aio.msg import Msg

from wsgate import envelopes, ids, subjects
from wsgate.bus import Bus, BusConnector, connect_bus, drain_bus
from wsgate.closecodes import CloseCode
from wsgate.config import DEFAULT_MAX_MESSAGE_BYTES, GatewayConfig
from wsgate.errors import ConfigError, InvalidEnvelope
from wsgate.gateway.budget import OutboundBudget, choose_victims
from wsgate.gateway.delivery import EventDelivery
from wsgate.gateway.handshake import is_websocket_handshake
from wsgate.gateway.heartbeat import HeartbeatSweep
from wsgate.gateway.listener import Listener, RequestClient
from wsgate.gateway.metrics import GatewayMetrics
from wsgate.gateway.outbox import CloseFrame, Outbox, OutboxPolicy
from wsgate.gateway.presence import PresenceAnnouncer
from wsgate.gateway.session import (
    MESSAGE_IN,
    MESSAGE_OUT,
    RATE_LIMITED,
    Action,
    Close,
    Count,
    Event,
    Publish,
    Session,
    SessionLimits,
    State,
    Write,
)
from wsgate.gateway.static import Handler, with_static_files
from wsgate.probes import add_probe_routes
from wsgate.service import Service, ServicePhase
from wsgate.supervision import Supervisor, Teardown
from wsgate.v1 import envelope_pb2 as pb

log = logging.getLogger(__name__)

#: How long a close handshake may take before the TCP connection is cut.
CLOSE_TIMEOUT_S = 5.0
#: Sockets closed at once when draining (each close writes a frame and awaits the reply).
CLOSE_CONCURRENCY = 256
#: Room for the envelope around a message of max_message_bytes in one NATS payload.
ENVELOPE_MARGIN_BYTES = 16 * 1024


def fit_message_limit(config: GatewayConfig, max_payload: int) -> GatewayConfig:
    """``config`` with a message limit that NATS' ``max_payload`` carries with its envelope.

    A limit that fits is kept. The default (1 MiB) that does not fit, as on a stock
    nats-server (whose max_payload is 1 MiB), is lowered to ``max_payload`` less the
    envelope's margin, with a warning saying how to get the full default: a newcomer's
    first run works. Any other limit that does not fit was asked for and cannot be
    honoured: ConfigError, naming both ways out.
    """
    if config.max_message_bytes + ENVELOPE_MARGIN_BYTES <= max_payload:
        return config
    fitting = max_payload - ENVELOPE_MARGIN_BYTES
    if config.max_message_bytes != DEFAULT_MAX_MESSAGE_BYTES or fitting < 1:
        raise ConfigError(
            f"NATS max_payload is {max_payload} bytes: too small for "
            f"max_message_bytes={config.max_message_bytes} plus its envelope "
            f"({ENVELOPE_MARGIN_BYTES} bytes); raise max_payload in the nats-server config "
            f"or lower WSGATE_MAX_MESSAGE_BYTES to at most {fitting}"
        )
    log.warning(
        "NATS max_payload is %d bytes: the largest client message is lowered from the "
        "default %d to %d bytes (WSGATE_MAX_MESSAGE_BYTES); for the full default, set "
        "max_payload to at least %d in the nats-server config",
        max_payload,
        config.max_message_bytes,
        fitting,
        config.max_message_bytes + ENVELOPE_MARGIN_BYTES,
    )
    return dataclasses.replace(config, max_message_bytes=fitting)


def session_limits(config: GatewayConfig) -> SessionLimits:
    """The limits every session of a gateway with ``config`` shares."""
    return SessionLimits(
        max_message_bytes=config.max_message_bytes,
        max_outbound_bytes=config.max_outbound_bytes,
        message_rate=config.message_rate,
        message_burst=config.message_burst,
        idle_timeout_s=config.idle_timeout_s,
        ack_timeout_s=config.ack_timeout_s,
        delivery_timeout_s=config.delivery_timeout_s,
        auto_responses=config.auto_response_map,
    )


class LiveConnection:
    """An accepted connection: its policy (:class:`Session`), its socket, its outbound
    queue. The wiring between them is the Gateway's."""

    __slots__ = ("outbox", "session", "settled", "shed", "ws")

    def __init__(self, session: Session, ws: web.WebSocketResponse, outbox: Outbox) -> None:
        self.session = session
        self.ws = ws
        self.outbox = outbox
        #: Made only when a drain waits for the event in flight (an Event each would cost
        #: memory).
        self.settled: asyncio.Future[None] | None = None
        #: Closed to keep the outbound budget (counted in OutboundBudget.closing until gone).
        self.shed = False

    def done_with_event(self) -> None:
        settled = self.settled
        if settled is not None:
            if not settled.done():
                settled.set_result(None)
            self.settled = None

    async def until_settled(self) -> None:
        """Until no event is in flight."""
        while self.session.busy:
            if self.settled is None:
                self.settled = asyncio.get_running_loop().create_future()
            # Shielded: the drain may wait on the same future.
            await asyncio.shield(self.settled)

    async def wait_settled(self, deadline: float) -> None:
        """Until no event is in flight, or ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        while self.session.busy and loop.time() < deadline:
            if self.settled is None:
                self.settled = loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(self.settled)


@dataclass
class _Refusal:
    reason: str
    status: int
    text: str
    headers: dict[str, str] = field(default_factory=dict)


#: What _precheck answers for a request that asks for no upgrade: the app's to answer.
_PLAIN_REQUEST = _Refusal("plain_request", 400, "Expected websocket")

#: Headers of the app's answer to a plain request that the gateway sets itself, or that
#: would change the connection to the client: dropped.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


class Gateway(Service):
    """One gateway process's server.

    Use ``async with Gateway(config) as gw`` or call :meth:`start` then :meth:`close`.
    ``close`` drains (see :meth:`close`); it is idempotent. ``connect`` opens the bus
    (NATS, by default; a unit test's in-memory bus).
    """

    def __init__(self, config: GatewayConfig, *, connect: BusConnector = connect_bus) -> None:
        super().__init__()
        self.config = config
        self._connect_bus = connect
        self.gateway_id = ids.new_gateway_id(config.node)
        self.metrics = GatewayMetrics()
        self._ids = ids.ConnectionIds(self.gateway_id)
        self._connect_subject = subjects.connect_subject(
            config.prefix, config.app_name, self.gateway_id
        )
        self._events_subject = subjects.events_subject(
            config.prefix, config.app_name, self.gateway_id
        )
        self._request_subject = subjects.request_subject(
            config.prefix, config.app_name, self.gateway_id
        )
        self._command_subject = subjects.gateway_subject(config.prefix, self.gateway_id)
        self._origins = config.origin_patterns
        self._auto_responses = config.auto_response_map
        self._budget = budget = OutboundBudget(config.outbound_budget_bytes)
        self.metrics.outbound_bytes.set_function(lambda: budget.total)
        self._connections: dict[str, LiveConnection] = {}
        self._connecting = 0
        #: Connections between their ConnectRequest and their registration (see _on_command).
        self._early: dict[str, Session] = {}
        #: Bound metrics by (metric, label), for the sessions' Count actions ...
        self._counters: dict[tuple[str, str], Callable[[float], None]] = {}
        #: ... but for the two of every message, bound here.
        self._messages_in = self.metrics.messages_in.inc
        self._messages_out = self.metrics.messages_out.inc
        self._handlers: set[asyncio.Task[object]] = set()
        self._heartbeats = HeartbeatSweep(config.heartbeat_s)
        self._nc: Bus | None = None
        self._delivery: EventDelivery[LiveConnection | None] | None = None
        self._presence: PresenceAnnouncer | None = None
        self._runner: web.AppRunner | None = None
        #: The socket, TLS, PROXY protocol, handshake deadline, connections per address.
        self._listener: Listener | None = None
        #: What start() did, undone by close() (newest first).
        self._teardown = Teardown("gateway", log)
        #: The background loops; a crash turns /readyz to 503.
        self._supervisor = Supervisor(
            "gateway",
            on_crash=lambda task: self.metrics.background_crashes.labels(task).inc(),
            logger=log,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to NATS, subscribe to this gateway's commands (with its final acks) and
        the replies to its events, start listening.

        Raises BusUnavailable if NATS cannot be reached, ConfigError if NATS' max_payload
        cannot carry a message of a ``max_message_bytes`` set to other than its default
        (the default is lowered to fit: see fit_message_limit), OSError if the port is taken.
        """
        self._enter_running()
        # Each step registers its undo once done: close() undoes exactly what was started,
        # newest first. The listener and the HTTP server are registered first so as to be
        # undone last: the listener stays open while the connections drain (a load
        # balancer sees 503s, not refused connections), and the HTTP server's cleanup
        # waits for handlers that the event delivery's close lets go.
        undo = self._teardown.push
        spawn = self._supervisor.spawn
        try:
            self._listener = Listener(self.config, self.metrics)  # loads the certificate
            undo("http server", self._stop_http_server)
            undo("listener", self._listener.close)  # safe before start, or halfway through
            self._nc = nc = await self._connect_bus(
                self.config,
                f"wsgate-gateway {self.gateway_id}",
                role="gateway",
                on_connection_change=self._bus_changed,
                on_permission_violation=self.metrics.nats_permission_violations.inc,
            )
            undo("nats", functools.partial(drain_bus, nc))
            self.config = fit_message_limit(self.config, nc.max_payload)
            prefix = self.config.prefix
            self._delivery = EventDelivery(
                nc,
                events_subject=self._events_subject,
                worker_events_subject=lambda worker: subjects.worker_subject(
                    prefix, worker, "events", self.gateway_id
                ),
                ack_prefix=subjects.ack_prefix(self.config.prefix, self.gateway_id),
                ack_timeout_s=self.config.ack_timeout_s,
                delivery_timeout_s=self.config.delivery_timeout_s,
                on_messages=self._on_ack_messages,
                on_redelivery=self.metrics.redeliveries.inc,
                on_stale=self.metrics.drops.labels("stale").inc,
                on_round_trip=self.metrics.event_round_trip.observe,
                on_given_up=self._given_up,
                on_garbage=self._garbage,
                perform=self._perform,
                on_settled=_settled,
            )
            self._delivery.start(spawn)
            undo("event delivery", self._delivery.close)
            undo("heartbeats", self._heartbeats.close)
            # Final acks and commands: one subject, one subscription, taken in order.
            await nc.subscribe(self._command_subject, cb=self._on_command)
            # Progress, retry, no responders: nothing whose order against the above counts.
            await nc.subscribe(self._delivery.ack_wildcard, cb=self._delivery.on_reply)
            await nc.flush()
            # The lease on this gateway's members (stateservice/presence.py).
            self._presence = PresenceAnnouncer(
                nc, self.config.prefix, self.gateway_id, self.config.presence_interval_s
            )
            self._presence.start(spawn)
            # Connections closed, close events delivered: the members may go then.
            undo("presence", self._presence.close)
            # No middleware: aiohttp would add a frame of its own per middleware, and one for
            # the current app, to every open WebSocket's task (the handshake deadline is
            # disarmed by the listener's request factory instead).
            app = web.Application()
            add_probe_routes(
                app,
                is_ready=self._is_ready,
                registry=self.metrics.registry,
                not_ready_reason=self._supervisor.not_ready_reason,
            )
            handler: Handler = self._handle
            if self.config.static_path is not None:
                # Plain GETs of files in static_dir; upgrades and the rest still reach _handle.
                handler = with_static_files(self.config.static_path, self._handle)
            app.router.add_route("*", "/{tail:.*}", handler)
            self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await self._runner.setup()
            assert self._runner.server is not None
            await self._listener.start(self._runner.server, spawn)
            undo("connections", self._close_connections)
        except BaseException:
            await self.close()
            raise
        log.info("gateway %s listening on %s", self.gateway_id, self.url)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._listener is not None, "start() first"
        return self._listener.port

    @functools.cached_property
    def _limits(self) -> SessionLimits:
        # Made at the first upgrade, after start() fitted the message limit to NATS.
        return session_limits(self.config)

    @functools.cached_property
    def _outbox_policy(self) -> OutboxPolicy:
        # One for all outboxes: no callback made per connection.
        return OutboxPolicy(
            max_bytes=self.config.max_outbound_bytes,
            budget=self._budget,
            close_timeout_s=CLOSE_TIMEOUT_S,
            on_dropped=self.metrics.drops.labels("write_failed").inc,
            on_overflow=self._slow_consumer,
        )

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:8080`` (``https`` with TLS)."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        elif host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        scheme = "https" if self._listener is not None and self._listener.tls else "http"
        return f"{scheme}://{host}:{self.port}"

    def reload_tls(self) -> bool:
        """Reload the TLS certificate and key from their files (on SIGHUP): new handshakes
        get the new certificate, open connections keep theirs. False if the reload failed
        (the previous certificate stays; logged and counted) or TLS is off."""
        return self._listener is not None and self._listener.reload_certificate()

    async def close(self) -> None:
        """Drain, in this order, within ``drain_timeout_s``: readiness turns 503 and new
        upgrades are refused; each connection's event in flight finishes; every socket is
        closed with 1001 (at most CLOSE_CONCURRENCY at once), and so is one whose upgrade
        was under way; their ``close`` events reach the app; sockets still open at the
        deadline are cut. Then the presence lease is given up, the event delivery stops
        (what still waits for an ack is given up), NATS is drained, and the listener and
        the HTTP server stop.

        Each of those steps runs even if one before it failed (the failure is logged with
        the step's name); only the steps start() got to are undone. Idempotent; a second
        caller waits for the first.
        """
        if not await self._enter_closing():
            return
        try:
            await self._teardown.unwind()
        finally:
            self._mark_closed()

    async def _stop_http_server(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _close_connections(self) -> None:
        """The first step of close(): every connection closed with 1001, bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        slots = asyncio.Semaphore(CLOSE_CONCURRENCY)

        async def close_one(conn: LiveConnection) -> None:
            async with slots:
                await conn.wait_settled(deadline)
                self._request_close(
                    conn, pb.CLOSE_INITIATOR_GATEWAY, CloseCode.GOING_AWAY, "going away"
                )

        await asyncio.gather(*(close_one(c) for c in list(self._connections.values())))
        if self._handlers:
            # Handlers finish by reporting each close to the app, so NATS stays up. Those
            # whose upgrade was under way close their sockets themselves (see _open).
            _, pending = await asyncio.wait(
                self._handlers, timeout=max(deadline - loop.time(), 0.01)
            )
            if pending:
                log.warning("%d connection(s) still open at the deadline; cut", len(pending))
                for conn in list(self._connections.values()):
                    conn.outbox.force_close(CloseCode.GOING_AWAY, "going away")
                await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)

    def _is_ready(self) -> bool:
        nc = self._nc
        return (
            self.phase is ServicePhase.RUNNING
            and nc is not None
            and nc.is_connected
            # Upgrades get 503 meanwhile: new clients are better served by another gateway.
            and not self._budget.over
        )

    def _bus_changed(self, connected: bool) -> None:
        if self._delivery is not None:
            self._delivery.set_bus_connected(connected)

    # -- upgrades ------------------------------------------------------------------------

    def _refuse(self, refusal: _Refusal) -> web.Response:
        self.metrics.upgrades_refused.labels(refusal.reason).inc()
        return web.Response(status=refusal.status, text=refusal.text, headers=refusal.headers)

    def _precheck(self, request: web.Request) -> _Refusal | None:
        """What stops an upgrade before the app is asked."""
        if not is_websocket_handshake(request.headers):
            # The Cloudflare guide's check: a WebSocket route answers a plain request so.
            if request.headers.get("Upgrade", "").lower() != "websocket":
                return _PLAIN_REQUEST  # for the app's request handler, if it has one
            return _Refusal("bad_handshake", 400, "Invalid WebSocket handshake")
        if self.phase is not ServicePhase.RUNNING:
            return _Refusal("draining", 503, "Shutting down", {"Retry-After": "1"})
        origin = request.headers.get("Origin")
        if (
            self._origins
            and origin is not None
            and not any(fnmatchcase(origin, pattern) for pattern in self._origins)
        ):
            return _Refusal("origin", 403, "Origin not allowed")
        if len(self._connections) + self._connecting >= self.config.max_connections:
            return _Refusal("max_connections", 503, "Too many connections", {"Retry-After": "1"})
        if self._budget.over:
            return _Refusal(
                "outbound_budget", 503, "Outbound memory budget exceeded", {"Retry-After": "1"}
            )
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """One request, from its upgrade to its socket's close, in this one coroutine.

        An idle connection's handler stays suspended in the read loop for the
        connection's life, and every coroutine frame under it costs memory on every idle
        connection (about 250-400 bytes each). So the read loop is here, inline, and what
        is only needed during the upgrade is in :meth:`_accept`, whose frame (with the
        ConnectDecision) is gone once the socket is open.
        """
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        listener = self._listener
        assert listener is not None
        # The client whose address slot this upgrade holds (released at the end).
        held: RequestClient | None = None
        try:
            refusal = self._precheck(request)
            if refusal is not None:
                if refusal is _PLAIN_REQUEST:
                    return await self._plain_request(request)
                return self._refuse(refusal)
            client = listener.client(request)
            if not listener.hold(client):  # a client named by a proxy: counted only now
                text = "Too many connections from your address"
                return self._refuse(_Refusal("ip_limit", 429, text, {"Retry-After": "1"}))
            held = client
            del client
            connection_id = self._ids.next()
            session = Session(connection_id, request.path, self._limits)
            self._early[connection_id] = session
            try:
                accepted = await self._accept(request, session)
            finally:
                self._early.pop(connection_id, None)
            if isinstance(accepted, web.StreamResponse):
                return accepted
            conn, opening = accepted
            ws = conn.ws
            del accepted
            now = asyncio.get_running_loop().time
            try:
                self._perform(conn, opening)
                del opening
                if self.phase is not ServicePhase.RUNNING:
                    # close() began while this upgrade was in prepare(), so its drain did
                    # not see the connection: it goes as the others did, with 1001 after
                    # what the app sent, and its close event reaches the app once (from
                    # the finally).
                    self._request_close(
                        conn, pb.CLOSE_INITIATOR_GATEWAY, CloseCode.GOING_AWAY, "going away"
                    )
                # The read loop: the client's frames go to the session one at a time, each
                # only once the event before it is settled (window 1: a slow app pushes
                # back on the client through TCP). An event is sent, not awaited: its
                # final ack moves the session on (EventDelivery.send), and the loop waits
                # for that only if the next frame comes first.
                delivery = self._delivery
                assert delivery is not None
                idle_limit = self._limits.idle_timeout_s
                while True:
                    timeout = session.read_timeout(now()) if idle_limit else None
                    try:
                        if timeout is not None and timeout <= 0:
                            # aiohttp takes a timeout of 0 for none: the idle deadline is now.
                            raise TimeoutError
                        msg = await ws.receive(timeout=timeout)
                    except TimeoutError:
                        if session.busy:
                            # The idle clock runs from the settling: nothing is due yet.
                            await conn.until_settled()
                        else:
                            self._perform(conn, session.tick(now()))  # the idle limit, if due
                        continue
                    if session.busy:
                        # Read while the event before it is in flight (a client that does
                        # not wait for its answers, or its close): held, and handed to the
                        # session as if read after the settling, behind the ack's frames.
                        # (At most this one frame is held: the loop reads no further.)
                        await conn.until_settled()
                    kind = msg.type
                    if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                        actions = session.client_frame(msg.data, now())
                    elif kind is WSMsgType.CLOSE:
                        actions = session.client_close(int(msg.data), msg.extra or "", now())
                    elif kind is WSMsgType.ERROR:
                        if isinstance(msg.data, WebSocketError):
                            # A protocol violation (RFC 6455 7.4.1): aiohttp already closed
                            # the socket with the matching code (1002, 1007, 1009).
                            session.transport_error(msg.data.code, str(msg.data))
                        elif isinstance(msg.data, TimeoutError):
                            session.transport_error(CloseCode.ABNORMAL, "no pong to heartbeat")
                        break
                    else:  # CLOSING (we are closing it) or CLOSED
                        break
                    del msg  # not kept while the next read waits
                    publish = self._perform(conn, actions)
                    if publish is not None:
                        delivery.send(conn, session, publish)
            finally:
                await conn.outbox.flush()
                if conn.shed:
                    # Its close frame is written or its TCP connection cut: its memory is
                    # free.
                    self._budget.shed_finished()
                if session.busy:
                    # Left the loop by an exception while an event was in flight: the Closed
                    # event follows it (EventDelivery.send carries on the queue).
                    self._perform(conn, session.transport_closed(now()))
                    await conn.until_settled()
                else:
                    publish = self._perform(conn, session.transport_closed(now()))
                    if publish is not None:
                        await self._drive(conn, publish)
                del self._connections[connection_id]
                self.metrics.connections_open.dec()
            return ws
        finally:
            if held is not None:
                listener.release(held)
            self._handlers.discard(task)
            self._heartbeats.forget(request)

    async def _accept(
        self, request: web.Request, session: Session
    ) -> web.StreamResponse | tuple[LiveConnection, list[Action]]:
        """Ask the app; on its accept, upgrade and register the connection, and return it
        with what the session asks for on opening. The answer to send otherwise."""
        connection_id = session.connection_id
        offered = _offered_subprotocols(request)
        self._connecting += 1
        try:
            decision = await self._ask_app(request, connection_id, offered)
        finally:
            self._connecting -= 1
        if isinstance(decision, _Refusal):
            return self._refuse(decision)
        if decision.HasField("reject"):
            self.metrics.upgrades_refused.labels("app").inc()
            return _reject_response(decision.reject)
        accept = decision.accept
        if accept.subprotocol and accept.subprotocol not in offered:
            log.error("app chose subprotocol %r the client did not offer", accept.subprotocol)
            await self._report_unopened(session, CloseCode.ABNORMAL)
            return self._refuse(
                _Refusal("bad_subprotocol", 502, "The app chose a subprotocol not offered")
            )
        if self.phase is not ServicePhase.RUNNING:
            await self._report_unopened(session, CloseCode.GOING_AWAY)
            return self._refuse(_Refusal("draining", 503, "Shutting down", {"Retry-After": "1"}))

        ws = web.WebSocketResponse(
            protocols=(accept.subprotocol,) if accept.subprotocol else (),
            # aiohttp refuses a message of exactly max_msg_size; ours is the largest allowed.
            max_msg_size=self.config.max_message_bytes + 1,
            heartbeat=None,  # one sweep for all sockets: self._heartbeats
            autoclose=False,  # we answer close frames ourselves, checking their codes
            # No permessage-deflate: a compressor per socket costs far more memory than an
            # idle connection should, and messages cross NATS uncompressed anyway.
            compress=False,
            timeout=CLOSE_TIMEOUT_S,
        )
        # The outbox names its connection by id, not by a closure over conn: conn holds
        # the outbox, so a closure would make a reference cycle, and every closed
        # connection's socket, request and buffers would wait for the cyclic collector
        # (rare at the thresholds set at start-up) instead of being freed at once.
        conn = LiveConnection(
            session, ws, Outbox(ws, self._outbox_policy, connection_id, request.transport)
        )
        try:
            await ws.prepare(request)
        except (ConnectionError, RuntimeError) as exc:
            log.info("client left during the handshake of %s: %s", connection_id, exc)
            await self._report_unopened(session, CloseCode.ABNORMAL)
            return ws
        self._heartbeats.watch(request, ws)
        self._connections[connection_id] = conn
        del self._early[connection_id]
        self.metrics.connections.inc()
        self.metrics.connections_open.inc()
        # The decision's messages, then what came for it before it opened (the next turns'
        # broadcasts: their turns ran after the connect turn), for the caller to perform.
        # Only plain fields of the decision outlive this call: the protobuf objects (a
        # upb arena of about 1.2 KiB) go with this frame, not kept by the read loop.
        opening = session.opened(
            asyncio.get_running_loop().time(),
            worker=accept.worker if ids.is_worker_id(accept.worker) else "",
            messages=accept.messages,
        )
        return conn, opening

    async def _plain_request(self, request: web.Request) -> web.Response:
        """A request without an upgrade: the app's answer (a route's ``on_request``), or
        ``400 Expected websocket`` from the app for a route without one. The body is read
        up to the message size limit (413 beyond); every failure of the bus or the app is
        an HTTP status, as for a connect."""
        answer = await self._ask_app_plain(request)
        if isinstance(answer, _Refusal):
            response = web.Response(status=answer.status, text=answer.text, headers=answer.headers)
        else:
            headers = CIMultiDict(
                (h.name, h.value) for h in answer.headers if h.name.lower() not in _HOP_BY_HOP
            )
            response = web.Response(status=answer.status, body=answer.body, headers=headers)
        self.metrics.http_requests.labels(f"{response.status // 100}xx").inc()
        return response

    async def _ask_app_plain(self, request: web.Request) -> pb.HttpResponse | _Refusal:
        if self.phase is not ServicePhase.RUNNING:
            return _Refusal("draining", 503, "Shutting down", {"Retry-After": "1"})
        limit = self.config.max_message_bytes
        too_large = _Refusal("body_too_large", 413, f"A request body is at most {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            return too_large
        body = bytearray()
        while chunk := await request.content.read(65536):
            body += chunk
            if len(body) > limit:
                return too_large
        assert self._nc is not None
        assert self._listener is not None
        envelope = pb.HttpRequest(
            request_id=uuid.uuid4().hex,
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=[pb.Header(name=k, value=v) for k, v in request.headers.items()],
            body=bytes(body),
            remote_address=str(self._listener.client(request).address),
        )
        reply = await self._request_app(self._request_subject, envelope.SerializeToString())
        if isinstance(reply, _Refusal):
            return reply
        try:
            return envelopes.read_http_response(reply.data)
        except InvalidEnvelope as exc:
            self._garbage("request_reply")
            log.error("unreadable answer to a plain request: %s", exc.reason)
            return _Refusal("bad_decision", 502, "Bad answer from the app")

    async def _request_app(self, subject: str, payload: bytes) -> Msg | _Refusal:
        """A request to the app's workers (a connect, a plain HTTP request): their reply, or
        the HTTP answer for each way it can fail."""
        assert self._nc is not None
        if not self._nc.is_connected:
            return _Refusal("bus_unavailable", 503, "Bus unavailable", {"Retry-After": "1"})
        try:
            return await self._nc.request(subject, payload, timeout=self.config.connect_timeout_s)
        except nats.errors.NoRespondersError:
            return _Refusal("no_worker", 503, "No worker available", {"Retry-After": "1"})
        except nats.errors.TimeoutError:
            return _Refusal("app_timeout", 504, "The app did not answer in time")
        except nats.errors.Error as exc:
            log.warning("a request on %s failed: %r", subject, exc)
            return _Refusal("bus_unavailable", 503, "Bus unavailable", {"Retry-After": "1"})

    async def _ask_app(
        self, request: web.Request, connection_id: str, offered: list[str]
    ) -> pb.ConnectDecision | _Refusal:
        """Send the ConnectRequest; map every way that can fail to an HTTP answer."""
        assert self._nc is not None
        assert self._listener is not None
        connect = pb.ConnectRequest(
            connection_id=connection_id,
            path=request.path,
            query=request.query_string,
            headers=[pb.Header(name=k, value=v) for k, v in request.headers.items()],
            subprotocols=offered,
            remote_address=str(self._listener.client(request).address),
        )
        reply = await self._request_app(self._connect_subject, connect.SerializeToString())
        if isinstance(reply, _Refusal):
            return reply
        try:
            decision = envelopes.read_connect_decision(reply.data)
        except InvalidEnvelope as exc:
            self._garbage("connect_reply")
            log.error("unreadable connect decision for %s: %s", connection_id, exc.reason)
            return _Refusal("bad_decision", 502, "Bad answer from the app")
        return decision

    async def _drive(self, conn: LiveConnection, publish: Publish) -> None:
        """Deliver ``publish``'s event at least once, and whatever the session has in
        flight after it, performing what the session answers on the way."""
        assert self._delivery is not None
        try:
            await self._delivery.deliver(
                conn.session, publish, functools.partial(self._perform, conn)
            )
        finally:
            conn.done_with_event()

    def _perform(self, conn: LiveConnection | None, actions: Sequence[Action]) -> Publish | None:
        """Do what a session asked, in order; return the Publish among it, if any (it is
        the delivery's to perform). ``conn`` None: a session that never opened."""
        publish: Publish | None = None
        budget = self._budget
        # By exact type, the common ones first: this runs for every message, both ways.
        for action in actions:
            if type(action) is Write:
                assert conn is not None
                conn.outbox.push(action.frame)
                if budget.total > budget.limit_bytes:  # after each frame queued
                    self._shed()
            elif type(action) is Count:
                if action is MESSAGE_OUT:
                    self._messages_out()
                elif action is MESSAGE_IN:
                    self._messages_in()
                else:
                    self._count(action)
                if action is RATE_LIMITED:
                    assert conn is not None
                    reason = self._limits.rate_reason
                    log.info("closing %s: %s", conn.session.connection_id, reason)
            elif type(action) is Publish:
                publish = action
            elif type(action) is Close:
                assert conn is not None
                if action.force:
                    if action.code == CloseCode.POLICY_VIOLATION:
                        log.info("closing slow consumer %s", conn.session.connection_id)
                    conn.outbox.force_close(action.code, action.reason)
                else:
                    conn.outbox.push(CloseFrame(action.code, action.reason))
            # Delivered and GaveUp: counted by the delivery (on_round_trip, on_given_up).
        return publish

    def _count(self, count: Count) -> None:
        key = (count.metric, count.label)
        inc = self._counters.get(key)
        if inc is None:
            metric = getattr(self.metrics, count.metric)
            inc = self._counters[key] = (metric.labels(count.label) if count.label else metric).inc
        inc(count.n)

    def _request_close(
        self, conn: LiveConnection, initiator: pb.CloseInitiator.ValueType, code: int, reason: str
    ) -> None:
        self._perform(conn, conn.session.close(code, reason, initiator))

    def _shed(self) -> None:
        """Close the connections with the most bytes queued, their queues dropped, until
        the total is within the budget again (see gateway/budget.py)."""
        budget = self._budget
        total = budget.total
        victims = choose_victims(
            ((c, c.outbox.queued_bytes) for c in self._connections.values()), budget.excess
        )
        reason = "outbound memory budget exceeded"
        for conn in victims:
            # A connection closing already (its close frame queued behind data it does not
            # take) is shed all the same: its queue is what holds the memory.
            self._perform(conn, conn.session.shed(reason))
            conn.shed = True
            budget.shed_started()
        self.metrics.budget_shed.inc(len(victims))
        # One line per pass: a storm may shed thousands at once.
        log.warning(
            "%s (%d of %d bytes queued): shed %d connection(s), %d bytes queued now",
            reason,
            total,
            budget.limit_bytes,
            len(victims),
            budget.total,
        )

    def _slow_consumer(self, connection_id: str) -> None:
        """The outbox refused a frame over max_outbound_bytes."""
        conn = self._connections.get(connection_id)
        if conn is None:
            self.metrics.drops.labels("slow_consumer").inc()
            return
        self._perform(conn, conn.session.slow_consumer())

    def _given_up(self, event: Event) -> None:
        self.metrics.undeliverable.inc()
        log.warning("event %s#%d given up", event.connection_id, event.sequence)

    async def _report_unopened(self, session: Session, code: int) -> None:
        """The app accepted a connection that never opened: tell it that it closed."""
        assert self._delivery is not None
        loop = asyncio.get_running_loop()
        publish = self._perform(None, session.abort(code, loop.time()))
        assert publish is not None
        await self._delivery.deliver(session, publish, functools.partial(self._perform, None))

    # -- commands ------------------------------------------------------------------------

    def _on_ack_messages(self, connection_id: str, messages: Sequence[pb.Message]) -> None:
        """Messages that came with a final ack, for the event's own connection."""
        conn = self._connections.get(connection_id)
        if conn is None:
            self.metrics.drops.labels("unknown_connection").inc(len(messages))
            return
        self._perform(conn, conn.session.ack_messages(messages))

    def _garbage(self, subject: str) -> None:
        """A message on a subject of kind ``subject`` was not its envelope: counted, dropped."""
        self.metrics.garbage.labels(subject).inc()

    async def _on_command(self, msg: Msg) -> None:
        """The one callback of the command subject: a GatewayBatch's items, each taken
        completely before the next (nothing here awaits), in the order the publisher
        produced them. A final ack goes to the delivery (its frames queued, its event
        done); a command to its connections. A payload that is no GatewayBatch, and an item
        that is neither an ack nor a command that can be carried out, count as garbage
        ("command"); the other items still count."""
        try:
            batch = envelopes.read_gateway_batch(msg.data)
        except InvalidEnvelope as exc:
            self._garbage("command")
            log.warning("dropped a batch (%d bytes): %s", len(msg.data), exc.reason)
            return
        delivery = self._delivery
        assert delivery is not None
        if msg.reply:
            # A request (the server API's): applied as any batch, then answered with the
            # connections it named that are not here. Workers' batches have no reply.
            await self._answer_receipt(msg, batch)
            return
        for item in batch.items:
            # The common item first, without WhichOneof (a lookup by name): only a set ack
            # reads with a connection id (an unset member of a oneof reads as defaults).
            ack = item.ack
            connection_id = ack.connection_id
            if connection_id:
                delivery.on_final_ack(ack, connection_id)
                continue
            kind = item.WhichOneof("item")
            if kind == "ack":
                delivery.on_final_ack(ack)
            elif kind == "command":
                self._on_one_command(item.command)
            else:
                self._garbage("command")

    async def _answer_receipt(self, msg: Msg, batch: pb.GatewayBatch) -> None:
        unknown: list[str] = []
        for item in batch.items:
            if item.WhichOneof("item") != "command":
                self._garbage("command")  # acks come only from workers, never asked for
                continue
            command = item.command
            unknown += [
                connection_id
                for connection_id in command.connection_ids
                if connection_id not in self._connections and connection_id not in self._early
            ]
            self._on_one_command(command)
        receipt = pb.CommandReceipt(unknown_connection_ids=unknown)
        assert self._nc is not None
        try:
            await self._nc.publish(msg.reply, receipt.SerializeToString())
        except nats.errors.Error as exc:
            log.warning("a receipt for %d command(s) was lost: %r", len(batch.items), exc)

    def _on_one_command(self, command: pb.GatewayCommand) -> None:
        try:
            envelopes.check_command(command)
        except InvalidEnvelope as exc:
            self._garbage("command")
            log.warning("dropped a command: %s", exc.reason)
            return
        for connection_id in command.connection_ids:
            self._command(connection_id, command)

    def _command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        """One command for one connection: to its session, open or still upgrading (see
        Session.command); a connection this gateway does not hold: counted, never looped."""
        conn = self._connections.get(connection_id)
        if conn is not None:
            self._perform(conn, conn.session.command(command))
            return
        session = self._early.get(connection_id)
        if session is not None and session.state is State.CONNECTING:
            self._perform(None, session.command(command))  # kept: no action to perform
            return
        self.metrics.drops.labels("unknown_connection").inc()


def _settled(conn: LiveConnection | None) -> None:
    """A connection's session has nothing in flight any more (EventDelivery.send)."""
    if conn is not None:
        conn.done_with_event()


def _offered_subprotocols(request: web.Request) -> list[str]:
    offered: list[str] = []
    for value in request.headers.getall("Sec-WebSocket-Protocol", ()):
        offered.extend(p.strip() for p in value.split(",") if p.strip())
    return offered


#: Headers of a rejection that the gateway sets itself, never the app: they frame the
#: response on the connection (RFC 9112 6, 9.6; RFC 9110 7.6.1), and a wrong one (a
#: Content-Length shorter than the body) would desynchronise the client or a proxy.
FRAMING_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
     "trailer", "proxy-connection"}
)  # fmt: skip


def _reject_response(reject: pb.Reject) -> web.Response:
    """The HTTP response of the app's rejection (its status and headers were checked when
    the decision was read; the framing headers are the gateway's)."""
    headers: CIMultiDict[str] = CIMultiDict(
        (h.name, h.value) for h in reject.headers if h.name.lower() not in FRAMING_HEADERS
    )
    if "Content-Type" not in headers:
        headers["Content-Type"] = "text/plain; charset=utf-8"
    return web.Response(status=reject.status, body=reject.body, headers=headers)
