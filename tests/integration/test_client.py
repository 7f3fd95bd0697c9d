"""wsgate.client against real servers.

Two kinds: a real stack (nats, state, workers, gateways as processes) for what users see of
wsgate itself, and a small scripted aiohttp server in the test process for reconnect paths
a real stack cannot produce on cue (a 503 on the third attempt, a connection that "lasted"
an hour). The backoff's sleep, random source and clock are injected: reconnects happen at
once and the delays the client computed are asserted exactly.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Stack, stack_context
from wsgate.client import (
    Client,
    ClientClosed,
    ConnectFailed,
    NotConnected,
    ReconnectFailed,
    ReconnectPolicy,
    UpgradeRefused,
    connect,
)

pytestmark = pytest.mark.timeout(60)

EXAMPLES, PROBE = 0, 1  # gateway indexes: examples.app, tests.apps.probe (app name "probe")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack serving two apps: examples.app on gateway 0 and the probe app (under its
    own app name, with its own worker) on gateway 1."""
    for s in stack_context(tmp_path_factory.mktemp("client")):
        s.start_worker("tests.apps.probe:app", "--app-name", "probe")
        s.start_gateway("--app-name", "probe")
        yield s


class Sleeps:
    """An injected sleep: records each delay and returns at once (or, when ``gate`` is
    given, once the test opens it), so a test sees the backoff without waiting it out."""

    def __init__(self, gate: asyncio.Event | None = None, clock: FakeClock | None = None):
        self.delays: list[float] = []
        self.started = asyncio.Event()
        self._gate = gate
        self._clock = clock

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self._clock is not None:
            self._clock.now += delay
        self.started.set()
        if self._gate is not None:
            await self._gate.wait()


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def text(message: str | bytes) -> str:
    assert isinstance(message, str), f"expected a text message, got {message!r}"
    return message


async def drain(client: Client, into: list[str | bytes]) -> None:
    async for message in client:
        into.append(message)


def draws(seed: int, count: int) -> list[float]:
    source = random.Random(seed)
    return [source.random() for _ in range(count)]


# --- against the real stack --------------------------------------------------------------


async def test_text_stays_text_and_binary_stays_binary(stack: Stack) -> None:
    async with connect(stack.ws_url("/echo", EXAMPLES)) as client:
        assert client.connected
        sent: list[str | bytes] = ["hello", "", "héllo wörld ✓", "x" * 70_000]
        sent += [b"\x00\x01\xff", b"", bytes(range(256)) * 300, b"text-like bytes"]
        for message in sent:
            await client.send(message)
            got = await client.receive(timeout=10)
            assert type(got) is type(message)
            assert got == message
        await client.send(bytearray(b"from a bytearray"))
        await client.send(memoryview(b"from a memoryview"))
        assert await client.receive(timeout=10) == b"from a bytearray"
        assert await client.receive(timeout=10) == b"from a memoryview"
        with pytest.raises(TypeError, match="str or bytes-like"):
            await client.send(42)  # type: ignore[arg-type]
    assert client.closed
    assert (client.close_code, client.close_reason) == (1000, "")


async def test_a_refused_upgrade_raises_upgrade_refused_with_status_body_and_headers(
    stack: Stack,
) -> None:
    sleeps = Sleeps()
    with pytest.raises(UpgradeRefused) as refused:
        # A policy changes nothing for the first connect: a refusal is never retried there.
        await connect(stack.ws_url("/private/echo?token=wrong"), reconnect=True, sleep=sleeps)
    assert refused.value.status == 401
    assert refused.value.body == "Missing or wrong token"
    assert refused.value.headers["WWW-Authenticate"] == "Bearer"
    assert refused.value.headers["www-authenticate"] == "Bearer"
    assert "401" in str(refused.value)
    assert sleeps.delays == []

    with pytest.raises(UpgradeRefused) as missing:
        await connect(stack.ws_url("/no/such/route", EXAMPLES))
    assert missing.value.status == 404

    async with connect(stack.ws_url("/private/echo?token=let-me-in")) as client:
        await client.send("inside")
        assert await client.receive(timeout=10) == "inside"


