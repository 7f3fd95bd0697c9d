"""Connecting to NATS, the bus between the roles, the same way in every role."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.aio.client import Client as NatsClient

from wsgate.config import BusConfig
from wsgate.errors import BusUnavailable

log = logging.getLogger(__name__)


async def connect_bus(
    config: BusConfig,
    name: str,
    *,
    wait_s: float = 10.0,
    on_connection_change: Callable[[bool], None] | None = None,
) -> NatsClient:
    """Connect to NATS as ``name`` (shown by the server's monitoring).

    Keeps trying for ``wait_s`` seconds, then raises BusUnavailable, so a role that cannot
    reach the bus fails at start, visibly, and its supervisor restarts it. Once connected
    the client reconnects forever and buffers what is published meanwhile;
    ``on_connection_change(False)`` / ``(True)`` report each loss and recovery.
    """
    nc = NatsClient()
    notify = on_connection_change or (lambda connected: None)

    async def on_error(exc: Exception) -> None:
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

    try:
        async with asyncio.timeout(wait_s):
            await nc.connect(
                servers=config.nats_servers,
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
    except TimeoutError as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        raise BusUnavailable(f"cannot reach NATS at {config.nats_url} within {wait_s:g} s") from exc
    return nc
