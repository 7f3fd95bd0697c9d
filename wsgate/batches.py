"""Writing ``wsgate.v1.GatewayBatch`` envelopes: final acks and commands for one gateway,
in the order they were produced, packed into as few NATS messages as fit.

A gateway reads its command subject with one subscription and takes a batch's items in
order, so whoever publishes there (a worker, the state service) puts everything for that
gateway in one stream: a handler's commands before its final ack, one turn's output before
the next turn's. NATS keeps each publisher's order; nothing else is relied on.

The encoding is protobuf's own, written by hand so that each ack or command is serialized
once and never copied into a batch message: a ``GatewayBatch`` is the concatenation of its
items, each as field 1 (length-delimited), and a ``GatewayItem`` is its ack (field 1) or
command (field 2), length-delimited. Sizes are therefore exact, and a batch is split
exactly where the next item would take it over ``max_bytes`` (NATS' ``max_payload``).
tests/unit/wsgate/test_batches.py checks the bytes against protobuf's parser. Pure.
"""

from __future__ import annotations

from wsgate.v1 import envelope_pb2 as pb

#: Tags of the length-delimited fields (field number << 3 | wire type 2).
_ITEMS = 0x0A  # GatewayBatch.items = 1
_ACK = 0x0A  # GatewayItem.ack = 1
_COMMAND = 0x12  # GatewayItem.command = 2


def varint(value: int) -> bytes:
    """``value`` (0 or more) as a protobuf varint."""
    # One and two bytes without a loop: lengths and sequences are mostly that small.
    if value < 0x80:
        return b"%c" % value
    if value < 0x4000:
        return b"%c%c" % ((value & 0x7F) | 0x80, value >> 7)
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    return b"%c%s%s" % (tag, varint(len(payload)), payload)


def ack_entry(ack: pb.EventAck) -> bytes:
    """``ack`` as one item of a GatewayBatch, ready to be joined with others."""
    return _field(_ITEMS, _field(_ACK, ack.SerializeToString()))


def final_ack_entry(connection_id: str, sequence: int, messages: list[bytes]) -> bytes:
    """The entry :func:`ack_entry` makes of ``EventAck(sequence=sequence,
    connection_id=connection_id, messages=...)``, written straight from its parts: a
    worker's final ack, once per event, with no EventAck made and serialized.
    ``messages`` are serialized ``Message`` envelopes
    (:func:`wsgate.worker.messages.encoded_message`). Fields go in field-number order and
    proto3's defaults (0, "") are left out, as protobuf writes them;
    tests/unit/wsgate/test_batches.py checks the bytes against protobuf's."""
    # EventAck: sequence = 1 (varint), messages = 3 and connection_id = 4 (length-delimited).
    cid = connection_id.encode()
    if sequence and cid and len(messages) <= 1:
        # The common case (one message or none), in one formatting.
        if not messages:
            ack = b'\x08%s"%s%s' % (varint(sequence), varint(len(cid)), cid)
        else:
            message = messages[0]
            ack = b'\x08%s\x1a%s%s"%s%s' % (
                varint(sequence),
                varint(len(message)),
                message,
                varint(len(cid)),
                cid,
            )
    else:
        parts = [b"\x08%s" % varint(sequence)] if sequence else []
        for message in messages:
            parts.append(_field(0x1A, message))
        if cid:
            parts.append(_field(0x22, cid))
        ack = b"".join(parts)
    size = len(ack)
    if size < 0x7E:  # the item (its tag, one length byte, the ack) fits one length byte
        return b"\x0a%c\x0a%c%s" % (size + 2, size, ack)
    return _field(_ITEMS, _field(_ACK, ack))


def command_entry(command: pb.GatewayCommand) -> bytes:
    """``command`` as one item of a GatewayBatch, ready to be joined with others."""
    return _field(_ITEMS, _field(_COMMAND, command.SerializeToString()))


def single_command(command: pb.GatewayCommand) -> bytes:
    """A GatewayBatch of ``command`` alone (a state service's broadcast). Its size is the
    command's plus at most 12 bytes, within :data:`wsgate.fanout.PAYLOAD_MARGIN_BYTES`."""
    return command_entry(command)


#: The most a GatewayBatch adds to the size of a command or an ack it carries: two tags and
#: two length varints of at most 5 bytes each (a NATS payload is far below 4 GiB).
ENTRY_OVERHEAD_BYTES = 12


class BatchWriter:
    """The entries for one gateway, in order, packed into payloads of at most
    ``max_bytes`` each (an entry larger than that alone is a payload of its own, which
    NATS then refuses: the caller checks what it can before adding).

    :meth:`add` appends; :meth:`payloads` returns what to publish, in order, and empties
    the writer.
    """

    __slots__ = ("_done", "_entries", "_max_bytes", "_size")

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._done: list[bytes] = []
        self._entries: list[bytes] = []
        self._size = 0

    def __bool__(self) -> bool:
        return bool(self._entries or self._done)

    def add(self, entry: bytes) -> None:
        """Append one entry (from :func:`ack_entry` or :func:`command_entry`)."""
        if self._entries and self._size + len(entry) > self._max_bytes:
            self._done.append(b"".join(self._entries))
            self._entries, self._size = [], 0
        self._entries.append(entry)
        self._size += len(entry)

    def payloads(self) -> list[bytes]:
        """The GatewayBatch payloads to publish, in order; the writer is empty after."""
        done = self._done
        if self._entries:
            done.append(b"".join(self._entries))
        self._done, self._entries, self._size = [], [], 0
        return done
