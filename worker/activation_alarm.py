"""A durable object's alarm inside its activation (``self.alarm``).

Same API as :class:`~wsgate.worker.alarms_client.ObjectAlarm`. Setting or deleting the alarm is an
effect of the running turn, committed with its storage writes (and fenced like them); the
state service's scheduler fires it. Reads come from memory after the first one. As on
Cloudflare, inside the alarm's own handler ``get()`` reports no alarm unless the handler
set a new one.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from wsgate.v1 import state_pb2 as pb
from wsgate.worker import state_methods as methods
from wsgate.worker.alarms_client import ObjectAlarm, from_epoch_ms, to_epoch_ms
from wsgate.worker.errors import TurnOver
from wsgate.worker.object_cache import UNKNOWN, _Unknown
from wsgate.worker.turn import Turn, TurnKind, current_turn

if TYPE_CHECKING:
    from wsgate.worker.activation import Activation


class ActivationAlarm(ObjectAlarm):
    """The alarm of an activation's object."""

    def __init__(self, activation: Activation) -> None:
        super().__init__(activation.state, activation.namespace, activation.name)
        self._activation = activation
        #: The stored alarm as this activation knows it (ms; None: none).
        self._known: int | _Unknown | None = UNKNOWN

    def __repr__(self) -> str:
        return f"<ActivationAlarm {self.namespace!r}/{self.name!r}>"

    async def get_ms(self) -> int | None:
        """The alarm's time in ms since the epoch, or None (see the module docstring)."""
        turn = self._own_turn()
        if turn is not None and turn.alarm is None and turn.alarm_masked:
            return None
        return await self._load()

    async def get(self) -> datetime | None:
        """The alarm's time as an aware UTC datetime, or None."""
        ms = await self.get_ms()
        return None if ms is None else from_epoch_ms(ms)

    async def set(self, when: datetime | float) -> None:
        """Set the alarm to ``when`` (an aware datetime or epoch seconds), replacing any;
        durable with the turn. Raises ValueError or TypeError for a bad ``when``."""
        at_ms = to_epoch_ms(when)
        self._turn().set_alarm(pb.AlarmChange(set_ms=at_ms))
        self._known = at_ms

    async def delete(self) -> bool:
        """Remove the alarm; returns whether there was one. In the alarm's own handler it
        also stops that firing's retries."""
        turn = self._turn()
        existed = turn.alarm_masked or await self._load() is not None
        turn.set_alarm(pb.AlarmChange(delete=True))
        self._known = None
        return existed

    def turn_ended(self, turn: Turn) -> None:
        """What an alarm turn leaves behind: an alarm it did not change is deleted by the
        scheduler once the turn succeeded, and retried (so unknown here) if it failed."""
        if turn.kind is TurnKind.ALARM and turn.alarm is None:
            self._known = UNKNOWN if turn.failed else None

    async def _load(self) -> int | None:
        if isinstance(self._known, _Unknown):
            request = pb.GetAlarmRequest(object=self._activation.object_pb)
            response = await self._activation.call(methods.GET_ALARM, request)
            if isinstance(self._known, _Unknown):  # a turn may have set it meanwhile
                self._known = int(response.at_ms) if response.set else None
        return self._known

    def _own_turn(self) -> Turn | None:
        turn = current_turn.get()
        return turn if turn is not None and turn.activation is self._activation else None

    def _turn(self) -> Turn:
        turn = self._own_turn()
        if turn is None:
            raise TurnOver(f"{self!r} can be changed only by its object's own handlers")
        turn.check_open()
        return turn
