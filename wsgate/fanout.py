"""Fan-out planning: one GatewayCommand per gateway that holds recipients.

A message for many connections becomes one ``wsgate.v1.GatewayCommand`` (``send`` the
message to ``connection_ids``) per gateway, never one NATS message per connection. A
gateway's list is split over several commands only where one command would not fit in a
NATS message; sizes are computed exactly from the protobuf encoding, not estimated. The
state service plans its broadcasts with it, and so does a worker's activation, which
publishes its object's broadcasts itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from nats.aio.client import Client as NatsClient

from wsgate.v1 import envelope_pb2 as pb

#: Room kept below NATS' max_payload for what is not the command itself: the GatewayBatch
#: around it (at most :data:`wsgate.batches.ENTRY_OVERHEAD_BYTES`), and headers, which
#: count against the same limit if anything ever adds them.
PAYLOAD_MARGIN_BYTES = 4096


class MessageTooLarge(ValueError):
    """The message, with a single connection id, does not fit in one NATS message."""


def _varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def id_entry_size(connection_id: str) -> int:
    """Bytes one id adds to a GatewayCommand: field 1's tag, the length, the UTF-8."""
    length = len(connection_id.encode("utf-8"))
    return 1 + _varint_size(length) + length


def split_ids(
    connection_ids: Sequence[str], message: pb.Message, max_bytes: int
) -> Iterator[list[str]]:
    """Split ``connection_ids`` into as few consecutive lists as possible such that a
    GatewayCommand sending ``message`` to each list serializes to at most ``max_bytes``.

    Raises MessageTooLarge if the message does not fit even with one id.
    """
    base = pb.GatewayCommand(send=message).ByteSize()
    chunk: list[str] = []
    size = base
    for connection_id in connection_ids:
        entry = id_entry_size(connection_id)
        if base + entry > max_bytes:
            raise MessageTooLarge(
                f"a command of {base + entry} bytes (the message with one connection id) "
                f"does not fit in a NATS message of at most {max_bytes} bytes"
            )
        if size + entry > max_bytes:
            yield chunk
            chunk, size = [], base
        chunk.append(connection_id)
        size += entry
    if chunk:
        yield chunk


def plan(
    recipients: Mapping[str, Sequence[str]], message: pb.Message, max_bytes: int
) -> list[tuple[str, pb.GatewayCommand]]:
    """The commands of a broadcast: ``(gateway_id, command)`` for each gateway with
    recipients, one each unless ``max_bytes`` forces a split. Raises MessageTooLarge."""
    commands: list[tuple[str, pb.GatewayCommand]] = []
    for gateway_id, connection_ids in recipients.items():
        for chunk in split_ids(connection_ids, message, max_bytes):
            commands.append((gateway_id, pb.GatewayCommand(connection_ids=chunk, send=message)))
    return commands


def payload_budget(nc: NatsClient) -> int:
    """The largest command this NATS connection may publish, margin deducted."""
    return int(nc.max_payload) - PAYLOAD_MARGIN_BYTES
