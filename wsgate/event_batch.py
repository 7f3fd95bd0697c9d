"""``wsgate.v1.EventBatch`` envelopes: many events of one gateway in one NATS message.

A gateway gathers the events it sends to one events subject over one turn of its event
loop and sends them as one batch; a worker splits the batch and takes each event as if it
had come alone. The encoding is protobuf's own, written and read by hand so that each event
is serialized once and never parsed twice: a batch is the concatenation of its events, each
as field 15 (length-delimited). The field number is not 1, so a batch's first byte (0x7a)
tells it from a ``ConnectionEvent``, whose first byte is its connection id's tag (0x0a):
workers take both on the same subjects. tests/unit/wsgate/test_event_batch.py checks the
bytes against protobuf's. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence

from wsgate.batches import varint
from wsgate.errors import InvalidEnvelope

#: The tag of EventBatch.events (field 15 << 3 | wire type 2).
_EVENTS = 0x7A
_EVENTS_BYTE = b"\x7a"

#: What an event takes in a batch beyond its own bytes, at most: the tag and its length
#: (a varint of at most 5 bytes for anything under 4 GiB).
ENTRY_OVERHEAD = 6

#: A length's varint is at most this many bytes: a batch never comes near 2**35 bytes.
_MAX_LENGTH_BYTES = 5


def is_batch(data: bytes) -> bool:
    """Whether ``data`` is an EventBatch rather than a lone ConnectionEvent (by its first
    byte only: :func:`split` checks the rest)."""
    return data[:1] == _EVENTS_BYTE


def join(events: Sequence[bytes]) -> bytes:
    """The EventBatch of ``events`` (serialized ConnectionEvents), in their order."""
    return b"".join([b"%c%s%s" % (_EVENTS, varint(len(event)), event) for event in events])


def split(data: bytes) -> list[bytes]:
    """The serialized events of the EventBatch ``data``, in order; InvalidEnvelope if it
    is not one: empty, a field other than ``events``, or a length past its end. (Each
    event is checked by whoever parses it.)"""
    events: list[bytes] = []
    end = len(data)
    pos = 0
    while pos < end:
        if data[pos] != _EVENTS:
            raise InvalidEnvelope("EventBatch", f"byte {pos} is not the tag of an event")
        pos += 1
        length = shift = 0
        for _ in range(_MAX_LENGTH_BYTES):
            if pos >= end:
                raise InvalidEnvelope("EventBatch", "cut off in an event's length")
            byte = data[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        else:
            raise InvalidEnvelope("EventBatch", "an event's length runs over 5 bytes")
        if pos + length > end:
            raise InvalidEnvelope("EventBatch", f"an event of {length} bytes runs past the end")
        events.append(data[pos : pos + length])
        pos += length
    if not events:
        raise InvalidEnvelope("EventBatch", "no events")
    return events
