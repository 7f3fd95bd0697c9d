"""One connection's send buffer: what a handler sent that has not left the worker yet.

:class:`~wsgate.worker.connection.Connection` owns one per handler call. A message leaves
it by one of three ways, whichever keeps the order at the least cost:

- :meth:`SendBuffer.take`: all of it at once, into the Accept (sends of ``on_connect``);
- :meth:`SendBuffer.finish`: what is left when the handler returns, with the final ack
  (written by hand from the buffered bytes: :func:`wsgate.batches.final_ack_entry`);
- :meth:`SendBuffer.flush` (now) or :meth:`SendBuffer.flush_soon` (at the event loop's
  next turn, so only if the handler waits on something): published as one
  ``GatewayCommand`` each, through the injected :class:`CommandSink`, once the handler's
  writes are durable (its :class:`~wsgate.worker.gate.OutputGate`).

Messages are buffered serialized (``Message`` envelopes, from
:func:`~wsgate.worker.messages.encoded_message`): most leave inside a final ack, and
those need no ``pb.Message`` object at all; the other ways out parse them back.

One flush runs at a time; a flush waits for the one before it, and whatever is appended
while one runs goes in its next round, so messages leave in the order appended.
:meth:`SendBuffer.discard` drops everything, a flush in progress included (the handler
failed: the output its gate held goes with it). No method raises but :meth:`flush` (what
the sink or the gate raises) and :meth:`finish` (what the flush it waits for raised).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.gate import OutputGate


class CommandSink(Protocol):
    """Where commands for gateways go (NATS in a worker)."""

    async def send_command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        """Deliver ``command`` to the gateway that holds ``connection_id``."""
        ...


#: Buffered bytes beyond which sends are published as commands at once, so an ack stays
#: small (NATS' payload limit) and a handler that sends a lot streams it.
MAX_BUFFERED_BYTES = 64 * 1024


class SendBuffer:
    """The messages sent on connection ``connection_id`` by the handler of event
    ``sequence`` (0 in ``on_connect``), not yet handed on.

    Flushed messages go to ``sink`` as ``GatewayCommand(send=..., in_reply_to=sequence)``
    after ``gate`` (if any) has opened. ``loop`` is the running loop where known (passed:
    ``asyncio.get_running_loop()`` costs a ``getpid()`` on Python 3.11).
    """

    __slots__ = (
        "_bytes",
        "_connection_id",
        "_flush_scheduled",
        "_flushing",
        "_gate",
        "_loop",
        "_messages",
        "_sequence",
        "_sink",
    )

    def __init__(
        self,
        sink: CommandSink,
        connection_id: str,
        sequence: int = 0,
        gate: OutputGate | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._sink = sink
        self._connection_id = connection_id
        self._sequence = sequence
        self._gate = gate
        self._loop = loop
        self._messages: list[bytes] = []
        self._bytes = 0
        self._flush_scheduled = False
        self._flushing: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """How many messages are buffered (not counting those a flush has taken)."""
        return len(self._messages)

    @property
    def buffered_bytes(self) -> int:
        """The payload bytes of the buffered messages."""
        return self._bytes

    def append(self, message: bytes, size: int) -> bool:
        """Buffer ``message``, a serialized ``Message`` envelope (``size``: its payload's
        bytes). Returns whether the buffer
        now holds more than MAX_BUFFERED_BYTES: the owner should then ``await flush()``."""
        self._messages.append(message)
        self._bytes += size
        return self._bytes > MAX_BUFFERED_BYTES

    def take(self) -> list[pb.Message]:
        """Remove and return everything buffered, as envelopes (in ``on_connect``, where
        nothing is flushed: it all travels in the Accept)."""
        taken, self._messages = self._messages, []
        self._bytes = 0
        return [pb.Message.FromString(message) for message in taken]

    async def finish(self) -> list[bytes]:
        """Wait for a flush in progress, then remove and return what is still buffered,
        serialized (it goes with the final ack)."""
        if self._flushing is not None:
            await self._flushing
        taken, self._messages = self._messages, []
        self._bytes = 0
        return taken

    def finish_nowait(self) -> list[bytes] | None:
        """:meth:`finish` when no flush is in progress (what is buffered, removed); None
        while one is (then await :meth:`finish`)."""
        if self._flushing is not None:
            return None
        taken, self._messages = self._messages, []
        self._bytes = 0
        return taken

    async def flush(self) -> None:
        """Publish everything buffered now, after a flush in progress. Returns at once when
        nothing is buffered or being published."""
        if self._flushing is not None:
            await self._flushing
        if self._messages:
            await self._publish()

    def flush_soon(self) -> None:
        """Flush at the event loop's next turn, unless already scheduled. Run from a
        handler, that happens only if it waits on something before it returns; if it
        returns first, :meth:`finish` takes the messages for the ack."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._start_flush)

    def discard(self) -> None:
        """Drop what is buffered and cancel a flush in progress."""
        self._messages = []
        self._bytes = 0
        flushing, self._flushing = self._flushing, None
        if flushing is not None and not flushing.done():
            flushing.cancel()

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        if self._messages and self._flushing is None:
            loop = self._loop or asyncio.get_running_loop()
            self._flushing = loop.create_task(self._publish())

    async def _publish(self) -> None:
        # One task at a time publishes, in order; what arrives meanwhile is taken next round.
        try:
            if self._gate is not None:
                await self._gate.open()
            while self._messages:
                taken, self._messages = self._messages, []
                self._bytes = 0
                for message in taken:
                    await self._sink.send_command(
                        self._connection_id,
                        pb.GatewayCommand(
                            connection_ids=[self._connection_id],
                            send=pb.Message.FromString(message),
                            in_reply_to=self._sequence,
                        ),
                    )
        finally:
            if self._flushing is asyncio.current_task():
                self._flushing = None
