"""What a handler may send: ``str`` is a text message, bytes-like a binary one; the one
conversion of it to the envelope that carries it (``send``, ``send_many``, ``broadcast``)."""

from __future__ import annotations

from typing import TypeAlias

from wsgate.batches import varint
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.errors import InvalidMessage

#: A message to send: text (str) or binary (bytes-like).
Sendable: TypeAlias = str | bytes | bytearray | memoryview


def message_envelope(message: Sendable, what: str) -> pb.Message:
    """``message`` as an envelope: str is text, bytes-like is binary; InvalidMessage naming
    ``what`` (the call, e.g. ``"send()"``) for anything else."""
    if isinstance(message, str):
        return pb.Message(text=message)
    if isinstance(message, bytes | bytearray | memoryview):
        return pb.Message(binary=bytes(message))
    raise InvalidMessage(f"{what} takes str (text) or bytes (binary), not {type(message).__name__}")


def encoded_message(message: Sendable, what: str) -> bytes:
    """:func:`message_envelope`, serialized: the bytes protobuf writes for it, written by
    hand (a send is buffered as these bytes, and most go out inside a final ack that is
    written by hand too: no ``pb.Message`` is made for them). Raises what
    :func:`message_envelope` raises: InvalidMessage, or UnicodeEncodeError for a str that
    is no UTF-8 (lone surrogates). tests/unit/worker/test_messages.py checks the bytes
    against protobuf's."""
    # The exact types first: what handlers send, and cheaper than isinstance.
    kind = type(message)
    if kind is str:
        data = message.encode()  # type: ignore[union-attr]
        tag = 0x0A  # Message.text = 1, length-delimited
    elif kind is bytes:
        data = message
        tag = 0x12  # Message.binary = 2, length-delimited
    elif isinstance(message, str):
        data = message.encode()
        tag = 0x0A
    elif isinstance(message, bytes | bytearray | memoryview):
        data = bytes(message)  # a copy: the handler may reuse its buffer
        tag = 0x12
    else:
        raise InvalidMessage(
            f"{what} takes str (text) or bytes (binary), not {type(message).__name__}"
        )
    size = len(data)
    if size < 0x80:
        return b"%c%c%s" % (tag, size, data)
    return b"%c%s%s" % (tag, varint(size), data)