async def test_the_server_close_code_and_reason_surface_as_client_closed(stack: Stack) -> None:
    async with connect(stack.ws_url("/control", PROBE)) as client:
        assert text(await client.receive(timeout=10)).startswith("id ")
        await client.send("close 4001 see you later")
        with pytest.raises(ClientClosed) as closed:
            await client.receive(timeout=10)
        assert (closed.value.code, closed.value.reason) == (4001, "see you later")
        assert not closed.value.by_client
        assert client.closed
        assert not client.connected
        assert (client.close_code, client.close_reason) == (4001, "see you later")
        with pytest.raises(ClientClosed) as again:  # every later call says the same
            await client.receive()
        assert again.value.code == 4001
        with pytest.raises(ClientClosed):
            await client.send("anyone?")
        with pytest.raises(ClientClosed):  # not a normal close: iteration raises
            async for _ in client:
                pass
    # Closing after the server did changes nothing.
    assert (client.close_code, client.close_reason) == (4001, "see you later")


async def test_1012_without_a_policy_ends_the_client(stack: Stack) -> None:
    async with connect(stack.ws_url("/control", PROBE)) as client:
        await client.receive(timeout=10)
        await client.send("close 1012 restarting")
        with pytest.raises(ClientClosed) as closed:
            await client.receive(timeout=10)
        assert not isinstance(closed.value, ReconnectFailed)
        assert (closed.value.code, closed.value.reason) == (1012, "restarting")


async def test_async_iteration_ends_on_a_normal_close(stack: Stack) -> None:
    async with connect(stack.ws_url("/control", PROBE)) as client:
        received = []
        async for message in client:
            received.append(message)
            if len(received) == 1:
                await client.send("echo this")
            elif len(received) == 2:
                await client.send("close 1000 done")
        assert text(received[0]).startswith("id ")
        assert received[1:] == ["echo this"]
        assert (client.close_code, client.close_reason) == (1000, "done")


async def test_the_subprotocol_is_the_one_the_app_picked(stack: Stack) -> None:
    async with connect(stack.ws_url("/control", PROBE), subprotocols=("a.v1", "b.v1")) as client:
        assert client.subprotocol == "b.v1"
    async with connect(stack.ws_url("/control", PROBE), subprotocols=["a.v1"]) as client:
        assert client.subprotocol is None


async def test_reconnects_after_the_server_closes_with_1012(stack: Stack) -> None:
    sleeps = Sleeps()
    reconnected = asyncio.Event()

    async def on_reconnect(client: Client) -> None:
        reconnected.set()

    policy = ReconnectPolicy(initial_delay=0.2, max_delay=5.0)
    async with connect(
        stack.ws_url("/control", PROBE),
        reconnect=policy,
        on_reconnect=on_reconnect,
        random=random.Random(3).random,
        sleep=sleeps,
    ) as client:
        first = await client.receive(timeout=10)
        await client.send("close 1012 restarting")
        # The next message is the new connection's greeting: the drop is invisible here.
        second = await client.receive(timeout=10)
        assert text(second).startswith("id ")
        assert second != first
        await asyncio.wait_for(reconnected.wait(), 10)
        assert client.reconnects == 1
        assert client.connected
        await client.send("still here")
        assert await client.receive(timeout=10) == "still here"
    assert sleeps.delays == pytest.approx([draws(3, 1)[0] * 0.2])


async def test_reconnects_when_the_gateway_is_killed_and_another_starts_on_its_port(
    stack: Stack,
) -> None:
    gateway = await asyncio.to_thread(stack.start_gateway, "--app-name", "probe")
    port = int(gateway.info["port"])
    url = str(gateway.info["url"]).replace("http://", "ws://", 1) + "/control"
    reconnected = asyncio.Event()

    async def rejoin(client: Client) -> None:
        await client.send("rejoined")  # what a chat client does: join its room again
        reconnected.set()

    # Real sleeps: the client retries against a closed port until the new gateway is up.
    policy = ReconnectPolicy(initial_delay=0.05, max_delay=0.5, send_timeout=30)
    async with connect(url, reconnect=policy, on_reconnect=rejoin) as client:
        first = await client.receive(timeout=10)
        await client.send("before")
        assert await client.receive(timeout=10) == "before"

        await asyncio.to_thread(stack.kill, gateway)
        await asyncio.to_thread(stack.start_gateway, "--app-name", "probe", "--port", str(port))
        await asyncio.wait_for(reconnected.wait(), 30)

        second = await client.receive(timeout=10)
        assert text(second).startswith("id ")
        assert second != first
        assert await client.receive(timeout=10) == "rejoined"
        await client.send("after")
        assert await client.receive(timeout=10) == "after"
        assert client.reconnects == 1


