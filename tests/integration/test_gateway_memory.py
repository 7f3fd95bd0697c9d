"""A closed connection's objects are freed by reference counting alone, in the gateway.

The roles freeze the collector's view of start-up objects and make full collections rare
(``wsgate/cli.py``), so a reference cycle through a connection's objects keeps its socket,
request, parser and buffers alive long after it closed: under connection churn the
gateway's RSS grew by about 0.25 KB per connection. These tests churn connections with the
cyclic collector off, then ask it what it would have had to free.
"""

from __future__ import annotations

import asyncio
import collections
import gc
from collections.abc import Iterator

import aiohttp
import pytest

from tests.harness import Stack, stack_context
from wsgate.config import GatewayConfig
from wsgate.gateway.server import Gateway

pytestmark = pytest.mark.timeout(60)

#: Connections opened and closed in each test.
CONNECTIONS = 20
#: Per-connection types of the gateway and of aiohttp's server side.
_PER_CONNECTION_TYPES = {
    "wsgate.gateway.server.LiveConnection",
    "wsgate.gateway.outbox.Outbox",
    "wsgate.gateway.session.Session",
    "wsgate.gateway.session._Flight",
    "aiohttp.web_ws.WebSocketResponse",
    "aiohttp.web_request.Request",
    "aiohttp.web_protocol.RequestHandler",
    "wsgate.gateway.listener.GuardedRequestHandler",
    "wsgate.gateway.listener.ConnectionTicket",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """nats-server, state and a worker; the gateway runs in this process."""
    yield from stack_context(tmp_path_factory.mktemp("stack"), gateway=False)


def _cyclic_garbage_by_type() -> collections.Counter[str]:
    """The per-connection objects only the cyclic collector could free, by type."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return collections.Counter(
            name
            for name in (f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
            if name in _PER_CONNECTION_TYPES
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()


@pytest.mark.parametrize("path", ["/echo", "/counter/memory"])
@pytest.mark.parametrize("heartbeat_s", [30.0, 0.0])
async def test_closed_connections_leave_no_cyclic_garbage(
    stack: Stack, path: str, heartbeat_s: float
) -> None:
    config = GatewayConfig(
        host="127.0.0.1", port=0, nats_url=stack.nats_url, heartbeat_s=heartbeat_s
    )
    async with Gateway(config) as gateway, aiohttp.ClientSession() as session:
        url = gateway.url.replace("http://", "ws://", 1) + path
        gc.collect()
        gc.disable()
        try:
            for i in range(CONNECTIONS):
                async with session.ws_connect(url) as ws:
                    await ws.send_str(f"m{i}")
                    reply = await ws.receive()
                    assert reply.type is aiohttp.WSMsgType.TEXT, reply
                    await ws.close()
            # Each handler returns once its connection's close event is delivered.
            while gateway._handlers:
                await asyncio.wait(set(gateway._handlers))
            accepted = gateway.metrics.registry.get_sample_value("wsgate_gateway_connections_total")
            assert accepted == CONNECTIONS
            garbage = _cyclic_garbage_by_type()
        finally:
            gc.enable()
    assert not garbage, f"closed connections kept alive by reference cycles: {dict(garbage)}"
