"""What clients see of the gateway: subprotocols, close codes, limits, auto-responses,
probes, commands for connections that are gone. Real processes throughout; the tests at
the end (message rate, outbound budget, close timeout) run gateways in this process, with
tiny limits, on the same NATS and worker, and look at how much is queued for each client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient

from tests.harness import Stack, eventually, metric, stack_context
from tests.wsraw import OP_BINARY, OP_TEXT, RawWebSocket
from wsgate import subjects
from wsgate.batches import single_command
from wsgate.config import GatewayConfig
from wsgate.gateway.server import Gateway, LiveConnection
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.state_client import StateClient

pytestmark = pytest.mark.timeout(60)

LIMIT = 65536
GATEWAY_ARGS = (
    "--ack-timeout-s", "1",
    "--max-message-bytes", str(LIMIT),
    "--max-outbound-bytes", "262144",
    "--allowed-origins", "https://ok.example,https://*.good.example",
    "--auto-responses", json.dumps({"ping": "pong"}),
)  # fmt: skip
HEARTBEAT, IDLE, SMALL = 1, 2, 3  # gateway indexes


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for s in stack_context(
        tmp_path_factory.mktemp("behaviour"), app="tests.apps.probe:app", gateway_args=GATEWAY_ARGS
    ):
        s.start_gateway("--heartbeat-s", "0.4")
        s.start_gateway("--idle-timeout-s", "0.5", "--heartbeat-s", "0")
        s.start_gateway("--max-connections", "3")
        yield s


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _control(session: aiohttp.ClientSession, stack: Stack, gateway: int = 0, **kw: object):  # type: ignore[no-untyped-def]
    ws = await session.ws_connect(stack.ws_url("/control", gateway), **kw)  # type: ignore[arg-type]
    hello = await ws.receive(timeout=10)
    assert hello.data.startswith("id ")
    return ws, hello.data[3:]


def _gateway_metrics(stack: Stack, gateway: int = 0) -> str:
    return f"{stack.gateways[gateway].info['url']}/metrics"


async def test_the_app_picks_the_subprotocol(stack: Stack, session: aiohttp.ClientSession) -> None:
    ws, _ = await _control(session, stack, protocols=("a.v1", "b.v1"))
    assert ws.protocol == "b.v1"
    await ws.close()
    ws, _ = await _control(session, stack, protocols=("a.v1",))
    assert ws.protocol is None
    await ws.close()


async def test_app_close_code_and_reason_reach_the_client(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    ws, _ = await _control(session, stack)
    await ws.send_str("close 4001 see you later")
    msg = await ws.receive(timeout=10)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert (msg.data, msg.extra) == (4001, "see you later")


async def _close_record(stack: Stack, connection_id: str) -> dict[str, object]:
    """Wait (bounded) until the app's on_close has stored what it saw."""
    async with StateClient(stack.state.info["address"]) as state:  # type: ignore[union-attr]
        record = state.storage("closes", connection_id)
        seen = await eventually(lambda: record.get("close"), f"on_close to run for {connection_id}")
        return {"close": seen, "calls": await record.get("calls")}


async def test_client_close_code_and_reason_reach_the_app_once(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    ws, connection_id = await _control(session, stack)
    await ws.close(code=4002, message=b"bye from client")
    assert ws.close_code == 4002  # the gateway echoes a valid code
    record = await _close_record(stack, connection_id)
    assert record == {
        "close": {"code": 4002, "reason": "bye from client", "redelivered": False},
        "calls": 1,
    }


async def test_app_close_reaches_the_app_once(stack: Stack, session: aiohttp.ClientSession) -> None:
    ws, connection_id = await _control(session, stack)
    await ws.send_str("close 4003 kicked")
    assert (await ws.receive(timeout=10)).data == 4003
    record = await _close_record(stack, connection_id)
    assert record["close"] == {"code": 4003, "reason": "kicked", "redelivered": False}
    assert record["calls"] == 1


async def test_a_handler_that_raises_closes_with_1011(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    ws, _ = await _control(session, stack)
    await ws.send_str("boom")
    msg = await ws.receive(timeout=10)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1011)


@pytest.mark.parametrize(("size", "fits"), [(LIMIT, True), (LIMIT + 1, False)])
async def test_message_size_limit(
    stack: Stack, session: aiohttp.ClientSession, size: int, fits: bool
) -> None:
    ws, _ = await _control(session, stack)
    await ws.send_bytes(b"x" * size)
    msg = await ws.receive(timeout=10)
    if fits:
        assert msg.data == b"x" * size
        await ws.close()
    else:
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1009)


