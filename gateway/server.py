"""The gateway: aiohttp terminates WebSockets; NATS carries their events to workers.

Flow of one connection::

    upgrade request ──► valid handshake? ── no ──► 400 "Expected websocket"
         │ yes
         ▼
    ConnectRequest on <prefix>.connect.<app> ──► ConnectDecision
         │ reject ──► the app's status, headers and body
         ▼ accept
    101 (with the app's subprotocol) ─► Accept.messages sent ─► read loop:
        each message ─► ConnectionEvent on <prefix>.events.<app>, awaited (window 1)
    end ─► one Closed event ─► forget the connection

Commands for this gateway arrive on <prefix>.gw.<gateway_id> and go to per-connection
:class:`~gateway.outbox.Outbox` queues, so one slow socket never stalls the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import nats.errors
from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketError
from google.protobuf.message import DecodeError
from multidict import CIMultiDict
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from gateway.lifecycle import ConnectionLifecycle, Phase
from gateway.outbox import CloseFrame, Outbox
from wsgate import ids, subjects
from wsgate.bus import connect_bus
from wsgate.closecodes import MAX_REASON_BYTES, CloseCode, is_sendable
from wsgate.config import GatewayConfig
from wsgate.service import Service, ServicePhase
from wsgate.v1 import envelope_pb2 as pb

log = logging.getLogger(__name__)

#: Paths the gateway answers itself; every other path is a WebSocket route of the app.
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"


@dataclass
class GatewayStats:
    """Counters (exported as metrics by a later step)."""

    connections_opened: int = 0
    messages_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0
    commands_for_unknown_connections: int = 0
    garbage_commands: int = 0
    events_failed: int = 0


@dataclass(eq=False)
class LiveConnection:
    """An accepted connection: its socket, its bookkeeping, its outbound queue."""

    lifecycle: ConnectionLifecycle
    ws: web.WebSocketResponse
    outbox: Outbox


@dataclass
class _Rejection:
    status: int
    text: str
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=self.text, headers=self.headers)


class Gateway(Service):
    """One gateway process's server.

    Use ``async with Gateway(config) as gw`` or call :meth:`start` then :meth:`close`.
    ``close`` is idempotent; :meth:`wait_closed` returns once it has finished.
    """

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__()
        self.config = config
        self.gateway_id = ids.new_gateway_id(config.node_name or ids.node_name_from_host())
        self.stats = GatewayStats()
        self._ids = ids.ConnectionIds(self.gateway_id)
        self._connect_subject = subjects.connect_subject(config.prefix, config.app_name)
        self._events_subject = subjects.events_subject(config.prefix, config.app_name)
        self._command_subject = subjects.gateway_subject(config.prefix, self.gateway_id)
        self._connections: dict[str, LiveConnection] = {}
        self._handlers: set[asyncio.Task[object]] = set()
        self._nc: NatsClient | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to NATS, subscribe to this gateway's commands, and start listening.

        Raises BusUnavailable if NATS cannot be reached, OSError if the port is taken.
        """
        self._enter_running()
        try:
            self._nc = await connect_bus(self.config, f"wsgate-gateway {self.gateway_id}")
            await self._nc.subscribe(self._command_subject, cb=self._on_command)
            app = web.Application()
            app.router.add_get(HEALTH_PATH, self._healthz)
            app.router.add_get(READY_PATH, self._readyz)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await self._runner.setup()
            self._site = web.TCPSite(self._runner, self.config.host, self.config.port)
            await self._site.start()
        except BaseException:
            await self.close()
            raise
        log.info("gateway %s listening on %s", self.gateway_id, self.url)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._runner is not None, "start() first"
        sockname = self._runner.addresses[0]
        return int(sockname[1])

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:8080``."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        elif host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop: refuse new upgrades, close every socket with 1001, report their ``close``
        events, then leave NATS. Idempotent; a second caller waits for the first.
        """
        if not await self._enter_closing():
            return
        try:
            if self._site is not None:
                await self._site.stop()
            for conn in list(self._connections.values()):
                if conn.lifecycle.request_close(
                    pb.CLOSE_INITIATOR_GATEWAY, CloseCode.GOING_AWAY, "gateway shutting down"
                ):
                    conn.outbox.push(CloseFrame(CloseCode.GOING_AWAY, "gateway shutting down"))
            if self._handlers:
                # Handlers finish by reporting each close to the app over NATS, so NATS
                # must stay up until they are done.
                _, pending = await asyncio.wait(self._handlers, timeout=timeout_s)
                if pending:
                    log.warning("%d connection(s) did not finish closing in time", len(pending))
            if self._nc is not None and not self._nc.is_closed:
                with contextlib.suppress(Exception):
                    await self._nc.drain()
            if self._runner is not None:
                await self._runner.cleanup()
        finally:
            self._mark_closed()

    # -- HTTP ----------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        nc = self._nc
        if self.phase is ServicePhase.RUNNING and nc is not None and nc.is_connected:
            return web.Response(text="ready")
        return web.Response(status=503, text="not ready")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            return await self._upgrade(request)
        finally:
            self._handlers.discard(task)

    async def _upgrade(self, request: web.Request) -> web.StreamResponse:
        if not web.WebSocketResponse().can_prepare(request).ok:
            # The Cloudflare guide's check: a WebSocket route answers a plain request so.
            upgrade = request.headers.get("Upgrade", "")
            if upgrade.lower() != "websocket":
                return web.Response(status=400, text="Expected websocket")
            return web.Response(status=400, text="Invalid WebSocket handshake")
        if self.phase is not ServicePhase.RUNNING:
            return web.Response(status=503, text="Shutting down", headers={"Retry-After": "1"})

        connection_id = self._ids.next()
        offered = _offered_subprotocols(request)
        decision = await self._ask_app(request, connection_id, offered)
        if isinstance(decision, _Rejection):
            return decision.response()
        if decision.HasField("reject"):
            return _reject_response(decision.reject)
        accept = decision.accept
        if accept.subprotocol and accept.subprotocol not in offered:
            log.error("app chose subprotocol %r the client did not offer", accept.subprotocol)
            await self._report_unopened(connection_id, request.path, CloseCode.ABNORMAL)
            return web.Response(
                status=502, text="The app chose a subprotocol the client did not offer"
            )
        if self.phase is not ServicePhase.RUNNING:
            await self._report_unopened(connection_id, request.path, CloseCode.GOING_AWAY)
            return web.Response(status=503, text="Shutting down", headers={"Retry-After": "1"})

        ws = web.WebSocketResponse(protocols=(accept.subprotocol,) if accept.subprotocol else ())
        conn = LiveConnection(
            lifecycle=ConnectionLifecycle(connection_id, request.path),
            ws=ws,
            outbox=Outbox(ws, self._count_dropped),
        )
        try:
            await ws.prepare(request)
        except (ConnectionError, RuntimeError) as exc:
            log.info("client left during the handshake of %s: %s", connection_id, exc)
            await self._report_unopened(connection_id, request.path, CloseCode.ABNORMAL)
            return ws
        self._connections[connection_id] = conn
        self.stats.connections_opened += 1
        try:
            for message in accept.messages:
                self._push_message(conn, message)
            await self._read_loop(conn)
        finally:
            await conn.outbox.flush()
            event = conn.lifecycle.closed_event()
            if event is not None:
                await self._deliver(event)
            del self._connections[connection_id]
        return ws

    async def _ask_app(
        self, request: web.Request, connection_id: str, offered: list[str]
    ) -> pb.ConnectDecision | _Rejection:
        """Send the ConnectRequest; map every way that can fail to an HTTP answer."""
        assert self._nc is not None
        peer = request.transport.get_extra_info("peername") if request.transport else None
        connect = pb.ConnectRequest(
            connection_id=connection_id,
            path=request.path,
            query=request.query_string,
            headers=[pb.Header(name=k, value=v) for k, v in request.headers.items()],
            subprotocols=offered,
            remote_address=f"{peer[0]}:{peer[1]}" if peer else "",
        )
        try:
            reply = await self._nc.request(
                self._connect_subject,
                connect.SerializeToString(),
                timeout=self.config.connect_timeout_s,
            )
        except nats.errors.NoRespondersError:
            return _Rejection(503, "No worker available", {"Retry-After": "1"})
        except nats.errors.TimeoutError:
            return _Rejection(504, "The app did not answer in time")
        except nats.errors.Error as exc:
            log.warning("connect request failed: %r", exc)
            return _Rejection(503, "Bus unavailable", {"Retry-After": "1"})
        try:
            decision = pb.ConnectDecision.FromString(reply.data)
        except DecodeError:
            decision = pb.ConnectDecision()
        if decision.WhichOneof("outcome") is None:
            log.error("unreadable connect decision for %s", connection_id)
            return _Rejection(502, "Bad answer from the app")
        return decision

    async def _read_loop(self, conn: LiveConnection) -> None:
        """Forward the client's messages one at a time until the socket closes."""
        ws, lifecycle = conn.ws, conn.lifecycle
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                message = pb.Message(text=msg.data)
            elif msg.type is WSMsgType.BINARY:
                message = pb.Message(binary=msg.data)
            elif msg.type is WSMsgType.CLOSE:
                # aiohttp has already answered the close frame (autoclose); the next
                # receive() reports CLOSED.
                lifecycle.request_close(pb.CLOSE_INITIATOR_CLIENT, int(msg.data), msg.extra or "")
                continue
            elif msg.type is WSMsgType.ERROR:
                if isinstance(msg.data, WebSocketError):
                    # A protocol violation (RFC 6455 7.4.1): aiohttp already closed the
                    # socket with the matching code (1002, 1007, 1009).
                    lifecycle.request_close(
                        pb.CLOSE_INITIATOR_GATEWAY, msg.data.code, str(msg.data)
                    )
                return
            else:  # CLOSING (we are closing it) or CLOSED
                return
            if lifecycle.phase is not Phase.OPEN:
                continue  # the app or the gateway already asked to close
            self.stats.messages_in += 1
            if not await self._deliver(lifecycle.message_event(message)):
                # Seam: redelivery with the same sequence is the next step (see
                # docs/architecture.md); until then an undeliverable event ends the
                # connection so the client knows to retry.
                reason = "no worker acknowledged the message"
                if lifecycle.request_close(
                    pb.CLOSE_INITIATOR_GATEWAY, CloseCode.TRY_AGAIN_LATER, reason
                ):
                    conn.outbox.push(CloseFrame(CloseCode.TRY_AGAIN_LATER, reason))

    async def _deliver(self, event: pb.ConnectionEvent) -> bool:
        """Send one event and wait for its acknowledgement; False if none came."""
        assert self._nc is not None
        try:
            reply = await self._nc.request(
                self._events_subject,
                event.SerializeToString(),
                timeout=self.config.event_timeout_s,
            )
            ack = pb.EventAck.FromString(reply.data)
        except (nats.errors.Error, DecodeError) as exc:
            self.stats.events_failed += 1
            log.warning(
                "event %s#%d not acknowledged: %r", event.connection_id, event.sequence, exc
            )
            return False
        if ack.sequence != event.sequence:
            log.warning("ack for #%d answered event #%d", ack.sequence, event.sequence)
        return True

    async def _report_unopened(self, connection_id: str, path: str, code: int) -> None:
        """The app accepted a connection that never opened: tell it that it closed."""
        lifecycle = ConnectionLifecycle(connection_id, path)
        lifecycle.request_close(pb.CLOSE_INITIATOR_GATEWAY, code, "")
        event = lifecycle.closed_event()
        assert event is not None
        await self._deliver(event)

    # -- commands ------------------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        try:
            command = pb.GatewayCommand.FromString(msg.data)
        except DecodeError:
            command = pb.GatewayCommand()
        action = command.WhichOneof("action")
        if action is None:
            self.stats.garbage_commands += 1
            log.warning("dropped an unreadable command (%d bytes)", len(msg.data))
            return
        for connection_id in command.connection_ids:
            conn = self._connections.get(connection_id)
            if conn is None or conn.lifecycle.phase is Phase.CLOSED:
                # The connection is gone (or never was here): count it, never loop on it.
                self.stats.commands_for_unknown_connections += 1
                continue
            if action == "send":
                self._push_message(conn, command.send)
            else:
                self._push_close(conn, command.close.code, command.close.reason)

    def _push_message(self, conn: LiveConnection, message: pb.Message) -> None:
        kind = message.WhichOneof("data")
        if kind == "text":
            conn.outbox.push(message.text)
        elif kind == "binary":
            conn.outbox.push(message.binary)
        else:
            self.stats.garbage_commands += 1
            return
        self.stats.frames_out += 1

    def _push_close(self, conn: LiveConnection, code: int, reason: str) -> None:
        if not is_sendable(code) or len(reason.encode("utf-8")) > MAX_REASON_BYTES:
            # The worker SDK refuses these before sending; anything else is a bug.
            log.error("refused close code %d / reason of %d bytes", code, len(reason))
            code, reason = CloseCode.INTERNAL_ERROR, ""
        if conn.lifecycle.request_close(pb.CLOSE_INITIATOR_APP, code, reason):
            conn.outbox.push(CloseFrame(code, reason))

    def _count_dropped(self, count: int) -> None:
        self.stats.frames_dropped += count


def _offered_subprotocols(request: web.Request) -> list[str]:
    offered: list[str] = []
    for value in request.headers.getall("Sec-WebSocket-Protocol", ()):
        offered.extend(p.strip() for p in value.split(",") if p.strip())
    return offered


def _reject_response(reject: pb.Reject) -> web.Response:
    status = reject.status if 400 <= reject.status <= 599 else 500
    headers: CIMultiDict[str] = CIMultiDict((h.name, h.value) for h in reject.headers)
    if "Content-Type" not in headers:
        headers["Content-Type"] = "text/plain; charset=utf-8"
    return web.Response(status=status, body=reject.body, headers=headers)
