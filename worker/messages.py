"""What a handler may send: ``str`` is a text message, bytes-like a binary one; the one
conversion of it to the envelope that carries it (``send``, ``send_many``, ``broadcast``)."""

from __future__ import annotations

from typing import TypeAlias

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
