"""Broadcast fan-out from the state service: one GatewayCommand per gateway that holds
recipients (planned by :mod:`wsgate.fanout`), published on that gateway's command subject
as a GatewayBatch of that one command (:func:`wsgate.batches.single_command`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NatsClient

from wsgate import subjects
from wsgate.batches import single_command
from wsgate.fanout import MessageTooLarge, payload_budget, plan
from wsgate.v1 import envelope_pb2 as pb

__all__ = ["BusUnavailable", "FanOut", "MessageTooLarge", "fan_out"]

#: How long a broadcast waits for NATS to confirm it has the commands.
FLUSH_TIMEOUT_S = 5


class BusUnavailable(ConnectionError):
    """The commands could not be handed to NATS (disconnected, or no answer in time)."""


@dataclass(frozen=True)
class FanOut:
    """What a broadcast did: connections addressed and commands published."""

    recipients: int
    commands: int


async def fan_out(
    nc: NatsClient,
    prefix: str,
    recipients: Mapping[str, Sequence[str]],
    message: pb.Message,
) -> FanOut:
    """Publish ``message`` to ``recipients`` (gateway id -> its connection ids) and wait
    until NATS has the commands (a flush), so that what the caller sends after this
    returns reaches a gateway after the broadcast.

    Raises MessageTooLarge (nothing was published) or BusUnavailable (some commands may
    still be delivered once NATS is back).
    """
    commands = plan(recipients, message, payload_budget(nc))
    try:
        for gateway_id, command in commands:
            await nc.publish(subjects.gateway_subject(prefix, gateway_id), single_command(command))
        if commands:
            await nc.flush(timeout=FLUSH_TIMEOUT_S)
    except nats.errors.Error as exc:
        raise BusUnavailable(f"broadcast could not be handed to NATS: {exc!r}") from exc
    return FanOut(
        recipients=sum(len(command.connection_ids) for _, command in commands),
        commands=len(commands),
    )
