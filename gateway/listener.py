"""The gateway's listening socket, and what a connection goes through before its first
request reaches the app.

Each accepted TCP connection, in order:

1. **Its client.** The peer's address, unless the peer is a trusted proxy
   (``WSGATE_TRUSTED_PROXIES``) and ``WSGATE_PROXY_PROTOCOL=on``: then the connection must
   start with a PROXY header (v1 or v2), which names the client. It is read off the socket
   byte-exactly, so the TLS handshake that follows finds its first byte unread; a missing
   or malformed header closes the connection. An untrusted peer is served as direct (a
   header from it is not accepted: it would be the start of a bad request).
2. **The per-address limit** (``WSGATE_MAX_CONNECTIONS_PER_IP``). The client takes a slot
   of its address for as long as the TCP connection lives; over the limit the connection
   is closed at once. A client that reaches us through a trusted proxy's HTTP
   (``X-Forwarded-For``) is known only once its request is read: it takes its slot at the
   upgrade, which gets 429 over the limit (:meth:`Listener.hold`, called by the gateway).
3. **TLS**, when ``WSGATE_TLS_CERT`` / ``WSGATE_TLS_KEY`` are set, with the certificate
   current at that moment (``gateway/tls.py``).
4. **aiohttp's HTTP protocol** (a :class:`GuardedRequestHandler`) reads the request.

**The handshake deadline** (``WSGATE_HANDSHAKE_TIMEOUT_S``) runs from the accept: a
connection whose first request's headers have not all arrived by then is closed, with a
408 if HTTP can still answer (after the PROXY header and TLS), else just closed. aiohttp
has no such timer of its own (its keep-alive timer starts after TLS and is far longer); it
is armed here and disarmed by :func:`marking_request_started`, the server's request
factory, when a request has been read. Later requests on a kept-alive connection are bounded by
aiohttp's keep-alive timeout (``WSGATE_KEEPALIVE_TIMEOUT_S``, 75 s rather than aiohttp's
3,630): it closes a connection idle, or not done sending its next request, that long
after the previous response. It is longer than the deadline on purpose: a load balancer
reuses its connections to us, and one we close while it sends a request on it is a 502
for its client; so it must stay above the balancers' idle timeouts (60 s is common).
WebSockets are not affected (aiohttp's keep-alive timer spares a connection whose
request is being handled).

Every refusal is counted in :class:`~wsgate.gateway.metrics.GatewayMetrics`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from wsgate.config import GatewayConfig
from wsgate.gateway.client_address import ClientAddress, TrustedProxies
from wsgate.gateway.ip_limit import IpConnectionLimit
from wsgate.gateway.metrics import GatewayMetrics
from wsgate.gateway.proxy_protocol import ProxyHeader, ProxyHeaderReader, ProxyProtocolError
from wsgate.gateway.tls import ServerCertificate
from wsgate.supervision import Spawn, unsupervised

log = logging.getLogger(__name__)

#: Pending connections the kernel queues for us (aiohttp's default).
BACKLOG = 128
#: Connections accepted per wake-up of the listening socket (asyncio takes the backlog).
ACCEPT_BATCH = BACKLOG
#: When out of descriptors or memory, accepting pauses this long (as asyncio does).
ACCEPT_RETRY_S = 1.0
#: How long a TLS connection being closed waits for the peer's close_notify. Bounded so a
#: peer that never answers cannot keep a closed connection (and its address's slot) long.
TLS_SHUTDOWN_TIMEOUT_S = 5.0

RESPONSE_408 = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 16\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"Request Timeout\n"
)

_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(eq=False, slots=True)
class ConnectionTicket:
    """One TCP connection, from its accept until it closes: who it is from, the address
    slot it holds, and its handshake deadline."""

    limit: IpConnectionLimit
    #: The TCP peer.
    peer: ClientAddress
    #: The client: the peer, or the address in its PROXY header.
    client: ClientAddress
    #: The address whose slot this connection holds (None: none held).
    slot: str | None = None
    #: A request of this connection has reached the app: the deadline is met.
    started: bool = False
    closed: bool = False
    deadline: asyncio.TimerHandle | None = field(default=None, repr=False)

    def request_started(self) -> None:
        if not self.started:
            self.started = True
            self._disarm()

    def close(self) -> None:
        """Give the slot back and drop the deadline. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._disarm()
        if self.slot is not None:
            self.limit.release(self.slot)
            self.slot = None

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's HTTP protocol for one connection, with its :class:`ConnectionTicket`,
    which it closes when the connection is lost."""

    __slots__ = ("ticket",)

    def __init__(self, manager: web.Server, ticket: ConnectionTicket, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.ticket = ticket

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self.ticket.close()


def marking_request_started(factory: Any) -> Any:
    """aiohttp's request factory (``web.Server.request_factory``), marking the handshake
    deadline met on the request's connection as each request is made: its headers, at
    least, have arrived whole. A synchronous hook, where a middleware would leave two
    suspended coroutine frames (its own and aiohttp's current-app one) under every open
    WebSocket's handler for the connection's life."""

    def make_request(
        message: Any, payload: Any, protocol: Any, writer: Any, task: Any
    ) -> web.BaseRequest:
        if isinstance(protocol, GuardedRequestHandler):
            protocol.ticket.request_started()
        return factory(message, payload, protocol, writer, task)

    return make_request


@dataclass(frozen=True, slots=True)
class RequestClient:
    """The client of one request, as the per-address limit and the app see it."""

    address: ClientAddress
    #: The address that must take a slot for an upgrade: the client was named by a
    #: trusted proxy's X-Forwarded-For, so its connection's accept could not count it.
    #: None when the connection holds the slot already, or when the client is a trusted
    #: proxy itself (not limited).
    slot_at_upgrade: str | None = None


class Listener:
    """Listens on ``config.host``/``config.port`` and hands each connection, once
    admitted, to aiohttp's ``web.Server``.

    Call :meth:`start` once the server exists (after ``AppRunner.setup()``), and
    :meth:`close` before the runner's cleanup. Construction raises ConfigError when TLS
    is configured and the certificate and key cannot be loaded.
    """

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self._config = config
        self._metrics = metrics
        self._timeout_s = config.handshake_timeout_s
        self._trusted = TrustedProxies(config.trusted_networks)
        self._proxy_protocol = config.proxy_protocol == "on"
        self.limit = IpConnectionLimit(config.max_connections_per_ip)
        self.certificate: ServerCertificate | None = None
        if config.tls_cert:
            self.certificate = ServerCertificate(
                Path(config.tls_cert), Path(config.tls_key), on_reload=self._reloaded
            )
        self._server: web.Server | None = None
        self._sockets: list[socket.socket] = []
        self._admissions: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def tls(self) -> bool:
        return self.certificate is not None

    @property
    def port(self) -> int:
        """The port bound (useful with port 0)."""
        assert self._sockets, "start() first"
        return int(self._sockets[0].getsockname()[1])

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, server: web.Server, spawn: Spawn = unsupervised) -> None:
        """Bind and start accepting (the certificate's watch started with ``spawn``).
        Raises OSError if the address cannot be bound."""
        self._loop = loop = asyncio.get_running_loop()
        # Read by each connection's protocol when it is made (all of them are made here).
        server.request_factory = marking_request_started(server.request_factory)
        self._server = server
        self._sockets = await _bind(loop, self._config.host, self._config.port)
        self._accept_on()
        if self.certificate is not None:
            self._watch = spawn(
                "tls_watch", self.certificate.watch(self._config.tls_watch_interval_s)
            )

    async def close(self) -> None:
        """Stop accepting; close the connections still being admitted (those handed to
        aiohttp are the runner's to close). Idempotent."""
        self._accept_off()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for sock in self._sockets:
            sock.close()
        tasks = [t for t in (self._watch, *self._admissions) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._watch = None

    def reload_certificate(self) -> bool:
        """Reload the TLS certificate and key now (SIGHUP). False if that failed (the
        previous certificate stays) or TLS is off."""
        if self.certificate is None:
            log.info("no TLS certificate to reload (WSGATE_TLS_CERT is not set)")
            return False
        return self.certificate.reload()

    def _reloaded(self, ok: bool) -> None:
        self._metrics.tls_reloads.labels("ok" if ok else "failed").inc()

    # -- the client of a request ---------------------------------------------------------

    def client(self, request: web.Request) -> RequestClient:
        """Who sent ``request``: its connection's client, or, when that is a trusted
        proxy, the client its X-Forwarded-For names."""
        protocol = request.protocol
        if not isinstance(protocol, GuardedRequestHandler):  # not from this listener
            peer = request.transport.get_extra_info("peername") if request.transport else None
            return RequestClient(ClientAddress.of(peer[0], peer[1]) if peer else ClientAddress(""))
        connection_client = protocol.ticket.client
        if not self._trusted.trusts(connection_client.ip):
            return RequestClient(connection_client)
        forwarded = self._trusted.forwarded_client(
            connection_client, request.headers.getall("X-Forwarded-For", ())
        )
        if self._trusted.trusts(forwarded.ip):
            return RequestClient(forwarded)  # the proxy's own request
        return RequestClient(forwarded, slot_at_upgrade=forwarded.ip)

    def hold(self, client: RequestClient) -> bool:
        """Take the upgrade's slot for ``client`` if it needs one; False (counted) when
        its address is at the limit. Pair a True with :meth:`release`."""
        if client.slot_at_upgrade is None or self.limit.acquire(client.slot_at_upgrade):
            return True
        self._metrics.ip_limit_refusals.labels("upgrade").inc()
        return False

    def release(self, client: RequestClient) -> None:
        """Give back what :meth:`hold` took."""
        if client.slot_at_upgrade is not None:
            self.limit.release(client.slot_at_upgrade)

    # -- accepting -----------------------------------------------------------------------

    def _accept_on(self) -> None:
        assert self._loop is not None
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept_off(self) -> None:
        if self._loop is None:
            return
        for sock in self._sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, listening: socket.socket) -> None:
        """The listening socket is readable: accept what is queued, a batch at most."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    # Out of descriptors: the queued connection stays queued, and the socket
                    # stays readable; accepting again at once would spin.
                    log.error("cannot accept connections (%s); pausing %.0f s", exc, ACCEPT_RETRY_S)
                    self._accept_off()
                    assert self._loop is not None
                    self._resume = self._loop.call_later(ACCEPT_RETRY_S, self._accept_resume)
                    return
                continue  # this one connection failed (ECONNABORTED and the like)
            try:
                self._accepted(sock, address)
            except Exception:
                log.exception("could not take a connection from %s", address)
                sock.close()

    def _accept_resume(self) -> None:
        self._resume = None
        self._accept_on()

    def _accepted(self, sock: socket.socket, address: Any) -> None:
        assert self._loop is not None
        sock.setblocking(False)
        try:
            peer = ClientAddress.of(address[0], address[1])
        except ValueError:  # not an IP address (a scope the parser refuses, say): as it is
            peer = ClientAddress(str(address[0]), address[1])
        ticket = ConnectionTicket(limit=self.limit, peer=peer, client=peer)
        deadline = self._loop.time() + self._timeout_s
        needs_header = self._proxy_protocol and self._trusted.trusts(peer.ip)
        if not needs_header and not self._take_slot(ticket):
            sock.close()
            return
        task = self._loop.create_task(self._admit(sock, ticket, deadline, needs_header))
        self._admissions.add(task)
        task.add_done_callback(self._admissions.discard)

    def _take_slot(self, ticket: ConnectionTicket) -> bool:
        """The connection's client takes a slot of its address (a trusted proxy takes
        none: its clients are counted by their X-Forwarded-For at the upgrade)."""
        ip = ticket.client.ip
        if self._trusted.trusts(ip):
            return True
        if not self.limit.acquire(ip):
            self._metrics.ip_limit_refusals.labels("accept").inc()
            return False
        ticket.slot = ip
        return True

    async def _admit(
        self, sock: socket.socket, ticket: ConnectionTicket, deadline: float, needs_header: bool
    ) -> None:
        """PROXY header, TLS handshake, then aiohttp; each step within the deadline."""
        loop = asyncio.get_running_loop()
        metrics = self._metrics
        handed = False
        try:
            if needs_header:
                try:
                    async with asyncio.timeout_at(deadline):
                        header = await _read_proxy_header(loop, sock)
                except TimeoutError:
                    metrics.handshake_timeouts.labels("proxy").inc()
                    return
                except ProxyProtocolError as exc:
                    metrics.proxy_protocol_errors.inc()
                    log.info("closed a connection from %s: %s", ticket.peer, exc)
                    return
                except OSError as exc:
                    log.debug("connection from %s lost in its PROXY header: %s", ticket.peer, exc)
                    return
                if header.source is not None:
                    ticket.client = header.source
                if not self._take_slot(ticket):
                    return
            context = self.certificate.context if self.certificate is not None else None
            tls: dict[str, Any] = {}
            if context is not None:
                # A backstop: the deadline around the call below is what ends it.
                tls.update(
                    ssl=context,
                    ssl_handshake_timeout=self._timeout_s,
                    ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S,
                )
            try:
                async with asyncio.timeout_at(deadline):
                    _, protocol = await loop.connect_accepted_socket(
                        functools.partial(self._new_handler, ticket), sock, **tls
                    )
            except TimeoutError:
                metrics.handshake_timeouts.labels("tls").inc()
                return
            except (OSError, ssl.SSLError) as exc:
                if context is not None:
                    metrics.tls_handshake_errors.inc()
                log.debug("connection from %s failed before HTTP: %r", ticket.client, exc)
                return
            handed = True
            if not ticket.started and not ticket.closed:
                ticket.deadline = loop.call_at(deadline, self._deadline_passed, protocol)
        finally:
            if not handed:
                sock.close()
                ticket.close()

    def _new_handler(self, ticket: ConnectionTicket) -> GuardedRequestHandler:
        assert self._server is not None
        return GuardedRequestHandler(
            self._server,
            ticket,
            loop=self._loop,
            access_log=None,
            # aiohttp also starts this timer at connection_made; the deadline, normally
            # shorter, comes first for the first request.
            keepalive_timeout=self._config.keepalive_timeout_s,
        )

    def _deadline_passed(self, handler: GuardedRequestHandler) -> None:
        """The handshake deadline: no request reached the app in time."""
        ticket = handler.ticket
        ticket.deadline = None
        if ticket.started or ticket.closed:
            return
        transport = handler.transport
        if transport is None or transport.is_closing():
            return  # closing already (aiohttp answered a malformed request, say)
        self._metrics.handshake_timeouts.labels("headers").inc()
        log.debug("handshake deadline passed for %s: 408", ticket.client)
        transport.write(RESPONSE_408)
        handler.force_close()


async def _bind(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to ("" or none: all), each
    non-blocking. With port 0, all get the port the kernel picked for the first."""
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: no IPv4 on the IPv6 one.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _read_proxy_header(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> ProxyHeader:
    """Read a PROXY header off ``sock``, not one byte further. Raises ProxyProtocolError,
    or OSError if the connection fails."""
    reader = ProxyHeaderReader()
    while not reader.done:
        await _readable(loop, sock)
        try:
            # Peeked, not read: only the bytes that turn out to be the header's are read.
            available = sock.recv(reader.wanted, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not available:
            if not reader.consumed:  # nothing at all: a balancer's TCP health check
                raise ConnectionAbortedError("closed before sending anything")
            raise ProxyProtocolError("the connection ended inside its PROXY header")
        taken = reader.take(available)
        consumed = sock.recv(taken)
        assert len(consumed) == taken, "peeked bytes vanished"
    return reader.header()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until ``sock`` has something to read (or its peer closed)."""
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _set_once, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
