"""Connecting to NATS, the bus between the roles, the same way in every role.

Every NATS connection of every role is opened by :func:`connect_bus`, with the options
:func:`connect_options` makes of the role's :class:`~wsgate.config.BusConfig`:

- **Credentials**, one kind: a user and password, an nkey seed file (``nkeys_seed``) or a
  ``.creds`` file (``user_credentials``); none for a server without authentication.
- **TLS**, once a CA or a client certificate is set: an ``ssl.SSLContext`` that trusts the
  CA (or the system's CAs) and presents the client certificate, if any. The client starts
  TLS before the server speaks (``tls_handshake_first``; the server needs
  ``tls { handshake_first }``): nats-py otherwise upgrades only when the server's first
  words ask for TLS, so a server or a man in the middle that does not ask would get the
  password in the clear.
- **Request inboxes** of the role's own identity (``inbox_prefix``,
  :func:`wsgate.subjects.inbox_prefix`): the replies to its requests arrive on subjects
  that NATS permissions let only that identity read.

A permission violation the server reports (a publish or a subscription the identity's
permissions do not allow) is logged and counted by the role (``on_permission_violation``):
it is a misconfiguration or an attack, never part of normal operation. Credentials the
server refuses when the role starts end the start at once (BusRefused): no retry would
change the server's answer, and the error names the setting to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from wsgate import subjects
from wsgate.config import BusConfig
from wsgate.errors import BusRefused, BusUnavailable

log = logging.getLogger(__name__)

#: What nats-py puts in the error it reports for a refusal by the server's permissions
#: (its parser lower-cases the server's ``-ERR 'Permissions Violation for ...'``).
PERMISSION_VIOLATION = "permissions violation"

#: What the server says (``-ERR '...'``, any case) when it refuses a client's credentials.
CREDENTIALS_REFUSED = (
    "authorization violation",
    "user authentication expired",
    "user authentication revoked",
    "account authentication expired",
)


class Bus(Protocol):
    """The part of a NATS client a gateway uses: the seam between its logic and the bus.

    :func:`connect_bus` gives the real one (nats-py's client). A unit test may pass an
    in-memory one (tests/unit/gateway/reordering_bus.py) that keeps what NATS guarantees,
    each publisher's order, and nothing more.
    """

    @property
    def max_payload(self) -> int:
        """The largest message the server takes, in bytes."""
        ...

    @property
    def is_connected(self) -> bool:
        """Whether the client is connected now (draining counts as connected)."""
        ...

    @property
    def is_closed(self) -> bool:
        """Whether the client was closed for good."""
        ...

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish ``payload`` on ``subject`` (with a reply subject: a request's)."""
        ...

    async def subscribe(
        self,
        subject: str,
        queue: str = "",
        cb: Callable[[Msg], Awaitable[None]] | None = None,
    ) -> object:
        """Call ``cb`` for each message on ``subject`` (a pattern), one at a time, in the
        order they arrived."""
        ...

    # The names are nats-py's (the Protocol describes its client), so: noqa ASYNC109.
    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5) -> Msg:  # noqa: ASYNC109
        """Publish with a reply inbox and return the first answer within ``timeout`` s."""
        ...

    async def flush(self, timeout: int = 10) -> None:  # noqa: ASYNC109
        """Until the server has everything published so far (at most ``timeout`` s)."""
        ...

    async def drain(self) -> None:
        """Stop subscriptions after what they hold, publish what is buffered, close."""
        ...

    async def close(self) -> None:
        """Close at once: what is buffered is dropped."""
        ...


class BusConnector(Protocol):
    """How a role connects to the bus: :func:`connect_bus`, or a test's in-memory bus."""

    def __call__(
        self,
        config: BusConfig,
        name: str,
        *,
        role: str,
        on_connection_change: Callable[[bool], None] | None = None,
        on_permission_violation: Callable[[], None] | None = None,
    ) -> Awaitable[Bus]: ...


def tls_context(config: BusConfig) -> ssl.SSLContext | None:
    """The client-side TLS context for NATS, or None when TLS is off. Verifies the server's
    certificate and host name against ``nats_tls_ca`` (the system's CAs if empty) and
    presents ``nats_tls_cert`` when set. Raises OSError or ssl.SSLError for unreadable
    files (ConfigError has checked that they exist)."""
    if not config.nats_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.nats_tls_ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.nats_tls_cert:
        context.load_cert_chain(config.nats_tls_cert, config.nats_tls_key)
    return context


def connect_options(config: BusConfig, role: str) -> dict[str, Any]:
    """The nats-py ``connect()`` options of ``config``'s credentials, TLS and the request
    inboxes of ``role`` (``gateway``, ``worker`` or ``state``) under its identity (the node
    name). Pure but for reading the TLS files."""
    options: dict[str, Any] = {
        "servers": config.nats_servers,
        "inbox_prefix": subjects.inbox_prefix(config.prefix, role, config.node),
    }
    if config.nats_user:
        options["user"] = config.nats_user
        options["password"] = config.nats_password
    if config.nats_nkey_seed:
        options["nkeys_seed"] = config.nats_nkey_seed
    if config.nats_creds:
        options["user_credentials"] = config.nats_creds
    context = tls_context(config)
    if context is not None:
        options["tls"] = context
        options["tls_handshake_first"] = True
    return options


