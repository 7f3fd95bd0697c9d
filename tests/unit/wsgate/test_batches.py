"""GatewayBatch payloads written by hand (wsgate/batches.py) are what protobuf parses, in
order, and are split exactly at the size limit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.protobuf_strategies import messages
from wsgate.batches import (
    ENTRY_OVERHEAD_BYTES,
    BatchWriter,
    ack_entry,
    command_entry,
    final_ack_entry,
    single_command,
    varint,
)
from wsgate.v1 import envelope_pb2 as pb

CONN = "edge-1-abcd1234_1"


def _command(text: str) -> pb.GatewayCommand:
    return pb.GatewayCommand(connection_ids=[CONN], send=pb.Message(text=text), in_reply_to=3)


def _ack(sequence: int, *texts: str) -> pb.EventAck:
    return pb.EventAck(
        connection_id=CONN, sequence=sequence, messages=[pb.Message(text=t) for t in texts]
    )


def test_entries_parse_as_the_batch_protobuf_would_write_in_their_order() -> None:
    items = [
        pb.GatewayItem(command=_command("a")),
        pb.GatewayItem(ack=_ack(3, "b", "c")),
        pb.GatewayItem(command=_command("x" * 300)),  # a length over one varint byte
        pb.GatewayItem(ack=_ack(4)),
    ]
    writer = BatchWriter(max_bytes=1 << 20)
    for item in items:
        writer.add(ack_entry(item.ack) if item.HasField("ack") else command_entry(item.command))
    (payload,) = writer.payloads()
    expected = pb.GatewayBatch(items=items)
    assert payload == expected.SerializeToString()
    assert pb.GatewayBatch.FromString(payload) == expected
    assert not writer
    assert writer.payloads() == []


def test_a_single_command_is_a_batch_of_one() -> None:
    command = _command("hello")
    payload = single_command(command)
    assert pb.GatewayBatch.FromString(payload) == pb.GatewayBatch(
        items=[pb.GatewayItem(command=command)]
    )
    assert len(payload) - command.ByteSize() <= ENTRY_OVERHEAD_BYTES


@pytest.mark.parametrize("spare", [0, -1])
def test_a_batch_is_split_exactly_where_the_next_entry_would_not_fit(spare: int) -> None:
    entries = [command_entry(_command(f"m{i}")) for i in range(3)]
    limit = len(entries[0]) + len(entries[1]) + spare  # two fit exactly; or not quite
    writer = BatchWriter(max_bytes=limit)
    for entry in entries:
        writer.add(entry)
    payloads = writer.payloads()
    assert all(len(p) <= limit for p in payloads)
    assert len(payloads) == (2 if spare == 0 else 3)
    texts = [
        item.command.send.text for p in payloads for item in pb.GatewayBatch.FromString(p).items
    ]
    assert texts == ["m0", "m1", "m2"]


def test_an_entry_over_the_limit_goes_alone_and_the_order_holds() -> None:
    small, big = command_entry(_command("s")), command_entry(_command("b" * 100))
    writer = BatchWriter(max_bytes=len(big) - 1)
    for entry in (small, big, small):
        writer.add(entry)
    assert writer.payloads() == [small, big, small]


#: Final acks as a worker writes them: any sequence, connection id and messages, with
#: texts, binaries and ids long enough to need lengths of two varint bytes and more.
_long_messages = st.one_of(
    st.text(max_size=300).map(lambda t: pb.Message(text=t)),
    st.binary(max_size=20_000).map(lambda b: pb.Message(binary=b)),
    st.just(pb.Message()),
)
_final_acks = st.one_of(
    messages(pb.EventAck.DESCRIPTOR, st.text(max_size=40)),
    st.builds(
        pb.EventAck,
        sequence=st.integers(0, 2**15) | st.integers(0, 2**64 - 1),
        connection_id=st.text(max_size=200),
        messages=st.lists(_long_messages, max_size=4),
    ),
)


@given(_final_acks)
def test_a_final_ack_written_from_its_parts_is_protobufs_own_entry(drawn: pb.EventAck) -> None:
    # What a final ack holds: the fields of progress acks, retries and activations cleared.
    ack = pb.EventAck(
        sequence=drawn.sequence, connection_id=drawn.connection_id, messages=drawn.messages
    )
    encoded = [message.SerializeToString() for message in ack.messages]
    entry = final_ack_entry(ack.connection_id, ack.sequence, encoded)
    assert entry == ack_entry(ack)
    assert pb.GatewayBatch.FromString(entry) == pb.GatewayBatch(items=[pb.GatewayItem(ack=ack)])


@given(st.integers(0, 2**15) | st.integers(0, 2**64 - 1))
def test_varints_are_protobufs(value: int) -> None:
    # A uint64 field alone is its tag byte, then its value's varint (0 is left out).
    expected = pb.EventAck(sequence=value).SerializeToString()[1:] if value else b"\x00"
    assert varint(value) == expected