async def test_invalid_utf8_is_closed_with_1007(stack: Stack) -> None:
    raw = await RawWebSocket.connect("127.0.0.1", stack.gateway_port(), "/control")
    try:
        await raw.read_frame()  # "id ..."
        await raw.send_frame(OP_TEXT, b"ok \xff\xfe not utf-8")
        assert (await raw.read_until_close()).close_code == 1007
    finally:
        await raw.aclose()


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
async def test_a_forbidden_close_code_is_answered_with_1002(stack: Stack, code: int) -> None:
    raw = await RawWebSocket.connect("127.0.0.1", stack.gateway_port(), "/control")
    try:
        await raw.read_frame()
        await raw.send_close(code)
        assert (await raw.read_until_close()).close_code == 1002
    finally:
        await raw.aclose()


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4999])
async def test_an_allowed_close_code_is_echoed(stack: Stack, code: int) -> None:
    raw = await RawWebSocket.connect("127.0.0.1", stack.gateway_port(), "/control")
    try:
        await raw.read_frame()
        await raw.send_close(code, b"why")
        assert (await raw.read_until_close()).close_code == code
    finally:
        await raw.aclose()


async def test_a_slow_consumer_is_closed_with_1008(stack: Stack) -> None:
    """The client stops reading; the app sends 16 MiB; the gateway's queue for it passes
    max_outbound_bytes (256 KiB) and it is closed with 1008, other clients unaffected."""
    url = _gateway_metrics(stack)
    before = await metric(url, "wsgate_gateway_drops_total", {"reason": "slow_consumer"})
    raw = await RawWebSocket.connect("127.0.0.1", stack.gateway_port(), "/control")
    try:
        await raw.read_frame()
        await raw.send_frame(OP_TEXT, b"flood 256 65536")

        async def declared_slow() -> bool:
            drops = await metric(url, "wsgate_gateway_drops_total", {"reason": "slow_consumer"})
            return drops > before

        # Not reading: wait (bounded) for the gateway to give up on us.
        await eventually(declared_slow, "the gateway to declare the client slow", timeout_s=30)
        # Now read: some data frames, then the close frame with 1008.
        assert (await raw.read_until_close()).close_code == 1008
    finally:
        await raw.aclose()
    async with aiohttp.ClientSession() as session:
        ws, _ = await _control(session, stack)
        await ws.send_str("still here")
        assert (await ws.receive(timeout=10)).data == "still here"
        await ws.close()