# --- against a scripted in-process server ------------------------------------------------


@dataclass
class Refuse:
    status: int
    body: str = ""


@dataclass
class Accept:
    """Accept; send ``greet``; then close with ``close``, or echo until the client closes
    when ``close`` is None. With ``lasts``, wait for one message before closing and
    advance the fake clock by ``lasts``: the connection "stayed open" that long."""

    greet: tuple[str, ...] = ()
    close: int | None = None
    reason: str = ""
    lasts: float = 0.0


@dataclass
class Script:
    """Answers the n-th upgrade with ``steps[n]``; the last step repeats."""

    steps: list[Refuse | Accept]
    clock: FakeClock | None = None
    attempts: int = 0
    received: list[list[str | bytes]] = field(default_factory=list)
    closes: list[tuple[int, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        step = self.steps[min(self.attempts, len(self.steps) - 1)]
        self.attempts += 1
        if isinstance(step, Refuse):
            return web.Response(status=step.status, text=step.body)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for text in step.greet:
            await ws.send_str(text)
        if step.close is not None:
            if step.lasts:
                await ws.receive()
                assert self.clock is not None
                self.clock.now += step.lasts
            await ws.close(code=step.close, message=step.reason.encode())
            return ws
        got: list[str | bytes] = []
        self.received.append(got)
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                got.append(msg.data)
                await ws.send_str(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                got.append(msg.data)
                await ws.send_bytes(msg.data)
            else:
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    self.closes.append((msg.data, msg.extra or ""))
                return ws


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    """Start a scripted server; returns its ws:// URL."""
    runners: list[web.AppRunner] = []

    async def start(script: Script) -> str:
        app = web.Application()
        app.router.add_get("/ws", script.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return f"ws://127.0.0.1:{port}/ws"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_retryable_refusals_are_retried_with_the_computed_backoff(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    script = Script(
        [Accept(("one",), close=1012), Refuse(503), Refuse(502), Refuse(504), Accept(("two",))]
    )
    sleeps = Sleeps()
    hooks: list[int] = []

    async def rejoin(client: Client) -> None:
        hooks.append(client.reconnects)
        await client.send("rejoin")

    policy = ReconnectPolicy(initial_delay=1.0, max_delay=6.0, multiplier=2.0)
    url = await serve(script)
    async with Client(
        url, reconnect=policy, on_reconnect=rejoin, random=random.Random(42).random, sleep=sleeps
    ) as client:
        # Everything arrives in order, the drop and three refusals in between invisible.
        assert [await client.receive(timeout=5) for _ in range(3)] == ["one", "two", "rejoin"]
        assert client.reconnects == 1
        assert hooks == [1]
    assert script.attempts == 5
    ceilings = [1.0, 2.0, 4.0, 6.0]
    assert sleeps.delays == pytest.approx(
        [d * c for d, c in zip(draws(42, 4), ceilings, strict=True)]
    )
    assert script.closes == [(1000, "")]


async def test_reconnect_attempts_go_round_the_fallback_urls(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    # A gateway going away (1001) and refusing from then on (503, draining), a second one
    # refusing too, a third one serving: each attempt goes to the next URL, round the list.
    draining = Script([Accept(("first",), close=1001), Refuse(503)])
    refusing = Script([Refuse(503)])
    serving = Script([Accept(("second",), close=1001), Accept(("third",))])
    urls = [await serve(script) for script in (draining, refusing, serving)]
    policy = ReconnectPolicy(initial_delay=0.01, max_delay=0.01)
    async with Client(urls[0], fallback_urls=urls[1:], reconnect=policy, sleep=Sleeps()) as c:
        assert c.urls == tuple(urls)
        assert await c.receive(timeout=5) == "first"
        assert await c.receive(timeout=5) == "second"
        # The third one dropped too: round the list, past the two refusing, back to it.
        assert await c.receive(timeout=5) == "third"
        await c.send("still here")
        assert await c.receive(timeout=5) == "still here"
        assert c.url == urls[2]
        assert c.reconnects == 2
        assert c.drops == ((1001, ""), (1001, ""))
    assert (draining.attempts, refusing.attempts, serving.attempts) == (2, 2, 2)


def test_fallback_urls_must_be_a_sequence_of_urls() -> None:
    with pytest.raises(TypeError, match="fallback_urls"):
        Client("ws://127.0.0.1:1/a", fallback_urls="ws://127.0.0.1:1/b")


async def test_a_refusal_that_is_not_retryable_ends_the_reconnecting(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    script = Script([Accept(("hi",), close=1001, reason="bye"), Refuse(401, "go away")])
    sleeps = Sleeps()
    url = await serve(script)
    async with connect(url, reconnect=True, sleep=sleeps) as client:
        received: list[str | bytes] = []
        with pytest.raises(ReconnectFailed) as failed:  # a failed reconnect is no normal end
            await drain(client, received)
        assert received == ["hi"]
    assert (failed.value.code, failed.value.reason, failed.value.attempts) == (1001, "bye", 1)
    cause = failed.value.__cause__
    assert isinstance(cause, UpgradeRefused)
    assert (cause.status, cause.body) == (401, "go away")
    assert len(sleeps.delays) == 1
    assert script.attempts == 2


async def test_max_attempts_gives_up_with_reconnect_failed(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    script = Script([Accept(close=1013, reason="busy"), Refuse(503, "later")])
    sleeps = Sleeps()
    policy = ReconnectPolicy(initial_delay=0.1, max_attempts=3)
    url = await serve(script)
    async with connect(url, reconnect=policy, sleep=sleeps, random=lambda: 0.5) as client:
        with pytest.raises(ReconnectFailed) as failed:
            await client.receive(timeout=5)
        assert client.closed
        assert client.close_code == 1013
    assert failed.value.attempts == 3
    assert isinstance(failed.value.__cause__, UpgradeRefused)
    assert sleeps.delays == pytest.approx([0.05, 0.1, 0.2])
    assert script.attempts == 1 + 3


async def test_the_backoff_resets_only_after_a_connection_that_lasted(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    clock = FakeClock()
    script = Script(
        [
            Accept(close=1012),  # dropped at once: attempt 0
            Accept(close=1012),  # dropped at once again: attempt 1, no reset
            Accept(close=1012, lasts=60.0),  # lasted past reset_after: back to attempt 0
            Accept(("settled",)),
        ],
        clock=clock,
    )
    hooks = 0

    async def on_reconnect(client: Client) -> None:
        nonlocal hooks
        hooks += 1
        if hooks == 2:
            await client.send("tick")  # the third connection waits for it: clock moves on

    sleeps = Sleeps(clock=clock)
    policy = ReconnectPolicy(initial_delay=1.0, max_delay=100.0, reset_after=30.0)
    url = await serve(script)
    async with connect(
        url,
        reconnect=policy,
        on_reconnect=on_reconnect,
        sleep=sleeps,
        random=lambda: 0.5,
        clock=clock,
    ) as c:
        assert await c.receive(timeout=5) == "settled"
        assert c.reconnects == 3
    assert sleeps.delays == pytest.approx([0.5, 1.0, 0.5])


async def test_a_normal_close_by_the_server_is_not_reconnected(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    script = Script([Accept(("a", "b"), close=1000, reason="done"), Accept(("again",))])
    sleeps = Sleeps()
    url = await serve(script)
    async with connect(url, reconnect=True, sleep=sleeps) as client:
        assert [message async for message in client] == ["a", "b"]
        assert (client.close_code, client.close_reason) == (1000, "done")
    assert sleeps.delays == []
    assert script.attempts == 1


async def test_send_while_reconnecting_waits_for_the_next_connection(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    script = Script([Accept(("hi",), close=1012), Accept()])
    gate = asyncio.Event()
    sleeps = Sleeps(gate=gate)
    policy = ReconnectPolicy(send_timeout=30.0)
    url = await serve(script)
    async with connect(url, reconnect=policy, sleep=sleeps) as client:
        assert await client.receive(timeout=5) == "hi"
        await asyncio.wait_for(sleeps.started.wait(), 5)  # the backoff has begun
        assert not client.connected
        assert not client.closed
        sending = asyncio.create_task(client.send("held back"))
        await asyncio.sleep(0)  # let it run up to its wait
        assert not sending.done()
        gate.set()  # the backoff ends: the client reconnects and the send goes through
        await asyncio.wait_for(sending, 5)
        assert await client.receive(timeout=5) == "held back"
    assert script.received == [["held back"]]


async def test_send_while_reconnecting_raises_when_told_not_to_wait_and_close_stops_it(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    script = Script([Accept(("hi",), close=1012), Accept()])
    sleeps = Sleeps(gate=asyncio.Event())  # never opened: the client stays reconnecting
    policy = ReconnectPolicy(send_timeout=0.0)
    url = await serve(script)
    client = await connect(url, reconnect=policy, sleep=sleeps)
    assert await client.receive(timeout=5) == "hi"
    await asyncio.wait_for(sleeps.started.wait(), 5)
    with pytest.raises(NotConnected):
        await client.send("now")
    await asyncio.wait_for(client.close(4000, "giving up"), 5)
    assert client.closed
    assert (client.close_code, client.close_reason) == (4000, "giving up")
    with pytest.raises(ClientClosed) as closed:
        await client.receive()
    assert closed.value.by_client
    assert [m async for m in client] == []  # the client's own close ends iteration quietly
    assert script.attempts == 1


async def test_close_sends_its_code_and_reason_and_is_idempotent(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    script = Script([Accept()])
    url = await serve(script)
    client = await connect(url)
    await client.send("x")
    assert await client.receive(timeout=5) == "x"
    await asyncio.gather(client.close(4002, "bye from client"), client.close())
    await client.close()
    assert script.closes == [(4002, "bye from client")]
    assert (client.close_code, client.close_reason) == (4002, "bye from client")
    with pytest.raises(ValueError, match="may not be sent"):
        await client.close(1006)
    with pytest.raises(ValueError, match="123 bytes"):
        await client.close(1000, "é" * 62)


async def test_an_on_reconnect_hook_that_raises_closes_the_client_with_1011(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    script = Script([Accept(close=1012), Accept()])

    async def broken(client: Client) -> None:
        raise RuntimeError("cannot rejoin")

    url = await serve(script)
    async with connect(url, reconnect=True, on_reconnect=broken, sleep=Sleeps()) as client:
        with pytest.raises(ReconnectFailed) as failed:
            await client.receive(timeout=5)
    assert failed.value.code == 1011
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert script.closes == [(1011, "on_reconnect failed")]


async def test_messages_read_before_the_end_are_still_received(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    script = Script([Accept(("1", "2", "3"), close=4005, reason="enough")])
    url = await serve(script)
    async with connect(url) as client:
        ended = await asyncio.wait_for(client.wait_closed(), 5)
        assert (ended.code, ended.reason) == (4005, "enough")
        assert client.closed
        assert [await client.receive(timeout=5) for _ in range(3)] == ["1", "2", "3"]
        with pytest.raises(ClientClosed) as closed:
            await client.receive(timeout=5)
        assert closed.value.code == 4005
    with pytest.raises(ClientClosed):
        await client.receive(timeout=5)


async def test_a_port_nobody_listens_on_fails_to_connect_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    with pytest.raises(ConnectFailed):
        await connect(f"ws://127.0.0.1:{port}/ws", reconnect=True, sleep=sleeps)
    assert sleeps.delays == []


async def test_receive_times_out_and_the_client_stays_usable(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    url = await serve(Script([Accept()]))
    async with connect(url) as client:
        with pytest.raises(TimeoutError):
            await client.receive(timeout=0.05)
        await client.send(b"ok")
        assert await client.receive(timeout=5) == b"ok"
