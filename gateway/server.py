"""The gateway: aiohttp terminates WebSockets; NATS carries their events to workers.

Flow of one connection::

    (the listener: PROXY header, per-address limit, TLS, handshake deadline; listener.py)
    upgrade request ──► valid handshake? ── no ──► 400 "Expected websocket"
         │ yes          draining? 503 · Origin not allowed? 403 · at max_connections? 503
         │              a proxy's client over its address's limit? 429
         │              over the outbound budget? 503
         ▼
    ConnectRequest on <prefix>.connect.<app> ──► ConnectDecision
         │ reject ──► the app's status, headers and body
         ▼ accept
    101 (with the app's subprotocol) ─► Accept.messages sent ─► read loop:
        each message ─► over the message rate? close 1008
                     ─► ConnectionEvent, delivered at least once, awaited (window 1)
    end ─► one Closed event ─► forget the connection

Final acks and commands for this gateway arrive together, in GatewayBatch envelopes on
<prefix>.gw.<gateway_id>, read by one subscription that takes their items strictly in
order (``_on_command``): so a handler's commands are applied before its final ack, and
per-connection order rests on nothing but NATS' per-publisher order. Commands go to
per-connection :class:`~wsgate.gateway.outbox.Outbox` queues, so one slow socket never
stalls the others. Those for a connection still upgrading are kept until it opens.
The bytes queued in all outboxes together are bounded by an
:class:`~wsgate.gateway.budget.OutboundBudget`; past it the furthest behind are shed (``_shed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import nats.errors
from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketError
from multidict import CIMultiDict
from nats.aio.msg import Msg

from wsgate import envelopes, ids, subjects
from wsgate.bus import Bus, BusConnector, connect_bus
from wsgate.closecodes import CloseCode, is_sendable
from wsgate.config import DEFAULT_MAX_MESSAGE_BYTES, GatewayConfig
from wsgate.errors import ConfigError, InvalidEnvelope
from wsgate.gateway.budget import OutboundBudget, choose_victims
from wsgate.gateway.delivery import EventDelivery
from wsgate.gateway.lifecycle import ConnectionLifecycle, Phase
from wsgate.gateway.listener import Listener, mark_request_started
from wsgate.gateway.metrics import GatewayMetrics
from wsgate.gateway.outbox import CloseFrame, Outbox
from wsgate.gateway.presence import PresenceAnnouncer
from wsgate.gateway.rate import TokenBucket
from wsgate.gateway.static import Handler, with_static_files
from wsgate.probes import add_probe_routes
from wsgate.service import Service, ServicePhase
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


_INITIATOR_LABEL = {
    pb.CLOSE_INITIATOR_UNSPECIFIED: "transport",
    pb.CLOSE_INITIATOR_CLIENT: "client",
    pb.CLOSE_INITIATOR_APP: "app",
    pb.CLOSE_INITIATOR_GATEWAY: "gateway",
}


@dataclass(eq=False)
class LiveConnection:
    """An accepted connection: its socket, its bookkeeping, its outbound queue."""

    lifecycle: ConnectionLifecycle
    ws: web.WebSocketResponse
    outbox: Outbox
    #: The worker holding the activation of the connection's durable object (from the
    #: connect decision and the acks): its events go there first. "" for the queue.
    worker: str = ""
    #: True while an event of this connection is on its way to a worker.
    busy: bool = False
    #: Made only when a drain waits for ``busy`` to end (an Event each would cost memory).
    settled: asyncio.Future[None] | None = None
    #: The client's message rate limit; None when WSGATE_MESSAGE_RATE is 0.
    rate: TokenBucket | None = None
    #: Closed to keep the outbound budget (counted in OutboundBudget.closing until gone).
    shed: bool = False

    def done_with_event(self) -> None:
        self.busy = False
        if self.settled is not None:
            if not self.settled.done():
                self.settled.set_result(None)
            self.settled = None

    async def wait_settled(self, deadline: float) -> None:
        """Until no event is in flight, or ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        while self.busy and loop.time() < deadline:
            if self.settled is None:
                self.settled = loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(self.settled)


