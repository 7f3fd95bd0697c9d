"""A function route's connection handle on its own (its send buffer: test_send_buffer.py)."""

from __future__ import annotations

import pytest

from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.connection import Connection
from wsgate.worker.env import Env
from wsgate.worker.errors import NoConnectionState


class _NoSink:
    async def send_command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        raise AssertionError("nothing here publishes")


def test_a_plain_connection_has_no_state_to_read_or_assign() -> None:
    # conn.state belongs to a durable object's handle (ObjectConnection); a function
    # route's handle refuses both ways.
    conn = Connection("node-abcdefgh_7", "/echo", {}, sink=_NoSink(), env=Env.__new__(Env))
    with pytest.raises(NoConnectionState, match="durable object"):
        _ = conn.state
    with pytest.raises(NoConnectionState, match="durable object"):
        conn.state = {"name": "ada"}


def test_a_plain_connection_has_no_tags_to_read_or_change() -> None:
    conn = Connection("node-abcdefgh_7", "/echo", {}, sink=_NoSink(), env=Env.__new__(Env))
    with pytest.raises(NoConnectionState, match="durable object"):
        _ = conn.tags
    with pytest.raises(NoConnectionState, match="durable object"):
        conn.tags = ["red"]
    with pytest.raises(NoConnectionState, match="durable object"):
        conn.add_tags("red")
    with pytest.raises(NoConnectionState, match="durable object"):
        conn.remove_tags("red")
