"""A WebSocket client for wsgate apps: connect, send, receive, close, and (opt-in) reconnect
with exponential backoff and full jitter. Used by the tests and the tutorial.

::

    from wsgate.client import ReconnectPolicy, connect

    async with connect("ws://127.0.0.1:8080/echo", reconnect=ReconnectPolicy()) as client:
        await client.send("hello")          # a str goes as a text frame
        await client.send(b"\\x00\\x01")      # bytes go as a binary frame
        print(await client.receive(timeout=5))
        async for message in client:        # ends when the server closes with 1000
            ...

Contracts:

- **Types.** ``send(str)`` sends a text frame, ``send(bytes | bytearray | memoryview)`` a
  binary one; :meth:`Client.receive` returns ``str`` for text and ``bytes`` for binary.
- **Order.** Messages are received in the order the server sent them, across reconnects too
  (everything read from a dropped connection is delivered before anything of the next).
- **Close.** When the connection ends for good, :meth:`Client.receive` first returns what
  was already read, then raises :class:`ClientClosed` with the close code and reason (the
  server's, or the client's own after :meth:`Client.close`); so does :meth:`Client.send`.
  Async iteration instead simply ends when the close was normal (1000, or 1005: a close
  frame without a code) or the client's own, and raises otherwise.
- **Refusal.** An upgrade answered with anything but 101 raises :class:`UpgradeRefused`
  with the status, body and headers (a connect handler's ``Reject``, 404 for an unknown
  route, 503 when no worker serves the app, ...). A network failure or timeout raises
  :class:`ConnectFailed`. The first connect never retries, with or without a policy: a
  wrong URL fails at once instead of looping.
- **Reconnect** (opt-in, :class:`ReconnectPolicy`): when an open connection ends
  abnormally (no close frame: 1006, a network error, a missed heartbeat) or the server
  closes with a transient code (1001 going away, 1011, 1012 restart, 1013 try again later,
  1014), the client reconnects to the same URL after a delay drawn with full jitter,
  ``uniform(0, min(max_delay, initial_delay * multiplier ** attempt))``, as in the AWS
  Architecture Blog's "Exponential Backoff and Jitter". It keeps trying while the failures
  are network errors or retryable statuses (502, 503, 504); any other refusal (401, 404,
  ...) or ``max_attempts`` failed attempts end the client with :class:`ReconnectFailed`. A
  close by the server with any other code (1000 among them), or :meth:`Client.close`,
  ends it without reconnecting.
- **At most once across reconnects.** Nothing is replayed: a message written to a
  connection that then dropped may or may not have reached the app, and is not sent again;
  messages the server sent that were not read before the drop are lost. Only a send that
  could not be written at all (the connection was already gone) is written to the next
  connection. The server sees each reconnect as a new connection (new connection id, new
  ``on_connect``): an app-level session (a chat room joined, a subscription) must be
  re-established, which is what ``on_reconnect`` is for.
- **Send while reconnecting** waits for the next connection, at most
  ``ReconnectPolicy.send_timeout`` seconds (0: do not wait), then raises
  :class:`NotConnected`.

Errors are rooted at :class:`wsgate.errors.WsgateError`::

    WsgateError
    └── ClientError
        ├── UpgradeRefused                      the server answered the upgrade with non-101
        ├── ConnectFailed(ConnectionError)      no handshake: network error, timeout, bad reply
        ├── NotConnected(ConnectionError)       send found no open connection in time
        └── ClientClosed                        the connection ended for good (code, reason)
            └── ReconnectFailed                 ... after reconnecting failed or was refused
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as _random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ParamSpec

import aiohttp
from aiohttp.http import WebSocketError
from multidict import CIMultiDict, CIMultiDictProxy

from wsgate.closecodes import MAX_REASON_BYTES, CloseCode, is_sendable
from wsgate.errors import WsgateError

__all__ = [
    "NORMAL_CLOSE_CODES",
    "RECONNECT_CODES",
    "RETRY_STATUSES",
    "Backoff",
    "Client",
    "ClientClosed",
    "ClientError",
    "ConnectFailed",
    "Connecting",
    "NotConnected",
    "ReconnectFailed",
    "ReconnectPolicy",
    "UpgradeRefused",
    "connect",
]

log = logging.getLogger("wsgate.client")

#: Close codes after which the client reconnects (when it has a policy): the transient ones
#: and the server faults of :mod:`wsgate.closecodes`. Reconnecting after 1011 (a handler
#: raised) cannot loop on the same message: nothing is replayed.
RECONNECT_CODES: frozenset[int] = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.ABNORMAL,
        CloseCode.INTERNAL_ERROR,
        CloseCode.SERVICE_RESTART,
        CloseCode.TRY_AGAIN_LATER,
        CloseCode.BAD_GATEWAY,
    }
)

#: Upgrade statuses a reconnect attempt treats as transient: a proxy or the gateway cannot
#: serve right now (503: no worker serves the app; 504: the worker did not answer in time).
RETRY_STATUSES: frozenset[int] = frozenset({502, 503, 504})

#: Close codes that end async iteration quietly (any other code raises ClientClosed).
NORMAL_CLOSE_CODES: frozenset[int] = frozenset({CloseCode.NORMAL, CloseCode.NO_STATUS})

#: At most this much of a refusal's body is kept (a body is for people to read).
MAX_REFUSAL_BODY_BYTES = 64 * 1024


# --- errors ------------------------------------------------------------------------------


class ClientError(WsgateError):
    """Root of the errors :mod:`wsgate.client` raises."""


class UpgradeRefused(ClientError):
    """The server answered the upgrade request with ``status`` instead of 101.

    ``body`` is the response body as text (at most 64 KiB, undecodable bytes replaced) and
    ``headers`` the response headers (case-insensitive), exactly as the app's ``Reject``
    or the gateway sent them.
    """

    def __init__(self, url: str, status: int, body: str, headers: Mapping[str, str]) -> None:
        self.url = url
        self.status = status
        self.body = body
        self.headers = headers
        shown = f": {body[:200]!r}" if body else ""
        super().__init__(f"{url} refused the WebSocket upgrade with {status}{shown}")


class ConnectFailed(ClientError, ConnectionError):
    """No WebSocket handshake: the server cannot be reached, it did not answer within
    ``connect_timeout``, or its 101 reply was not a valid WebSocket handshake."""


class NotConnected(ClientError, ConnectionError):
    """:meth:`Client.send` found no open connection: the client is reconnecting and none
    came back within ``ReconnectPolicy.send_timeout``, or it never connected."""


class ClientClosed(ClientError):
    """The connection ended for good: no message will be received or sent any more.

    ``code`` and ``reason`` say how: the server's close frame when the server closed; 1006
    and an empty reason when the connection dropped without one; the code the client
    closed with when the server broke the protocol (1002, 1007, 1009: the reason is
    aiohttp's description); the client's own when ``by_client`` (after
    :meth:`Client.close`).
    """

    def __init__(self, code: int, reason: str = "", *, by_client: bool = False) -> None:
        self.code = code
        self.reason = reason
        self.by_client = by_client
        who = " by the client" if by_client else ""
        about = f" {reason!r}" if reason else ""
        super().__init__(self._describe(f"connection closed{who} with {code}{about}"))

    def _describe(self, text: str) -> str:
        return text

    def _replica(self) -> ClientClosed:
        """A copy to raise: each raise gets an exception of its own (its own traceback and
        context), while the client keeps this one as the record of how it ended."""
        twin = BaseException.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.args = self.args
        twin.__cause__ = self.__cause__
        return twin


class ReconnectFailed(ClientClosed):
    """The connection dropped (``code``, ``reason``: how) and was not re-established:
    ``attempts`` attempts failed, an attempt was refused with a status that is not
    retryable, or the ``on_reconnect`` hook raised. ``__cause__`` is the last failure."""

    def __init__(self, code: int, reason: str = "", *, attempts: int) -> None:
        self.attempts = attempts
        super().__init__(code, reason)

    def _describe(self, text: str) -> str:
        return f"{text}; gave up reconnecting after {self.attempts} attempt(s)"


# --- backoff -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconnectPolicy:
    """When and how fast a :class:`Client` reconnects. All times are in seconds.

    The n-th attempt (from 0) waits ``uniform(0, ceiling(n))`` first, where
    ``ceiling(n) = min(max_delay, initial_delay * multiplier ** n)``: "full jitter", which
    spreads the reconnects of many clients dropped together (a gateway restart) instead of
    bringing them all back at the same instants.

    - ``max_attempts``: consecutive failed attempts before giving up; ``None``: never.
    - ``reset_after``: a connection that stayed open this long resets the backoff to
      attempt 0, so a later drop starts fast again; a server that accepts and drops at
      once keeps the delays growing (and counts toward ``max_attempts``). 0 resets on every
      successful handshake.
    - ``send_timeout``: how long :meth:`Client.send` waits for a connection while
      reconnecting before raising :class:`NotConnected` (0: raise at once).
    - ``reconnect_codes``: close codes that trigger a reconnect (1006 stands for a drop
      without a close frame).
    - ``retry_statuses``: upgrade statuses a reconnect attempt retries; any other refusal
      ends the client.
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    reset_after: float = 5.0
    send_timeout: float = 10.0
    reconnect_codes: frozenset[int] = field(default=RECONNECT_CODES)
    retry_statuses: frozenset[int] = field(default=RETRY_STATUSES)

    def __post_init__(self) -> None:
        if not 0 < self.initial_delay <= self.max_delay:
            raise ValueError(
                f"need 0 < initial_delay <= max_delay, got {self.initial_delay}, {self.max_delay}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 or None, got {self.max_attempts}")
        if self.reset_after < 0 or self.send_timeout < 0:
            raise ValueError("reset_after and send_timeout must not be negative")

    def ceiling(self, attempt: int) -> float:
        """The largest delay before attempt ``attempt`` (0-based): grows by ``multiplier``
        per attempt from ``initial_delay``, capped at ``max_delay``."""
        if attempt < 0:
            raise ValueError(f"attempt must not be negative, got {attempt}")
        try:
            grown = self.initial_delay * self.multiplier**attempt
        except OverflowError:  # float ** raises rather than return inf
            return self.max_delay
        return min(self.max_delay, grown)

    def delay(self, attempt: int, draw: float) -> float:
        """The delay before attempt ``attempt`` for a uniform ``draw`` in [0, 1): full
        jitter, ``draw * ceiling(attempt)``."""
        if not 0.0 <= draw < 1.0:
            raise ValueError(f"draw must be in [0, 1), got {draw}")
        return draw * self.ceiling(attempt)


class Backoff:
    """The delays of successive reconnect attempts under ``policy``, with draws from
    ``random`` (uniform in [0, 1); inject a seeded ``random.Random(n).random`` to make the
    sequence reproducible)."""

    def __init__(
        self, policy: ReconnectPolicy, random: Callable[[], float] = _random.random
    ) -> None:
        self.policy = policy
        self._random = random
        self.attempts = 0

    def next_delay(self) -> float | None:
        """The delay before the next attempt, counting it; ``None`` once ``max_attempts``
        attempts were counted since the last :meth:`reset` (give up)."""
        limit = self.policy.max_attempts
        if limit is not None and self.attempts >= limit:
            return None
        delay = self.policy.delay(self.attempts, self._random())
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Start again from attempt 0 (after a connection that lasted)."""
        self.attempts = 0


# --- the client --------------------------------------------------------------------------


@dataclass(eq=False)
class _Link:
    """One open WebSocket connection; ``dropped`` is set once the reader saw it end."""

    ws: aiohttp.ClientWebSocketResponse
    dropped: asyncio.Event = field(default_factory=asyncio.Event)


Hook = Callable[["Client"], Awaitable[None]]


class Client:
    """A WebSocket connection to ``url`` that can outlive its TCP connections.

    Use as ``async with Client(url) as client`` (or :func:`connect`), or ``await
    client.connect()`` and later ``await client.close()``. A client connects once; after it
    closed, make a new one. Every method must be called from the event loop it connected
    on; ``send`` and ``receive`` may be called concurrently from different tasks.

    Options:

    - ``subprotocols``: offered in ``Sec-WebSocket-Protocol``; :attr:`subprotocol` is the
      one the server picked (``None`` if none).
    - ``headers``: extra request headers of the upgrade (``Authorization``, ``Origin``, ...),
      sent on every reconnect too.
    - ``reconnect``: a :class:`ReconnectPolicy`, ``True`` for the default one, or
      ``False``/``None`` (the default) to end on the first drop.
    - ``fallback_urls``: other URLs of the same app (other gateways, where no load
      balancer stands in front of them). Reconnect attempts go round the list
      ``[url, *fallback_urls]``, each to the URL after the one tried last, so the first
      attempt after a drop goes to another gateway than the one that dropped (a gateway
      draining on SIGTERM refuses new upgrades). :attr:`url` is the one in use.
    - ``on_reconnect``: awaited (in a task of its own, so it may send, receive and close)
      after each successful reconnect; for re-joining what the new connection does not
      have. If it raises, the client is closed with 1011 and ``receive`` raises
      :class:`ReconnectFailed` from the exception.
    - ``connect_timeout``: bound on each handshake; ``close_timeout``: how long
      :meth:`close` waits for the server's close frame.
    - ``heartbeat``: ping the server this often and treat a missing pong as a drop (for
      networks that lose connections silently); ``None``: only answer the server's pings.
    - ``max_message_bytes``: a larger incoming message closes the connection with 1009
      (0: no limit). ``max_queue``: messages read but not yet received; when full, the
      client stops reading and TCP pushes back on the server.
    - ``random``, ``sleep``, ``clock``: the jitter's uniform source, the backoff's sleep and
      the monotonic clock for ``reset_after``; injectable so tests run the backoff instantly
      and deterministically.
    """

    def __init__(
        self,
        url: str,
        *,
        subprotocols: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
        reconnect: ReconnectPolicy | bool | None = False,
        fallback_urls: Sequence[str] = (),
        on_reconnect: Hook | None = None,
        connect_timeout: float = 10.0,
        close_timeout: float = 10.0,
        heartbeat: float | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_queue: int = 1024,
        random: Callable[[], float] = _random.random,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(subprotocols, str):  # a str is a Sequence[str]: one letter per protocol
            raise TypeError("subprotocols must be a sequence of strings, not a string")
        if isinstance(fallback_urls, str):
            raise TypeError("fallback_urls must be a sequence of strings, not a string")
        self.urls: tuple[str, ...] = (url, *fallback_urls)
        self._url_index = 0
        self.policy: ReconnectPolicy | None = (
            ReconnectPolicy() if reconnect is True else reconnect or None
        )
        self._subprotocols = tuple(subprotocols)
        self._headers = dict(headers or {})
        self._on_reconnect = on_reconnect
        self._connect_timeout = connect_timeout
        self._ws_timeout = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=close_timeout)
        self._heartbeat = heartbeat
        self._max_message_bytes = max_message_bytes
        self._sleep = sleep
        self._clock = clock
        self._backoff = Backoff(self.policy, random) if self.policy is not None else None

        self._session: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task[None] | None = None
        self._hooks: set[asyncio.Task[None]] = set()
        # Messages read and not yet received; None marks the end (see receive()).
        self._inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue(max_queue)
        self._link: _Link | None = None
        # Set while a connection is open or the client has ended: what send() waits for.
        self._ready = asyncio.Event()
        self._final: ClientClosed | None = None
        self._ended = asyncio.Event()  # set with _final
        self._closing = False  # close() has begun: the reader must not reconnect
        self._closed_event = asyncio.Event()  # close() has finished
        self._refusal_body: bytes = b""
        self._subprotocol: str | None = None
        self._connected_at = 0.0
        self._reconnects = 0
        self._drops: list[tuple[int, str]] = []

    # --- state ---

    @property
    def url(self) -> str:
        """The URL of the current connection (or of the attempt under way)."""
        return self.urls[self._url_index]

    @property
    def connected(self) -> bool:
        """A connection is open now (``False`` while reconnecting and after the end)."""
        return self._link is not None and self._final is None

    @property
    def closed(self) -> bool:
        """The client has ended: nothing more will be sent or received (messages already
        read may still be received)."""
        return self._final is not None

    @property
    def close_code(self) -> int | None:
        """The close code that ended the client (see :class:`ClientClosed`), else None."""
        return self._final.code if self._final is not None else None

    @property
    def close_reason(self) -> str | None:
        """The close reason that ended the client, else None."""
        return self._final.reason if self._final is not None else None

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the server picked for the latest connection (None: none)."""
        return self._subprotocol

    @property
    def reconnects(self) -> int:
        """How many times the client reconnected successfully."""
        return self._reconnects

    @property
    def drops(self) -> tuple[tuple[int, str], ...]:
        """(close code, reason) of every connection that dropped and was reconnected
        from, oldest first (1006 for a drop without a close frame)."""
        return tuple(self._drops)

    async def wait_closed(self) -> ClientClosed:
        """Wait until the client has ended (see :attr:`closed`); returns how, without
        raising it."""
        await self._ended.wait()
        assert self._final is not None
        return self._final._replica()

    # --- connecting ---

    async def connect(self) -> Client:
        """Open the first connection and start reading. Returns the client.

        Raises :class:`UpgradeRefused` or :class:`ConnectFailed` at once, without retrying
        (a reconnect policy applies only to connections that were open); ``connect`` may
        then be called again.
        """
        if self._session is not None or self._closing:
            raise RuntimeError("a Client connects once; make a new one")
        # No session-wide timeout: connect_timeout bounds the handshake, and an open
        # WebSocket has no deadline.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), middlewares=(self._keep_refusal_body,)
        )
        try:
            ws = await self._open()
        except BaseException:
            await self._session.close()
            self._session = None  # a failed first connect may be tried again
            raise
        self._adopt(ws)
        self._reader = asyncio.create_task(self._read_loop(), name=f"wsgate.client {self.url}")
        return self

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _keep_refusal_body(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Read the body of a refused upgrade: aiohttp raises its handshake error without
        it, and what a connect handler's ``Reject`` says is the useful part."""
        response = await handler(request)
        if response.status != 101:
            chunks: list[bytes] = []
            size = 0
            # A body cut short is still the refusal: keep what came, so the status decides
            # (a 401 must not turn into a retried network error).
            with contextlib.suppress(aiohttp.ClientError, OSError):
                while size < MAX_REFUSAL_BODY_BYTES:
                    chunk = await response.content.read(MAX_REFUSAL_BODY_BYTES - size)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            self._refusal_body = b"".join(chunks)
        return response

    async def _open(self) -> aiohttp.ClientWebSocketResponse:
        """One handshake, bounded by connect_timeout."""
        assert self._session is not None
        self._refusal_body = b""
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await self._session.ws_connect(
                    self.url,
                    protocols=self._subprotocols,
                    headers=self._headers,
                    timeout=self._ws_timeout,
                    heartbeat=self._heartbeat,
                    max_msg_size=self._max_message_bytes,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 101:  # upgraded, but not a valid WebSocket handshake
                raise ConnectFailed(f"{self.url}: bad handshake: {exc.message}") from exc
            headers = CIMultiDictProxy(CIMultiDict(exc.headers or {}))
            body = self._refusal_body.decode("utf-8", errors="replace")
            raise UpgradeRefused(self.url, exc.status, body, headers) from exc
        except TimeoutError as exc:
            raise ConnectFailed(
                f"{self.url}: no handshake within {self._connect_timeout} s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectFailed(f"{self.url}: {exc or type(exc).__name__}") from exc

    def _adopt(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._link = _Link(ws)
        self._subprotocol = ws.protocol
        self._connected_at = self._clock()
        self._ready.set()

    # --- sending and receiving ---

    async def send(self, message: str | bytes | bytearray | memoryview) -> None:
        """Send one message: ``str`` as a text frame, bytes-like as a binary frame.

        Returns once the frame is handed to the connection, which is no proof of delivery
        (see "at most once" in the module docstring). While reconnecting, waits up to
        ``policy.send_timeout`` for the next connection. Raises :class:`ClientClosed` once
        the client has ended, :class:`NotConnected` if no connection came in time.
        """
        if isinstance(message, str):
            data, opcode = message.encode(), aiohttp.WSMsgType.TEXT
        elif isinstance(message, bytes | bytearray | memoryview):
            # A bytearray or memoryview is copied: the caller may change it while we wait.
            data = message if isinstance(message, bytes) else bytes(message)
            opcode = aiohttp.WSMsgType.BINARY
        else:
            raise TypeError(f"message must be str or bytes-like, not {type(message).__name__}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.policy.send_timeout if self.policy else 0.0)
        while True:
            link = await self._link_for_send(deadline)
            try:
                await link.ws.send_frame(data, opcode)
                return
            except ConnectionError:
                # aiohttp refuses to write to a transport that is closing: the frame was not
                # written, so it may go on the next connection without breaking at-most-once.
                # Wait (bounded) for the reader to see the drop and decide what comes next.
                remaining = max(deadline - loop.time(), self._ws_timeout.ws_close or 0.0)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await link.dropped.wait()
                if self._closing:  # close() is under way: report how it ends
                    await self._ended.wait()
                if self.policy is None or self._final is not None:
                    raise self._ended_error() from None
                if not link.dropped.is_set() or self._link is link:
                    # No sign of the reader moving on: do not spin on a dead connection.
                    raise NotConnected(f"{self.url}: the connection broke") from None

    async def _link_for_send(self, deadline: float) -> _Link:
        while True:
            if self._closing:  # nothing may follow our close frame: report how it ends
                await self._ended.wait()
            if self._final is not None:
                raise self._final._replica()
            if self._link is not None:
                return self._link
            if self._session is None:
                raise NotConnected(f"{self.url}: not connected yet; call connect() first")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise NotConnected(f"{self.url}: reconnecting, and no connection came in time")
            try:
                async with asyncio.timeout(remaining):
                    await self._ready.wait()
            except TimeoutError:
                raise NotConnected(
                    f"{self.url}: reconnecting, and no connection came in time"
                ) from None

    def _ended_error(self) -> ClientClosed:
        if self._final is not None:
            return self._final._replica()
        return ClientClosed(CloseCode.ABNORMAL, "connection lost")

    async def receive(self, timeout: float | None = None) -> str | bytes:  # noqa: ASYNC109
        """The next message: ``str`` for text, ``bytes`` for binary.

        Waits at most ``timeout`` seconds (``None``: no bound) and raises ``TimeoutError``
        then; the client stays usable. Reconnects are invisible here. After the end,
        returns the messages already read, then raises :class:`ClientClosed` (or
        :class:`ReconnectFailed`) every time.
        """
        if self._session is None and self._final is None:
            raise NotConnected(f"{self.url}: not connected yet; call connect() first")
        if self._final is not None and self._inbox.empty():
            raise self._final._replica()
        async with asyncio.timeout(timeout):
            item = await self._inbox.get()
        if item is None:
            # The end marker: leave it for any other task waiting here.
            self._inbox.put_nowait(None)
            raise self._ended_error()
        return item

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self

    async def __anext__(self) -> str | bytes:
        """The next message; stops after a normal close or the client's own close, raises
        :class:`ClientClosed` after any other."""
        try:
            return await self.receive()
        except ClientClosed as closed:
            quiet = not isinstance(closed, ReconnectFailed) and (
                closed.by_client or closed.code in NORMAL_CLOSE_CODES
            )
            if quiet:
                raise StopAsyncIteration from None
            raise

    # --- closing ---

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close with ``code`` and ``reason`` and wait (up to ``close_timeout``) for the
        server's close frame; stop reconnecting. Idempotent: a client that already ended
        (or is ending) only releases what it holds. ``code`` must be one an endpoint may
        send (1000, 1001, ..., 3000-4999) and ``reason`` at most 123 bytes of UTF-8.
        """
        if not is_sendable(code):
            raise ValueError(f"close code {code} may not be sent (RFC 6455 7.4)")
        if len(reason.encode()) > MAX_REASON_BYTES:
            raise ValueError(f"close reason is over {MAX_REASON_BYTES} bytes of UTF-8")
        await self._shut(code, reason, ClientClosed(code, reason, by_client=True))

    async def _shut(self, code: int, reason: str, ending: ClientClosed) -> None:
        if self._closing:
            if asyncio.current_task() not in self._hooks:
                await self._closed_event.wait()
            return
        self._closing = True
        try:
            if self._final is None:
                link = self._link
                if link is not None:
                    # Also breaks the reader out of its receive(): it sees the close and
                    # stops, seeing _closing.
                    await self._close_ws(link.ws, code, reason)
                await self._stop_reader()
                # The reader may have opened a new connection just before it was stopped.
                if self._link is not None and self._link is not link:
                    await self._close_ws(self._link.ws, code, reason)
                self._finish(ending)
            await self._stop_reader()
            current = asyncio.current_task()
            for hook in list(self._hooks):
                if hook is not current:
                    hook.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await hook
            await self._release()
        finally:
            if self._final is None:  # close() itself was cancelled: still end the client
                self._finish(ending)
                if self._reader is not None:
                    self._reader.cancel()
            self._closed_event.set()

    async def _close_ws(self, ws: aiohttp.ClientWebSocketResponse, code: int, reason: str) -> None:
        if not ws.closed:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await ws.close(code=code, message=reason.encode())

    async def _stop_reader(self) -> None:
        reader = self._reader
        if reader is None or reader is asyncio.current_task():
            return
        if self._final is None:
            reader.cancel()
        # Else it has ended the client and is only releasing the session: let it finish.
        with contextlib.suppress(asyncio.CancelledError):
            await reader

    async def _release(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _finish(self, ending: ClientClosed, cause: BaseException | None = None) -> None:
        """Record how the client ended (the first record wins) and wake everyone waiting."""
        if self._final is not None:
            return
        if cause is not None:
            ending.__cause__ = cause
        self._final = ending
        self._ended.set()
        if self._link is not None:
            self._link.dropped.set()
        self._link = None
        self._ready.set()
        with contextlib.suppress(asyncio.QueueFull):
            # When full, receive() finds _final once it has drained the queue.
            self._inbox.put_nowait(None)

    # --- the reader task ---

    async def _read_loop(self) -> None:
        """Read every connection in turn into the inbox; reconnect or end on a drop."""
        try:
            while True:
                link = self._link
                assert link is not None
                code, reason, error = await self._pump(link.ws)
                link.dropped.set()
                if self._closing:
                    return
                if self.policy is None or code not in self.policy.reconnect_codes:
                    self._finish(ClientClosed(code, reason), cause=error)
                    break
                log.info("%s: dropped with %s %r; reconnecting", self.url, code, reason)
                self._drops.append((code, reason))
                if not await self._reconnect(code, reason, error):
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave receivers waiting forever
            log.exception("%s: the client's reader failed", self.url)
            self._finish(ClientClosed(CloseCode.ABNORMAL, "client reader failed"), cause=exc)
        await self._release()

    async def _pump(
        self, ws: aiohttp.ClientWebSocketResponse
    ) -> tuple[int, str, BaseException | None]:
        """Move messages into the inbox until the connection ends; how it ended."""
        while True:
            msg = await ws.receive()
            kind = msg.type
            if kind is aiohttp.WSMsgType.TEXT or kind is aiohttp.WSMsgType.BINARY:
                await self._inbox.put(msg.data)
            elif kind is aiohttp.WSMsgType.CLOSE:
                # The server's close frame (aiohttp has answered it). 0: it carried no code.
                return int(msg.data) or CloseCode.NO_STATUS, msg.extra or "", None
            elif kind is aiohttp.WSMsgType.ERROR:
                error = msg.data if isinstance(msg.data, BaseException) else None
                if isinstance(error, WebSocketError):
                    # The server broke the protocol; aiohttp closed with the code for it
                    # (1002, 1007, 1009).
                    return error.code, str(error)[:MAX_REASON_BYTES], error
                return CloseCode.ABNORMAL, "", error  # a drop (a missed heartbeat, ...)
            else:
                # CLOSED (the TCP connection ended without a close frame: aiohttp may call
                # that 1000, but nothing was said, so it is a drop) or CLOSING (close()).
                return CloseCode.ABNORMAL, "", ws.exception()

    async def _reconnect(self, code: int, reason: str, error: BaseException | None) -> bool:
        """Connect again under the policy. True when connected; False when it gave up (the
        client has then ended with ReconnectFailed)."""
        policy, backoff = self.policy, self._backoff
        assert policy is not None
        assert backoff is not None
        self._link = None
        self._ready.clear()
        if self._clock() - self._connected_at >= policy.reset_after:
            backoff.reset()
        last = error
        while True:
            delay = backoff.next_delay()
            if delay is None:
                self._finish(ReconnectFailed(code, reason, attempts=backoff.attempts), last)
                return False
            log.debug("%s: reconnect attempt %d in %.3f s", self.url, backoff.attempts, delay)
            await self._sleep(delay)
            self._url_index = (self._url_index + 1) % len(self.urls)
            try:
                ws = await self._open()
            except UpgradeRefused as refused:
                last = refused
                if refused.status not in policy.retry_statuses:
                    self._finish(ReconnectFailed(code, reason, attempts=backoff.attempts), last)
                    return False
                log.info("%s: reconnect refused with %s; retrying", self.url, refused.status)
                continue
            except ConnectFailed as failed:
                last = failed
                log.info("%s: reconnect failed (%s); retrying", self.url, failed)
                continue
            self._adopt(ws)
            self._reconnects += 1
            log.info("%s: reconnected after %d attempt(s)", self.url, backoff.attempts)
            if self._on_reconnect is not None:
                hook = asyncio.create_task(self._run_hook(self._on_reconnect, backoff.attempts))
                self._hooks.add(hook)
                hook.add_done_callback(self._hooks.discard)
            return True

    async def _run_hook(self, hook: Hook, attempts: int) -> None:
        try:
            await hook(self)
        except Exception as exc:
            log.warning("%s: on_reconnect raised; closing", self.url, exc_info=True)
            ending = ReconnectFailed(
                CloseCode.INTERNAL_ERROR, "on_reconnect failed", attempts=attempts
            )
            ending.__cause__ = exc
            await self._shut(CloseCode.INTERNAL_ERROR, "on_reconnect failed", ending)


# --- connect() ---------------------------------------------------------------------------


class Connecting:
    """What :func:`connect` returns: await it for a connected :class:`Client` (close it
    yourself), or use it as ``async with`` (closed on exit)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self.client.connect().__await__()

    async def __aenter__(self) -> Client:
        return await self.client.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.client.close()


_P = ParamSpec("_P")


def _connecting(make: Callable[_P, Client]) -> Callable[_P, Connecting]:
    def connect(*args: _P.args, **kwargs: _P.kwargs) -> Connecting:
        """Connect a :class:`Client` (same arguments)::

        async with connect(url, reconnect=True) as client: ...
        client = await connect(url)  # then: await client.close()
        """
        return Connecting(make(*args, **kwargs))

    return connect


connect = _connecting(Client)