@dataclass(eq=False)
class _Early:
    """Commands for a connection whose upgrade is under way (ConnectRequest sent, socket
    not open yet): handed to its outbox, in order, once it opens."""

    commands: list[pb.GatewayCommand] = field(default_factory=list)
    size: int = 0
    #: More than max_outbound_bytes came: the connection is closed as a slow consumer.
    overflowed: bool = False


@dataclass
class _Refusal:
    reason: str
    status: int
    text: str
    headers: dict[str, str] = field(default_factory=dict)


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
        self._command_subject = subjects.gateway_subject(config.prefix, self.gateway_id)
        self._origins = config.origin_patterns
        self._auto_responses = config.auto_response_map
        self._budget = budget = OutboundBudget(config.outbound_budget_bytes)
        self.metrics.outbound_bytes.set_function(lambda: budget.total)
        self._connections: dict[str, LiveConnection] = {}
        self._connecting = 0
        #: Connections between their ConnectRequest and their registration (see _on_command).
        self._early: dict[str, _Early] = {}
        self._handlers: set[asyncio.Task[object]] = set()
        self._nc: Bus | None = None
        self._delivery: EventDelivery | None = None
        self._presence: PresenceAnnouncer | None = None
        self._runner: web.AppRunner | None = None
        #: The socket, TLS, PROXY protocol, handshake deadline, connections per address.
        self._listener: Listener | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to NATS, subscribe to this gateway's commands (with its final acks) and
        the replies to its events, start listening.

        Raises BusUnavailable if NATS cannot be reached, ConfigError if NATS' max_payload
        cannot carry a message of a ``max_message_bytes`` set to other than its default
        (the default is lowered to fit: see fit_message_limit), OSError if the port is taken.
        """
        self._enter_running()
        try:
            self._listener = Listener(self.config, self.metrics)  # loads the certificate
            self._nc = nc = await self._connect_bus(
                self.config,
                f"wsgate-gateway {self.gateway_id}",
                role="gateway",
                on_connection_change=self._bus_changed,
                on_permission_violation=self.metrics.nats_permission_violations.inc,
            )
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
            )
            self._delivery.start()
            # Final acks and commands: one subject, one subscription, taken in order.
            await nc.subscribe(self._command_subject, cb=self._on_command)
            # Progress, retry, no responders: nothing whose order against the above counts.
            await nc.subscribe(self._delivery.ack_wildcard, cb=self._delivery.on_reply)
            await nc.flush()
            # The lease on this gateway's members (stateservice/presence.py).
            self._presence = PresenceAnnouncer(
                nc, self.config.prefix, self.gateway_id, self.config.presence_interval_s
            )
            self._presence.start()
            app = web.Application(middlewares=[mark_request_started])
            add_probe_routes(app, is_ready=self._is_ready, registry=self.metrics.registry)
            handler: Handler = self._handle
            if self.config.static_path is not None:
                # Plain GETs of files in static_dir; upgrades and the rest still reach _handle.
                handler = with_static_files(self.config.static_path, self._handle)
            app.router.add_route("*", "/{tail:.*}", handler)
            self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await self._runner.setup()
            assert self._runner.server is not None
            await self._listener.start(self._runner.server)
        except BaseException:
            await self.close()
            raise
        log.info("gateway %s listening on %s", self.gateway_id, self.url)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._listener is not None, "start() first"
        return self._listener.port

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
        closed with 1001 (at most CLOSE_CONCURRENCY at once); their ``close`` events reach
        the app; sockets still open at the deadline are cut; NATS is drained; the listener
        stops. Idempotent; a second caller waits for the first.
        """
        if not await self._enter_closing():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        try:
            slots = asyncio.Semaphore(CLOSE_CONCURRENCY)

            async def close_one(conn: LiveConnection) -> None:
                async with slots:
                    await conn.wait_settled(deadline)
                    self._request_close(
                        conn, pb.CLOSE_INITIATOR_GATEWAY, CloseCode.GOING_AWAY, "going away"
                    )

            await asyncio.gather(*(close_one(c) for c in list(self._connections.values())))
            if self._handlers:
                # Handlers finish by reporting each close to the app, so NATS stays up.
                _, pending = await asyncio.wait(
                    self._handlers, timeout=max(deadline - loop.time(), 0.01)
                )
                if pending:
                    log.warning("%d connection(s) still open at the deadline; cut", len(pending))
                    for conn in list(self._connections.values()):
                        conn.outbox.force_close(CloseCode.GOING_AWAY, "going away")
                    await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)
            if self._presence is not None:
                # Connections closed, close events delivered: the members may go now.
                await self._presence.close()
            if self._nc is not None and not self._nc.is_closed:
                with contextlib.suppress(Exception):
                    await self._nc.drain()
            if self._delivery is not None:
                await self._delivery.close()
            if self._listener is not None:
                await self._listener.close()
            if self._runner is not None:
                await self._runner.cleanup()
        finally:
            self._mark_closed()

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

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            return await self._upgrade(request)
        finally:
            self._handlers.discard(task)
            _release_heartbeat_callback(request)

    def _refuse(self, refusal: _Refusal) -> web.Response:
        self.metrics.upgrades_refused.labels(refusal.reason).inc()
        return web.Response(status=refusal.status, text=refusal.text, headers=refusal.headers)

    def _precheck(self, request: web.Request) -> _Refusal | None:
        """What stops an upgrade before the app is asked."""
        if not web.WebSocketResponse().can_prepare(request).ok:
            # The Cloudflare guide's check: a WebSocket route answers a plain request so.
            if request.headers.get("Upgrade", "").lower() != "websocket":
                return _Refusal("not_websocket", 400, "Expected websocket")
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

    async def _upgrade(self, request: web.Request) -> web.StreamResponse:
        refusal = self._precheck(request)
        if refusal is not None:
            return self._refuse(refusal)
        assert self._listener is not None
        client = self._listener.client(request)
        if not self._listener.hold(client):  # a client named by a proxy: counted only now
            text = "Too many connections from your address"
            return self._refuse(_Refusal("ip_limit", 429, text, {"Retry-After": "1"}))
        connection_id = self._ids.next()
        self._early[connection_id] = _Early()
        try:
            return await self._open(request, connection_id)
        finally:
            self._early.pop(connection_id, None)
            self._listener.release(client)

    async def _open(self, request: web.Request, connection_id: str) -> web.StreamResponse:
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
            await self._report_unopened(connection_id, request.path, CloseCode.ABNORMAL)
            return self._refuse(
                _Refusal("bad_subprotocol", 502, "The app chose a subprotocol not offered")
            )
        if self.phase is not ServicePhase.RUNNING:
            await self._report_unopened(connection_id, request.path, CloseCode.GOING_AWAY)
            return self._refuse(_Refusal("draining", 503, "Shutting down", {"Retry-After": "1"}))

        ws = web.WebSocketResponse(
            protocols=(accept.subprotocol,) if accept.subprotocol else (),
            # aiohttp refuses a message of exactly max_msg_size; ours is the largest allowed.
            max_msg_size=self.config.max_message_bytes + 1,
            heartbeat=self.config.heartbeat_s or None,
            autoclose=False,  # we answer close frames ourselves, checking their codes
            # No permessage-deflate: a compressor per socket costs far more memory than an
            # idle connection should, and messages cross NATS uncompressed anyway.
            compress=False,
            timeout=CLOSE_TIMEOUT_S,
        )
        conn = LiveConnection(
            lifecycle=ConnectionLifecycle(connection_id, request.path),
            ws=ws,
            worker=accept.worker if ids.is_worker_id(accept.worker) else "",
            outbox=Outbox(
                ws,
                max_bytes=self.config.max_outbound_bytes,
                budget=self._budget,
                close_timeout_s=CLOSE_TIMEOUT_S,
                on_dropped=self.metrics.drops.labels("write_failed").inc,
                # By id, not a closure over conn: conn holds the outbox, so a closure would
                # make a reference cycle, and every closed connection's socket, request and
                # buffers would wait for the cyclic collector (rare at the thresholds set at
                # start-up) instead of being freed at once: RSS grew under churn.
                on_overflow=functools.partial(self._slow_consumer, connection_id),
                transport=request.transport,
            ),
        )
        if self.config.message_rate > 0:
            conn.rate = TokenBucket(
                self.config.message_rate,
                self.config.message_burst,
                asyncio.get_running_loop().time(),
            )
        try:
            await ws.prepare(request)
        except (ConnectionError, RuntimeError) as exc:
            log.info("client left during the handshake of %s: %s", connection_id, exc)
            await self._report_unopened(connection_id, request.path, CloseCode.ABNORMAL)
            return ws
        self._connections[connection_id] = conn
        early = self._early.pop(connection_id)
        self.metrics.connections.inc()
        self.metrics.connections_open.inc()
        try:
            for message in accept.messages:
                self._push_message(conn, message, "connect_reply")
            # Then what came for it before it opened (the next turns' broadcasts): their
            # turns ran after the connect turn, so their output follows its messages.
            for command in early.commands:
                self._apply_command(conn, command)
            if early.overflowed:
                self._slow_consumer(connection_id)
            await self._read_loop(conn)
        finally:
            await conn.outbox.flush()
            if conn.shed:
                # Its close frame is written or its TCP connection cut: its memory is free.
                self._budget.shed_finished()
            event = conn.lifecycle.closed_event()
            if event is not None:
                self.metrics.closes.labels(_INITIATOR_LABEL[event.closed.initiator]).inc()
                await self._deliver(event, conn)
            del self._connections[connection_id]
            self.metrics.connections_open.dec()
        return ws

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
        if not self._nc.is_connected:
            return _Refusal("bus_unavailable", 503, "Bus unavailable", {"Retry-After": "1"})
        try:
            reply = await self._nc.request(
                self._connect_subject,
                connect.SerializeToString(),
                timeout=self.config.connect_timeout_s,
            )
        except nats.errors.NoRespondersError:
            return _Refusal("no_worker", 503, "No worker available", {"Retry-After": "1"})
        except nats.errors.TimeoutError:
            return _Refusal("app_timeout", 504, "The app did not answer in time")
        except nats.errors.Error as exc:
            log.warning("connect request failed: %r", exc)
            return _Refusal("bus_unavailable", 503, "Bus unavailable", {"Retry-After": "1"})
        try:
            decision = envelopes.read_connect_decision(reply.data)
        except InvalidEnvelope as exc:
            self._garbage("connect_reply")
            log.error("unreadable connect decision for %s: %s", connection_id, exc.reason)
            return _Refusal("bad_decision", 502, "Bad answer from the app")
        return decision

    # -- the read loop -------------------------------------------------------------------

    async def _read_loop(self, conn: LiveConnection) -> None:
        """Forward the client's messages one at a time until the socket closes."""
        ws, lifecycle = conn.ws, conn.lifecycle
        idle_timeout = self.config.idle_timeout_s or None
        delivery = self._delivery
        assert delivery is not None
        rate = conn.rate
        now = asyncio.get_running_loop().time
        while True:
            try:
                msg = await ws.receive(timeout=idle_timeout)
            except TimeoutError:
                self._request_close(
                    conn, pb.CLOSE_INITIATOR_GATEWAY, CloseCode.GOING_AWAY, "idle timeout"
                )
                continue
            if msg.type is WSMsgType.TEXT:
                if rate is not None and not rate.take(now()):
                    self._rate_limited(conn)
                    continue
                response = self._auto_responses.get(msg.data)
                if response is not None:
                    self.metrics.auto_responses.inc()
                    conn.outbox.push(response)
                    self._keep_budget()
                    continue
                message = pb.Message(text=msg.data)
            elif msg.type is WSMsgType.BINARY:
                if rate is not None and not rate.take(now()):
                    self._rate_limited(conn)
                    continue
                message = pb.Message(binary=msg.data)
            elif msg.type is WSMsgType.CLOSE:
                self._client_closed(conn, int(msg.data), msg.extra or "")
                continue
            elif msg.type is WSMsgType.ERROR:
                if isinstance(msg.data, WebSocketError):
                    # A protocol violation (RFC 6455 7.4.1): aiohttp already closed the
                    # socket with the matching code (1002, 1007, 1009).
                    lifecycle.request_close(
                        pb.CLOSE_INITIATOR_GATEWAY, msg.data.code, str(msg.data)
                    )
                elif isinstance(msg.data, TimeoutError):
                    lifecycle.request_close(
                        pb.CLOSE_INITIATOR_GATEWAY, CloseCode.ABNORMAL, "no pong to heartbeat"
                    )
                return
            else:  # CLOSING (we are closing it) or CLOSED
                return
            if lifecycle.phase is not Phase.OPEN:
                continue  # closing: what the client sends meanwhile is not the app's anymore
            self.metrics.messages_in.inc()
            conn.busy = True
            event = lifecycle.message_event(message)
            try:
                delivered = await delivery.deliver(event, conn)
            finally:
                conn.done_with_event()
            if delivered:
                lifecycle.acknowledged(event.sequence)
            else:
                self._request_close(
                    conn,
                    pb.CLOSE_INITIATOR_GATEWAY,
                    CloseCode.TRY_AGAIN_LATER,
                    "no worker acknowledged the message",
                )

    def _client_closed(self, conn: LiveConnection, code: int, reason: str) -> None:
        """The client sent a close frame; answer it (autoclose is off so codes are checked)."""
        reply: int
        if code == 0:  # an empty close frame: no status code (RFC 6455 7.1.5)
            code, reply = CloseCode.NO_STATUS, CloseCode.NORMAL
        elif _valid_received_code(code):
            reply = code
        else:
            # RFC 6455 7.4.1: a code that may not be sent is a protocol error.
            self._request_close(
                conn, pb.CLOSE_INITIATOR_GATEWAY, CloseCode.PROTOCOL_ERROR, "invalid close code"
            )
            return
        if conn.lifecycle.request_close(pb.CLOSE_INITIATOR_CLIENT, code, reason):
            conn.outbox.push(CloseFrame(reply, ""))

    def _request_close(
        self, conn: LiveConnection, initiator: pb.CloseInitiator.ValueType, code: int, reason: str
    ) -> None:
        if conn.lifecycle.request_close(initiator, code, reason):
            conn.outbox.push(CloseFrame(code, reason))

    def _rate_limited(self, conn: LiveConnection) -> None:
        """A message found the client's token bucket empty: it is dropped, and the
        connection closed with 1008 after what is queued for it (once; later messages are
        dropped as the connection is closing)."""
        reason = (
            f"message rate exceeded ({self.config.message_rate:g}/s, "
            f"burst {self.config.message_burst})"
        )
        if conn.lifecycle.request_close(
            pb.CLOSE_INITIATOR_GATEWAY, CloseCode.POLICY_VIOLATION, reason
        ):
            self.metrics.rate_limited.inc()
            log.info("closing %s: %s", conn.lifecycle.connection_id, reason)
            conn.outbox.push(CloseFrame(CloseCode.POLICY_VIOLATION, reason))

    def _keep_budget(self) -> None:
        """After a frame was queued: shed if the outbound budget is exceeded."""
        if self._budget.total > self._budget.limit_bytes:
            self._shed()

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
            conn.lifecycle.request_close(
                pb.CLOSE_INITIATOR_GATEWAY, CloseCode.TRY_AGAIN_LATER, reason
            )
            conn.outbox.force_close(CloseCode.TRY_AGAIN_LATER, reason)
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
        self.metrics.drops.labels("slow_consumer").inc()
        conn = self._connections.get(connection_id)
        if conn is None:
            return
        reason = "slow consumer"
        if conn.lifecycle.request_close(
            pb.CLOSE_INITIATOR_GATEWAY, CloseCode.POLICY_VIOLATION, reason
        ):
            log.info("closing slow consumer %s", conn.lifecycle.connection_id)
            conn.outbox.force_close(CloseCode.POLICY_VIOLATION, reason)

    async def _deliver(self, event: pb.ConnectionEvent, conn: LiveConnection | None = None) -> bool:
        """Deliver one event at least once (to ``conn``'s worker first, if it has one);
        False if it was given up."""
        assert self._delivery is not None
        return await self._delivery.deliver(event, conn)

    def _given_up(self, event: pb.ConnectionEvent) -> None:
        self.metrics.undeliverable.inc()
        log.warning("event %s#%d given up", event.connection_id, event.sequence)

    async def _report_unopened(self, connection_id: str, path: str, code: int) -> None:
        """The app accepted a connection that never opened: tell it that it closed."""
        lifecycle = ConnectionLifecycle(connection_id, path)
        lifecycle.request_close(pb.CLOSE_INITIATOR_GATEWAY, code, "")
        event = lifecycle.closed_event()
        assert event is not None
        await self._deliver(event)

    # -- commands ------------------------------------------------------------------------

    def _on_ack_messages(self, connection_id: str, messages: Sequence[pb.Message]) -> None:
        """Messages that came with a final ack, for the event's own connection."""
        conn = self._connections.get(connection_id)
        if conn is None or conn.lifecycle.phase is not Phase.OPEN:
            self.metrics.drops.labels("unknown_connection").inc(len(messages))
            return
        for message in messages:
            self._push_message(conn, message, "command")

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
        for item in batch.items:
            kind = item.WhichOneof("item")
            if kind == "ack":
                delivery.on_final_ack(item.ack)
            elif kind == "command":
                self._on_one_command(item.command)
            else:
                self._garbage("command")

    def _on_one_command(self, command: pb.GatewayCommand) -> None:
        try:
            envelopes.check_command(command)
        except InvalidEnvelope as exc:
            self._garbage("command")
            log.warning("dropped a command: %s", exc.reason)
            return
        for connection_id in command.connection_ids:
            conn = self._connections.get(connection_id)
            if conn is None:
                early = self._early.get(connection_id)
                if early is not None:
                    # The upgrade is under way. The object may have committed the join and
                    # run its next turn already: that turn's broadcast can be handled here
                    # before the task of the upgrade sees the decision (it comes on the
                    # request's inbox, another subscription, to another task), and a member
                    # that joined would miss a post that is neither in its replay nor sent
                    # to it live. Kept for it.
                    self._keep_early(early, command)
                    continue
            if conn is None or conn.lifecycle.phase is not Phase.OPEN:
                # The connection is gone, closing, or never was here: count it, never loop.
                self.metrics.drops.labels("unknown_connection").inc()
                continue
            self._apply_command(conn, command)

    def _keep_early(self, early: _Early, command: pb.GatewayCommand) -> None:
        if early.overflowed:
            self.metrics.drops.labels("slow_consumer").inc()
            return
        size = command.ByteSize()
        if early.size + size > self.config.max_outbound_bytes:
            early.overflowed = True
            early.commands.clear()
            self.metrics.drops.labels("slow_consumer").inc()
            return
        early.size += size
        early.commands.append(command)

    def _apply_command(self, conn: LiveConnection, command: pb.GatewayCommand) -> None:
        """One command for one open connection (``_on_one_command`` checked the rest)."""
        if conn.lifecycle.phase is not Phase.OPEN:
            self.metrics.drops.labels("unknown_connection").inc()
            return
        if command.in_reply_to > conn.lifecycle.last_sequence:
            # In reply to an event this connection has not produced: no worker sent it.
            self._garbage("command")
            return
        if conn.lifecycle.is_stale(command.in_reply_to):
            self.metrics.drops.labels("stale").inc()
            return
        if command.WhichOneof("action") == "send":
            self._push_message(conn, command.send, "command")
        else:
            # The code and reason were checked when the command was read.
            close = command.close
            self._request_close(conn, pb.CLOSE_INITIATOR_APP, close.code, close.reason)

    def _push_message(self, conn: LiveConnection, message: pb.Message, subject: str) -> None:
        kind = message.WhichOneof("data")
        if kind == "text":
            conn.outbox.push(message.text)
        elif kind == "binary":
            conn.outbox.push(message.binary)
        else:
            self._garbage(subject)
            return
        self.metrics.messages_out.inc()
        self._keep_budget()


def _release_heartbeat_callback(request: web.Request) -> None:
    """Break aiohttp's reference cycle of a WebSocket with a heartbeat, once it is over.

    aiohttp (3.14) gives the request's protocol the socket's ``_on_data_received`` (to
    reset the heartbeat on any data) and never takes it back, even at connection loss:
    protocol -> ws -> request -> protocol is a cycle, so every connection's socket,
    request, parser and buffers outlived it until a full collection of the cyclic garbage
    collector, which the thresholds set at start-up make rare. Under connection churn
    RSS grew by about 0.25 KB per connection. Nothing needs the callback once the handler
    has returned: the socket is closed, its heartbeat cancelled.
    """
    protocol = request.protocol
    if getattr(protocol, "_data_received_cb", None) is not None:
        protocol._data_received_cb = None


def _valid_received_code(code: int) -> bool:
    """Close codes a peer may send (RFC 6455 7.4.1-2 and the IANA registry)."""
    return is_sendable(code)


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
