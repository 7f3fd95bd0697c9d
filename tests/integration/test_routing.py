"""Encoded user strings route on a real nats-server exactly as intended."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient

from tests.harness import Stack, stack_context
from wsgate import subjects
from wsgate.procs import Child, start_nats_server

GATEWAY = "edge-abcd1234"
AWKWARD = ["", "a", "a.b", "a.*", "a.>", "*", ">", "a b", " ", "ü", "a_2Eb", "~", "x" * 600]


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    server = start_nats_server(tmp_path_factory.mktemp("nats"))
    try:
        yield server
    finally:
        server.stop()


async def test_each_name_reaches_only_its_own_subscriber(nats_server: Child) -> None:
    nc = NatsClient()
    await nc.connect(nats_server.info["url"])
    try:
        subs = {
            n: await nc.subscribe(subjects.events_subject("wsgate", n, GATEWAY)) for n in AWKWARD
        }
        for name in AWKWARD:
            await nc.publish(subjects.events_subject("wsgate", name, GATEWAY), name.encode())
        # Then an end marker on every subject. NATS keeps one connection's order, so a
        # message that leaked to another subscriber would arrive there before its marker.
        for name in AWKWARD:
            await nc.publish(subjects.events_subject("wsgate", name, GATEWAY), b"<end>")
        for name, sub in subs.items():
            first = await sub.next_msg(timeout=5)
            second = await sub.next_msg(timeout=5)
            assert (first.data, second.data) == (name.encode(), b"<end>"), name
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def awkward_app_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A worker and a gateway serving an app whose name is full of subject syntax."""
    for stack in stack_context(tmp_path_factory.mktemp("awkward"), worker=False):
        stack.start_worker("wsgate.examples.app:app", "--app-name", "my.app *>")
        stack.start_gateway("--app-name", "my.app *>")
        yield stack


async def test_an_app_name_with_subject_syntax_is_served_and_isolated(
    awkward_app_stack: Stack,
) -> None:
    async with aiohttp.ClientSession() as session:
        # gateway 1 serves "my.app *>": its worker answers.
        async with session.ws_connect(awkward_app_stack.ws_url("/echo", gateway=1)) as ws:
            await ws.send_str("routed")
            assert (await ws.receive(timeout=10)).data == "routed"
        # gateway 0 serves the default app "main", which has no worker here: the
        # "my.app *>" worker must not pick up its requests through a wildcard.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(awkward_app_stack.ws_url("/echo", gateway=0))
        assert refused.value.status == 503