async def test_a_client_that_does_not_answer_pings_is_dropped(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    ws, _ = await _control(session, stack, gateway=HEARTBEAT, autoping=False)
    first = await ws.receive(timeout=10)
    assert first.type is aiohttp.WSMsgType.PING  # the gateway's heartbeat
    while (msg := await ws.receive(timeout=10)).type is aiohttp.WSMsgType.PING:
        pass
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_a_client_that_answers_pings_outlives_several_heartbeats(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    ws, _ = await _control(session, stack, gateway=HEARTBEAT)
    for i in range(4):  # 4 x 0.3 s: more than two heartbeat periods of 0.4 s
        # Time passing is the condition under test (the pings it brings are answered by
        # aiohttp unseen), so a fixed wait is the event here.
        await asyncio.sleep(0.3)
        await ws.send_str(f"alive {i}")
        assert (await ws.receive(timeout=10)).data == f"alive {i}"
    await ws.close()


async def test_an_idle_client_is_closed_with_1001(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    ws, _ = await _control(session, stack, gateway=IDLE)
    msg = await ws.receive(timeout=10)
    assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1001, "idle timeout")


async def test_max_connections_at_and_over_the_limit(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    open_ = [(await _control(session, stack, gateway=SMALL))[0] for _ in range(3)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(stack.ws_url("/control", SMALL))
    assert refused.value.status == 503
    await open_.pop().close()
    url = _gateway_metrics(stack, SMALL)

    async def slot_free() -> bool:  # once the close is reported to the app
        return await metric(url, "wsgate_gateway_connections_open") < 3

    await eventually(slot_free, "the closed connection's slot to free")
    ws, _ = await _control(session, stack, gateway=SMALL)
    for w in [ws, *open_]:
        await w.close()


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://ok.example", True),
        ("https://chat.good.example", True),
        (None, True),
        ("https://evil.example", False),
        ("https://ok.example.evil", False),
        ("http://ok.example", False),
    ],
)
async def test_origin_allowlist(
    stack: Stack, session: aiohttp.ClientSession, origin: str | None, allowed: bool
) -> None:
    kwargs = {"origin": origin} if origin else {}
    if allowed:
        ws, _ = await _control(session, stack, **kwargs)
        await ws.close()
    else:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(stack.ws_url("/control"), **kwargs)  # type: ignore[arg-type]
        assert refused.value.status == 403


async def test_auto_response_is_answered_by_the_gateway(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    async with session.ws_connect(stack.ws_url("/tagged")) as ws:
        await ws.send_str("ping")
        assert (await ws.receive(timeout=10)).data == "pong"
        await ws.send_str("pingx")
        assert (await ws.receive(timeout=10)).data.endswith("|-|pingx")  # from a worker


async def test_probes_and_metrics(stack: Stack, session: aiohttp.ClientSession) -> None:
    base = stack.gateways[0].info["url"]
    worker = f"http://127.0.0.1:{stack.workers[0].info['probe_port']}"
    for url in (base, worker):
        for path in ("/healthz", "/readyz"):
            async with session.get(url + path) as resp:
                assert resp.status == 200, url + path
    async with session.ws_connect(stack.ws_url("/control")) as ws:
        await ws.receive(timeout=10)
        assert await metric(_gateway_metrics(stack), "wsgate_gateway_connections_open") >= 1
    assert await metric(_gateway_metrics(stack), "wsgate_gateway_messages_out_total") >= 1
    assert (
        await metric(_gateway_metrics(stack), "wsgate_gateway_event_round_trip_seconds_count") >= 1
    )
    assert (
        await metric(
            stack.worker_metrics_url(), "wsgate_worker_connects_total", {"outcome": "accept"}
        )
        >= 1
    )


async def test_commands_for_gone_connections_and_garbage_are_counted(stack: Stack) -> None:
    url = _gateway_metrics(stack)
    unknown = await metric(url, "wsgate_gateway_drops_total", {"reason": "unknown_connection"})
    garbage = await metric(url, "wsgate_gateway_garbage_total", {"subject": "command"})
    gateway_id = stack.gateways[0].info["gateway_id"]
    nc = NatsClient()
    await nc.connect(stack.nats_url)
    try:
        subject = subjects.gateway_subject("wsgate", gateway_id)
        gone = pb.GatewayCommand(connection_ids=[f"{gateway_id}_zzzz"], send=pb.Message(text="x"))
        await nc.publish(subject, single_command(gone))
        await nc.publish(subject, b"\xff\x00 not a command")
        await nc.flush()
    finally:
        await nc.close()

    async def counted() -> bool:
        return await metric(url, "wsgate_gateway_garbage_total", {"subject": "command"}) > garbage

    await eventually(counted, "the garbage command to be counted")
    assert await metric(url, "wsgate_gateway_garbage_total", {"subject": "command"}) == garbage + 1
    assert (
        await metric(url, "wsgate_gateway_drops_total", {"reason": "unknown_connection"})
        == unknown + 1
    )
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(stack.ws_url("/tagged")) as ws,
    ):
        await ws.send_str("after garbage")
        assert (await ws.receive(timeout=10)).data.endswith("after garbage")


async def test_a_handler_longer_than_the_ack_timeout_is_not_redelivered(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Progress acks keep a slow handler's event from being sent again (ack timeout 1 s)."""
    ws, _ = await _control(session, stack)
    await ws.send_str("sleep 2.5")
    assert (await ws.receive(timeout=10)).data == "slept 2.5 redelivered=False"
    await ws.send_str("next")
    assert (await ws.receive(timeout=10)).data == "next"
    await ws.close()


async def test_binary_through_the_raw_client(stack: Stack) -> None:
    raw = await RawWebSocket.connect("127.0.0.1", stack.gateway_port(), "/control")
    try:
        await raw.read_frame()
        await raw.send_frame(OP_BINARY, b"\x00\x01")
        frame = await raw.read_frame()
        assert (frame.opcode, frame.payload) == (OP_BINARY, b"\x00\x01")
    finally:
        await raw.aclose()


def test_the_gateway_may_open_as_many_files_as_the_system_lets_it(stack: Stack) -> None:
    """One descriptor per client: the gateway raises its soft limit to the hard one."""
    limits = Path(f"/proc/{stack.gateways[0].pid}/limits").read_text().splitlines()
    (line,) = [entry for entry in limits if entry.startswith("Max open files")]
    soft, hard = line.split()[3:5]
    assert soft == hard


# -- gateways in this process, on this stack's NATS: limits too small for the others ----

KIB = 1024
#: The outbound budget of the budget test, and what one client may have queued.
BUDGET, PER_CLIENT = 1024 * KIB, 640 * KIB
#: Frames the app sends to a client that stopped reading: FRAME bytes each, two at a time
#: once some are queued at the gateway, BIG_FLOOD at a time while the sockets' buffers
#: still take them (several MiB on loopback).
FRAME, FRAMES_PER_FLOOD, BIG_FLOOD = 32 * KIB, 2, 16


def _config(stack: Stack, **settings: Any) -> GatewayConfig:
    return GatewayConfig(
        host="127.0.0.1", port=0, nats_url=stack.nats_url, drain_timeout_s=2, **settings
    )


def _ws_url(gateway: Gateway, path: str) -> str:
    return gateway.url.replace("http://", "ws://", 1) + path


def _sample(gateway: Gateway, name: str, labels: dict[str, str] | None = None) -> float:
    return gateway.metrics.registry.get_sample_value(name, labels) or 0.0


# -- message rate ------------------------------------------------------------------------


async def test_burst_messages_at_once_are_served_and_one_more_is_closed_with_1008(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Burst 3, a token every 1000 s: three messages sent at once are answered, the fourth
    closes the connection with 1008. Auto-responses, answered by the gateway, count too."""
    config = _config(
        stack, message_rate=0.001, message_burst=3, auto_responses=json.dumps({"ping": "pong"})
    )
    async with Gateway(config) as gateway:
        echo = await session.ws_connect(_ws_url(gateway, "/control"))
        assert (await echo.receive(timeout=10)).data.startswith("id ")
        pings = await session.ws_connect(_ws_url(gateway, "/control"))
        assert (await pings.receive(timeout=10)).data.startswith("id ")

        for data in ("m0", b"m1", "m2", "m3"):  # all at once: text and binary alike
            await (echo.send_str(data) if isinstance(data, str) else echo.send_bytes(data))
        for _ in range(4):
            await pings.send_str("ping")

        assert [(await echo.receive(timeout=10)).data for _ in range(3)] == ["m0", b"m1", "m2"]
        assert [(await pings.receive(timeout=10)).data for _ in range(3)] == ["pong"] * 3
        for ws in (echo, pings):
            closed = await ws.receive(timeout=10)
            assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 1008)
            assert closed.extra == "message rate exceeded (0.001/s, burst 3)"
        metrics = f"{gateway.url}/metrics"
        assert await metric(metrics, "wsgate_gateway_rate_limited_total") == 2
        assert await metric(metrics, "wsgate_gateway_auto_responses_total") == 3
        for ws in (echo, pings):
            await ws.close()


async def test_a_message_rate_of_0_is_no_limit(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    async with Gateway(_config(stack, message_rate=0, message_burst=1)) as gateway:
        async with session.ws_connect(_ws_url(gateway, "/control")) as ws:
            await ws.receive(timeout=10)
            for i in range(20):
                await ws.send_str(f"m{i}")
            assert [(await ws.receive(timeout=10)).data for _ in range(20)] == [
                f"m{i}" for i in range(20)
            ]
        assert _sample(gateway, "wsgate_gateway_rate_limited_total") == 0


# -- outbound budget ---------------------------------------------------------------------


async def _stalled_client(gateway: Gateway) -> tuple[RawWebSocket, LiveConnection]:
    """A client that reads its greeting and then nothing: what the app sends it piles up
    (first in the sockets' buffers, several MiB on loopback, then in its outbox)."""
    raw = await RawWebSocket.connect("127.0.0.1", gateway.port, "/control")
    hello = await raw.read_frame()
    connection_id = hello.payload.decode().removeprefix("id ")
    return raw, gateway._connections[connection_id]


async def _flood(gateway: Gateway, raw: RawWebSocket, conn: LiveConnection) -> None:
    """The app sends frames to ``raw`` (more while none is queued at the gateway for it,
    so that a flood adds at most BIG_FLOOD frames to an empty queue, FRAMES_PER_FLOOD to
    another); returns once the gateway has handed them to the outbox (messages_out)."""
    name = "wsgate_gateway_messages_out_total"
    frames = BIG_FLOOD if conn.outbox.queued_bytes == 0 else FRAMES_PER_FLOOD
    before = _sample(gateway, name)
    await raw.send_frame(OP_TEXT, f"flood {frames} {FRAME}".encode())

    async def queued() -> bool:
        return _sample(gateway, name) >= before + frames

    await eventually(queued, "the flood to reach the gateway", timeout_s=10)


async def test_the_client_furthest_behind_is_shed_first_and_upgrades_wait_until_it_is_gone(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Budget 1 MiB, 640 KiB per client. Client A stops reading and gets about 600 KiB
    queued; client B stops reading and gets more until the total passes the budget: A,
    the furthest behind, is shed with 1013; B, with less queued, and a client that reads
    stay. Upgrades get 503 until A has closed, then 101 again."""
    config = _config(
        stack, message_rate=0, max_outbound_bytes=PER_CLIENT, outbound_budget_bytes=BUDGET
    )
    async with Gateway(config) as gateway:
        metrics = f"{gateway.url}/metrics"
        fast = await session.ws_connect(_ws_url(gateway, "/control"))
        await fast.receive(timeout=10)
        raw_a, conn_a = await _stalled_client(gateway)
        raw_b, conn_b = await _stalled_client(gateway)
        try:
            # A: at least PER_CLIENT - 2 frames, so less than PER_CLIENT after one more flood.
            while conn_a.outbox.queued_bytes < PER_CLIENT - FRAMES_PER_FLOOD * FRAME:
                await _flood(gateway, raw_a, conn_a)
            # B: until the total passes the budget. Then B holds at most BUDGET - A + FRAME
            # (< 512 KiB), A at least 576 KiB: A is the one furthest behind.
            for _ in range(1000):
                if _sample(gateway, "wsgate_gateway_budget_shed_total"):
                    break
                assert conn_a.outbox.queued_bytes + conn_b.outbox.queued_bytes <= BUDGET
                await _flood(gateway, raw_b, conn_b)
                await fast.send_str("still here")
                assert (await fast.receive(timeout=10)).data == "still here"
            assert await metric(metrics, "wsgate_gateway_budget_shed_total") == 1
            assert (conn_a.shed, conn_b.shed) == (True, False)
            assert conn_a.outbox.queued_bytes == 0
            assert 0 < conn_b.outbox.queued_bytes < PER_CLIENT - FRAMES_PER_FLOOD * FRAME
            assert await metric(metrics, "wsgate_gateway_outbound_bytes") == float(
                conn_b.outbox.queued_bytes
            )

            # A has not taken its close frame: the gateway counts as over its budget.
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(_ws_url(gateway, "/control"))
            assert refused.value.status == 503
            async with session.get(f"{gateway.url}/readyz") as probe:
                assert probe.status == 503
            assert (
                await metric(
                    metrics, "wsgate_gateway_upgrades_refused_total", {"reason": "outbound_budget"}
                )
                == 1
            )

            # A reads now: what the sockets held, then the close frame; it answers it.
            assert (await raw_a.read_until_close()).close_code == 1013
            await raw_a.send_close(1000)

            async def ready() -> bool:
                async with session.get(f"{gateway.url}/readyz") as resp:
                    return resp.status == 200

            await eventually(ready, "/readyz once A is gone", timeout_s=10)
            again = await session.ws_connect(_ws_url(gateway, "/control"))
            assert (await again.receive(timeout=10)).data.startswith("id ")
            await again.close()
            await fast.send_str("still here")
            assert (await fast.receive(timeout=10)).data == "still here"
            assert not conn_b.shed
        finally:
            await raw_a.aclose()
            await raw_b.aclose()
            await fast.close()


async def test_a_client_that_takes_not_even_the_close_frame_is_cut_after_the_close_timeout(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that never reads passes max_outbound_bytes and is closed with 1008; as it
    takes not even the close frame, its TCP connection is cut after the close timeout
    (1 s here), and the gateway forgets it.

    The frames come from auto-responses, so the gateway's read loop waits for the next
    message when the queue overflows (as when the app's sends for others overflow it).
    The write that force_close cancelled used to leave aiohttp's wait for the socket to
    drain cancelled: the close failed at once, nothing cut the connection, and it stayed
    open for ever.
    """
    monkeypatch.setattr("wsgate.gateway.server.CLOSE_TIMEOUT_S", 1.0)
    config = _config(
        stack,
        message_rate=0,
        max_outbound_bytes=64 * KIB,
        auto_responses=json.dumps({"p": "x" * FRAME}),
    )
    async with Gateway(config) as gateway:
        raw, _ = await _stalled_client(gateway)
        try:
            for _ in range(400):  # 12.5 MiB of answers: more than the sockets' buffers hold
                await raw.send_frame(OP_TEXT, b"p")

            async def slow() -> bool:
                labels = {"reason": "slow_consumer"}
                return _sample(gateway, "wsgate_gateway_drops_total", labels) > 0

            await eventually(slow, "the client to be declared slow", timeout_s=20)

            async def gone() -> bool:
                return _sample(gateway, "wsgate_gateway_connections_open") == 0

            await eventually(gone, "the connection to be cut", timeout_s=10)
            assert _sample(gateway, "wsgate_gateway_closes_total", {"initiator": "gateway"}) == 1
        finally:
            await raw.aclose()