def is_permission_violation(exc: BaseException) -> bool:
    """Whether nats-py's error ``exc`` is the server refusing a publish or a subscription."""
    return PERMISSION_VIOLATION in str(exc).lower()


def is_credentials_refused(exc: BaseException) -> bool:
    """Whether nats-py's error ``exc`` is the server refusing the client's credentials."""
    text = str(exc).lower()
    return isinstance(exc, nats.errors.AuthorizationError) or any(
        words in text for words in CREDENTIALS_REFUSED
    )


async def connect_bus(
    config: BusConfig,
    name: str,
    *,
    role: str,
    wait_s: float = 10.0,
    on_connection_change: Callable[[bool], None] | None = None,
    on_permission_violation: Callable[[], None] | None = None,
) -> NatsClient:
    """Connect to NATS as ``name`` (shown by the server's monitoring), a process of
    ``role`` (its request inboxes, see :func:`connect_options`).

    Keeps trying for ``wait_s`` seconds, then raises BusUnavailable, so a role that cannot
    reach the bus fails at start, visibly, and its supervisor restarts it; raises
    BusRefused (a BusUnavailable) as soon as a server refuses the credentials. Once
    connected the client reconnects forever and buffers what is published meanwhile;
    ``on_connection_change(False)`` / ``(True)`` report each loss and recovery, and
    ``on_permission_violation()`` each publish or subscription the server refused.
    """
    nc = NatsClient()
    notify = on_connection_change or (lambda connected: None)
    refused = on_permission_violation or (lambda: None)
    refusal: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if is_permission_violation(exc):
            # The server drops the message (or refuses the subscription) and carries on:
            # a gap in the identity's permissions, or a process acting beyond its role.
            refused()
            log.error("nats refused this identity: %s", exc)
        elif is_credentials_refused(exc):
            # At start, the end of the attempt (below); later, on a reconnection, nats-py
            # tries again, as a rotated password or JWT may yet be accepted.
            if not refusal.done():
                refusal.set_result(exc)
            log.error("nats refused %s: %s", config.nats_credentials, exc)
        else:
            log.warning("nats: %s", exc)

    async def on_disconnected() -> None:
        notify(False)
        if nc.is_closed or nc.is_draining:
            log.debug("nats: disconnected on close")
        else:
            log.warning("nats: disconnected; reconnecting")

    async def on_reconnected() -> None:
        notify(True)
        log.info("nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

    connecting = asyncio.ensure_future(
        nc.connect(
            **connect_options(config, role),
            name=name,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=2,
            # wsgate builds every subject from tokens that are safe by construction
            # (wsgate.subjects); checking each publish again costs a regex per message.
            skip_subject_validation=True,
        )
    )
    try:
        await asyncio.wait(
            (connecting, refusal), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
        )
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            if refusal.done():
                raise BusRefused(
                    f"NATS at {config.nats_url} refused {config.nats_credentials}: "
                    f"{refusal.result()}"
                )
            raise BusUnavailable(f"cannot reach NATS at {config.nats_url} within {wait_s:g} s")
        connecting.result()  # nats-py's own errors, unchanged
    except BaseException:
        connecting.cancel()
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    return nc


async def drain_bus(nc: Bus) -> None:
    """Drain ``nc`` (its subscriptions' pending messages handled, its publishes flushed),
    then close it. If the drain fails, the connection is closed all the same and the
    drain's error raised (a role's :class:`~wsgate.supervision.Teardown` logs it)."""
    if nc.is_closed:
        return
    try:
        await nc.drain()
    except BaseException:
        if not nc.is_closed:
            await nc.close()
        raise


#: write_now leaves the buffer to nats-py's flusher once this much waits in the socket's
#: own buffer: the flusher awaits the socket's drain, which pushes back on publishers.
WRITE_NOW_MAX_QUEUED_BYTES = 64 * 1024


def write_now(nc: object) -> bool:
    """Hand what nats-py's client ``nc`` has buffered to its socket now; True if it did.

    nats-py's ``publish`` only appends to a buffer and wakes its flusher task, which
    writes in its next step: one turn of the event loop later. A role that gathers what
    it publishes over one turn (the gateway's EventBatches, a worker's GatewayBatches)
    and publishes it at the end of the turn calls this right after, so the batch leaves
    one turn sooner: at a few hundred microseconds a turn under load, a large part of a
    round trip (docs/benchmarks.md). What the flusher finds then is nothing, or what was
    published since: the order on the socket is the order published.

    It reads nats-py's private buffer (``_pending``, ``_pending_data_size``) and its
    transport's writer, so it does nothing (False) when those are not there (another
    nats-py, a test's bus), when not connected, or when the socket is already behind by
    :data:`WRITE_NOW_MAX_QUEUED_BYTES`; the flusher then writes as before.
    tests/integration/test_bus_write_now.py holds it to the installed nats-py.
    """
    pending: list[bytes] | None = getattr(nc, "_pending", None)
    if not pending or not getattr(nc, "is_connected", False):
        return False
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    if writer is None or transport is None or transport.is_closing():
        return False
    if transport.get_write_buffer_size() > WRITE_NOW_MAX_QUEUED_BYTES:
        return False
    try:
        writer.writelines(pending)
    except (OSError, RuntimeError):
        return False  # left to the flusher, which meets the error and reconnects
    nc._pending = []  # type: ignore[attr-defined]
    nc._pending_data_size = 0  # type: ignore[attr-defined]
    return True
