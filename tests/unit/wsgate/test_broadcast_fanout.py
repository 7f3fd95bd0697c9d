"""Broadcast fan-out planning: one command per gateway, split only at the payload limit."""

from __future__ import annotations

import itertools

import pytest

from wsgate import ids
from wsgate.fanout import MessageTooLarge, id_entry_size, plan, split_ids
from wsgate.v1 import envelope_pb2 as pb

TEXT = pb.Message(text="hello")


def gateway_ids(count: int, node: str) -> list[str]:
    source = ids.ConnectionIds(ids.new_gateway_id(node))
    return [source.next() for _ in range(count)]


def command_size(connection_ids: list[str], message: pb.Message = TEXT) -> int:
    return pb.GatewayCommand(connection_ids=connection_ids, send=message).ByteSize()


@pytest.mark.parametrize("length", [1, 20, 127, 128, 300])
def test_the_size_of_an_id_entry_is_exact(length: int) -> None:
    connection_id = "x" * length
    assert id_entry_size(connection_id) == command_size([connection_id]) - command_size([])


def test_one_command_per_gateway_however_many_ids() -> None:
    one, two = gateway_ids(5000, "one"), gateway_ids(5000, "two")
    commands = plan({ids.gateway_of(one[0]): one, ids.gateway_of(two[0]): two}, TEXT, 1024 * 1024)
    assert [(gw, list(c.connection_ids)) for gw, c in commands] == [
        (ids.gateway_of(one[0]), one),
        (ids.gateway_of(two[0]), two),
    ]
    assert all(c.send == TEXT for _, c in commands)


def test_a_command_of_exactly_the_limit_is_not_split() -> None:
    connection_ids = gateway_ids(100, "gw")
    exact = command_size(connection_ids)
    assert list(split_ids(connection_ids, TEXT, exact)) == [connection_ids]


def test_one_byte_over_the_limit_splits_in_two() -> None:
    connection_ids = gateway_ids(100, "gw")
    exact = command_size(connection_ids)
    chunks = list(split_ids(connection_ids, TEXT, exact - 1))
    assert len(chunks) == 2
    assert [cid for chunk in chunks for cid in chunk] == connection_ids  # all, in order
    assert all(command_size(chunk) <= exact - 1 for chunk in chunks)


def test_a_large_list_is_split_into_the_fewest_commands_that_fit() -> None:
    connection_ids = gateway_ids(20_000, "gw")
    limit = 64 * 1024
    chunks = list(split_ids(connection_ids, TEXT, limit))
    assert [cid for chunk in chunks for cid in chunk] == connection_ids
    assert all(command_size(chunk) <= limit for chunk in chunks)
    # Greedy: each command is full, i.e. the next id would not have fitted.
    for chunk, following in itertools.pairwise(chunks):
        assert command_size([*chunk, following[0]]) > limit


def test_a_message_that_fits_with_no_id_is_refused() -> None:
    (cid,) = gateway_ids(1, "gw")
    big = pb.Message(binary=b"x" * 1000)
    fits = command_size([cid], big)
    assert list(split_ids([cid], big, fits)) == [[cid]]
    with pytest.raises(MessageTooLarge):
        list(split_ids([cid], big, fits - 1))


def test_no_recipients_no_commands() -> None:
    assert plan({}, TEXT, 1024) == []
