"""Routes, connect decisions and the connection handle of the worker SDK, with no I/O."""

from __future__ import annotations

import asyncio

import pytest

from wsgate import (
    Accept,
    App,
    ConnectionClosed,
    InvalidCloseCode,
    InvalidMessage,
    InvalidResponse,
    InvalidRoute,
    NotAccepted,
    Reject,
)
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.connection import Connection, current_connection
from wsgate.worker.env import Env


class RecordingSink:
    """Collects the commands a handle would publish (the real one publishes on NATS)."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, pb.GatewayCommand]] = []

    async def send_command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        self.commands.append((connection_id, command))


def _conn(sink: RecordingSink, **kwargs: bool | int) -> Connection:
    return Connection("node-abcdefgh_7", "/echo", {}, sink=sink, env=Env.__new__(Env), **kwargs)


def test_routes_match_whole_paths_with_parameters() -> None:
    app = App()
    room = app.route("/chat/{room}")
    user = app.route("/chat/{room}/user/{user}")
    assert app.resolve("/chat/lobby") == (room, {"room": "lobby"})
    assert app.resolve("/chat/a.b*>/user/x y") == (user, {"room": "a.b*>", "user": "x y"})
    assert app.resolve("/chat/") is None
    assert app.resolve("/chat/lobby/extra") is None
    assert app.resolve("/other") is None


def test_a_trailing_newline_or_junk_does_not_match_a_literal_route() -> None:
    app = App()
    app.route("/echo")
    room = app.route("/chat/{room}")
    for path in ("/echo\n", "/echo ", "/echo/", "/echo\x00"):
        assert app.resolve(path) is None, repr(path)
    # A parameter is one whole segment, whatever it holds (it is encoded before routing).
    assert app.resolve("/chat/lobby\n") == (room, {"room": "lobby\n"})


def test_only_short_paths_are_cached() -> None:
    # Paths come from envelopes (up to 8 KiB): the cache holds 4096 of at most 1 KiB each.
    from wsgate.worker.app import _RESOLVED_MAX_PATH_CHARS

    app = App()
    room = app.route("/chat/{room}")
    at_limit = "/chat/" + "a" * (_RESOLVED_MAX_PATH_CHARS - 6)
    over = at_limit + "a"
    assert app.resolve(at_limit) == (room, {"room": at_limit[6:]})
    assert app.resolve(over) == (room, {"room": over[6:]})
    assert at_limit in app._resolved
    assert over not in app._resolved


def test_literal_parts_of_patterns_are_not_regexes() -> None:
    app = App()
    app.route("/a.b")
    assert app.resolve("/axb") is None
    assert app.resolve("/a.b") is not None


@pytest.mark.parametrize("bad", ["echo", "/x/{", "/x/{a}{a}", "/x/{1a}", "/x/}"])
def test_malformed_patterns_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRoute):
        App().route(bad)


def test_a_pattern_cannot_be_registered_twice() -> None:
    app = App()
    app.route("/echo")
    with pytest.raises(InvalidRoute):
        app.route("/echo")


@pytest.mark.parametrize(("status", "ok"), [(399, False), (400, True), (599, True), (600, False)])
def test_reject_status_at_and_over_its_range(status: int, ok: bool) -> None:
    if ok:
        assert Reject(status).status == status
    else:
        with pytest.raises(InvalidResponse):
            Reject(status)


async def test_sends_during_connect_wait_for_the_accept() -> None:
    sink = RecordingSink()
    conn = _conn(sink, connecting=True)
    await conn.send("welcome")
    await conn.send(b"\x01")
    assert sink.commands == []
    pending = conn.end_connect()
    assert [m.WhichOneof("data") for m in pending] == ["text", "binary"]


async def test_sends_of_a_handler_that_finishes_at_once_go_with_the_ack() -> None:
    sink = RecordingSink()
    conn = _conn(sink, sequence=7)
    await conn.send("a")
    await conn.send(b"b")
    sent = [pb.Message.FromString(m) for m in await conn.end_event()]
    assert [m.WhichOneof("data") for m in sent] == ["text", "binary"]
    assert sink.commands == []


async def test_sends_of_a_handler_that_waits_go_out_as_commands_in_order() -> None:
    sink = RecordingSink()
    conn = _conn(sink, sequence=7)
    await conn.send("first")
    await asyncio.sleep(0)  # the handler waits on something: what it sent goes now
    await asyncio.sleep(0)
    await conn.send("second")
    assert await conn.end_event() == [pb.Message(text="second").SerializeToString()]
    assert [(c.send.text, c.in_reply_to) for _, c in sink.commands] == [("first", 7)]


async def test_close_during_connect_says_to_reject_instead() -> None:
    with pytest.raises(NotAccepted):
        await _conn(RecordingSink(), connecting=True).close()


async def test_send_and_close_publish_to_the_owning_connection() -> None:
    sink = RecordingSink()
    conn = _conn(sink)
    await conn.send("hi")
    await conn.close(4001, "bye")
    (id1, send), (id2, close) = sink.commands
    assert id1 == id2 == conn.id
    assert list(send.connection_ids) == [conn.id]
    assert send.send.text == "hi"
    assert (close.close.code, close.close.reason) == (4001, "bye")


async def test_nothing_can_be_sent_after_close() -> None:
    conn = _conn(RecordingSink())
    await conn.close()
    with pytest.raises(ConnectionClosed):
        await conn.send("late")
    with pytest.raises(ConnectionClosed):
        await conn.close()
    with pytest.raises(ConnectionClosed):
        await _conn(RecordingSink(), closed=True).send("in on_close")


async def test_only_str_and_bytes_can_be_sent() -> None:
    with pytest.raises(InvalidMessage):
        await _conn(RecordingSink()).send({"not": "a frame"})  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2999, 5000])
async def test_close_codes_that_may_not_be_sent(code: int) -> None:
    with pytest.raises(InvalidCloseCode):
        await _conn(RecordingSink()).close(code)


async def test_close_reason_at_and_over_123_bytes() -> None:
    await _conn(RecordingSink()).close(1000, "r" * 123)
    with pytest.raises(InvalidCloseCode):
        await _conn(RecordingSink()).close(1000, "é" * 62)  # 124 bytes


def test_accept_defaults_to_no_subprotocol() -> None:
    assert Accept().subprotocol is None


async def test_send_many_after_send_keeps_the_senders_order() -> None:
    """A handler's buffered sends to its own connection leave before a send_many."""
    sink = RecordingSink()
    conn = _conn(sink, sequence=3)
    env = Env(state=None, sink=sink)  # type: ignore[arg-type]
    token = current_connection.set(conn)
    try:
        await conn.send("mine first")
        await env.send_many([conn.id, "other-abcdefgh_1"], "to all")
    finally:
        current_connection.reset(token)
    texts = [c.send.text for _, c in sink.commands]
    assert texts == ["mine first", "to all", "to all"]
    assert await conn.end_event() == []
