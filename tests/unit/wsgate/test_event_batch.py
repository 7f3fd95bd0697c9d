"""EventBatch envelopes written and read by hand (wsgate/event_batch.py), held to
protobuf's own encoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate import event_batch
from wsgate.errors import InvalidEnvelope
from wsgate.v1 import envelope_pb2 as pb

events = st.builds(
    pb.ConnectionEvent,
    connection_id=st.text(max_size=80),
    sequence=st.integers(1, 2**63 - 1),
    redelivered=st.booleans(),
    path=st.text(max_size=300),
    message=st.one_of(
        st.builds(pb.Message, text=st.text(max_size=300)),
        st.builds(pb.Message, binary=st.binary(max_size=70_000)),
    ),
)


@given(st.lists(events, min_size=1, max_size=8))
def test_join_is_protobufs_encoding_and_split_gives_back_each_event(
    batch: list[pb.ConnectionEvent],
) -> None:
    encoded = [event.SerializeToString() for event in batch]
    joined = event_batch.join(encoded)
    assert joined == pb.EventBatch(events=batch).SerializeToString()
    assert event_batch.is_batch(joined)
    assert event_batch.split(joined) == encoded


@given(events)
def test_a_lone_event_is_never_taken_for_a_batch(event: pb.ConnectionEvent) -> None:
    # A real event always has a connection id: its first byte is that field's tag.
    event.connection_id = event.connection_id or "c"
    assert not event_batch.is_batch(event.SerializeToString())


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "no events"),
        (b"\x0a\x01x", "not the tag of an event"),
        (b"\x7a\x01x\x0a\x01x", "not the tag of an event"),
        (b"\x7a", "cut off in an event's length"),
        (b"\x7a\x80", "cut off in an event's length"),
        (b"\x7a\x80\x80\x80\x80\x80\x01", "runs over 5 bytes"),
        (b"\x7a\x03xy", "runs past the end"),
    ],
)
def test_what_is_not_a_batch_is_refused_with_what_is_wrong(data: bytes, problem: str) -> None:
    with pytest.raises(InvalidEnvelope, match=problem):
        event_batch.split(data)


def test_an_event_that_ends_exactly_at_the_end_is_taken_and_one_byte_more_is_not() -> None:
    assert event_batch.split(b"\x7a\x02xy") == [b"xy"]
    with pytest.raises(InvalidEnvelope):
        event_batch.split(b"\x7a\x02xy\x7a")


def test_the_entry_overhead_covers_the_largest_length_a_batch_can_hold() -> None:
    # A length under 2**35 takes at most 5 bytes, and the tag one.
    assert len(event_batch.join([b""])) == 2
    assert event_batch.ENTRY_OVERHEAD == 1 + 5
