"""Frames waiting to go out on one socket, written in order by a task that exists only while
there is something to write.

Commands arrive from NATS for many connections on one subscription; writing to a slow
socket there would stall every other connection. So each frame is queued here without
waiting, and a per-connection writer task, started on demand and ended when the queue is
empty, does the writing. An idle connection holds no task.

The common case costs no task and no coroutine: when nothing is queued and the transport
takes data (not paused at its high-water mark), a data frame is encoded here and written
straight to the transport, as aiohttp's writer would write it. Otherwise aiohttp's send, a
coroutine that only suspends when the transport's buffer is full, is started eagerly (see
:mod:`wsgate.eager`) and handed to the writer task only if it does suspend.

Slow consumers: the bytes queued and not yet written (the frame being written included;
text counted in characters) are bounded by ``max_bytes``. A frame that would pass the
bound is not queued; ``on_overflow`` is called instead, and the owner closes the connection
(1008) with :meth:`force_close`, which drops what is queued, stops the writer, and sends
the close frame, aborting the TCP connection if the client does not take even that within
``close_timeout_s``. (Any close does: aiohttp closes the transport after the close frame,
and a transport ends the TCP connection only once it has sent its buffer.)

Every change of the bytes queued is also made to the gateway's
:class:`~wsgate.gateway.budget.OutboundBudget`, whose total is the sum over all outboxes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol

from wsgate.eager import resume
from wsgate.gateway.budget import OutboundBudget

log = logging.getLogger(__name__)

#: The first byte of an unfragmented text or binary frame (RFC 6455 5.2).
_FIN_TEXT = 0x81
_FIN_BINARY = 0x82
#: The header of a server's (unmasked) frame, by payload length: < 126, < 2**16, more.
_HEADER_7 = struct.Struct("!BB").pack
_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack


@dataclass(frozen=True)
class CloseFrame:
    """Close the socket with this code and reason once everything before it is written."""

    code: int
    reason: str


Frame = str | bytes | CloseFrame


class OutboxPolicy:
    """What every outbox of a gateway shares, made once: the per-socket bound, the
    gateway's budget, the close timeout, and where drops and overflows are reported
    (``on_overflow`` gets the outbox's ``key``: no closure or bound method per
    connection, which would cost memory on every idle one)."""

    __slots__ = ("budget", "close_timeout_s", "max_bytes", "on_dropped", "on_overflow")

    def __init__(
        self,
        *,
        max_bytes: int,
        budget: OutboundBudget,
        close_timeout_s: float,
        on_dropped: Callable[[int], None],
        on_overflow: Callable[[str], None],
    ) -> None:
        self.max_bytes = max_bytes
        self.budget = budget
        self.close_timeout_s = close_timeout_s
        self.on_dropped = on_dropped
        self.on_overflow = on_overflow


class Outbox:
    """An ordered, bounded queue of frames for one WebSocket, drained by an on-demand task.

    ``push`` never blocks. Frames after a CloseFrame are dropped (and counted). ``key``
    names the outbox to ``policy.on_overflow``.
    """

    # Per connection, so slotted; the deque exists only while a write has to wait (an
    # empty one is 0.75 KiB, on every idle connection).
    __slots__ = (
        "_closed",
        "_frames",
        "_key",
        "_policy",
        "_queued_bytes",
        "_transport",
        "_writer",
        "_ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        policy: OutboxPolicy,
        key: str,
        transport: asyncio.Transport | None,
    ) -> None:
        self._ws = ws
        self._transport = transport
        self._policy = policy
        self._key = key
        self._frames: collections.deque[Frame] | None = None
        self._queued_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued_bytes(self) -> int:
        """Bytes queued or being written."""
        return self._queued_bytes

    def push(self, frame: Frame) -> None:
        """Queue a frame; starts the writer if none is running."""
        if self._closed:
            self._policy.on_dropped(1)
            return
        if isinstance(frame, CloseFrame):
            self._closed = True
        else:
            size = len(frame)
            if self._queued_bytes + size > self._policy.max_bytes:
                policy = self._policy
                policy.on_dropped(1)
                policy.on_overflow(self._key)
                return
            if self._writer is None:
                if self._write_now(frame):
                    return
                self._count(size)
                self._write_eagerly(frame)
                return
            self._count(size)
        self._queue(frame)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    def _queue(self, frame: Frame) -> None:
        frames = self._frames
        if frames is None:
            frames = self._frames = collections.deque()
        frames.append(frame)

    def _write_now(self, frame: str | bytes) -> bool:
        """Write a data frame straight to the transport, if nothing stands in its way:
        nothing queued (the caller checked), the socket open, the transport taking data
        (not paused by its high-water mark). False, having written nothing, otherwise.

        The frame is what aiohttp's writer would make of it (a server's frames are
        unmasked, and the gateway's uncompressed), without its coroutines: this is the
        path of nearly every frame the gateway sends.
        """
        transport = self._transport
        ws = self._ws
        if transport is None or transport.is_closing() or ws.closed or not ws.prepared:
            return False
        protocol: BaseProtocol = transport.get_protocol()  # type: ignore[assignment]
        if protocol.writing_paused:
            return False
        if isinstance(frame, str):
            payload = frame.encode("utf-8")
            first = _FIN_TEXT
        else:
            payload = frame
            first = _FIN_BINARY
        size = len(payload)
        if size < 126:
            transport.write(_HEADER_7(first, size) + payload)
        elif size < 65536:
            transport.write(_HEADER_16(first, 126, size) + payload)
        else:
            # Not copied into one buffer with its header.
            transport.write(_HEADER_64(first, 127, size))
            transport.write(payload)
        return True

    def _write_eagerly(self, frame: str | bytes) -> None:
        coro = self._write(frame)
        try:
            suspended_on = coro.send(None)
        except StopIteration:
            self._count(-len(frame))
            return
        except (ConnectionError, RuntimeError) as exc:
            self._write_failed(frame, exc)
            return
        # The socket's buffer is full: the writer task finishes this write, then the rest.
        self._writer = asyncio.get_running_loop().create_task(
            self._drain(suspended=(coro, suspended_on, frame))
        )

    async def flush(self) -> None:
        """Wait until everything queued so far has been written (or failed)."""
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(writer)

    def force_close(self, code: int, reason: str) -> None:
        """Drop what is queued and close now, ahead of it (the slow-consumer path)."""
        frames = self._frames
        if frames:
            dropped = sum(1 for f in frames if not isinstance(f, CloseFrame))
            if dropped:
                self._policy.on_dropped(dropped)
            frames.clear()
        self._count(-self._queued_bytes)
        self._closed = True
        writer = self._writer
        if writer is not None:
            writer.cancel()
        self._queue(CloseFrame(code, reason))
        self._writer = asyncio.get_running_loop().create_task(self._drain(after=writer))

    async def _drain(
        self,
        after: asyncio.Task[None] | None = None,
        suspended: tuple[Coroutine[Any, Any, None], Any, Frame] | None = None,
    ) -> None:
        if after is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await after
        try:
            if suspended is not None:
                coro, suspended_on, frame = suspended
                try:
                    await resume(coro, suspended_on)
                except (ConnectionError, RuntimeError) as exc:
                    self._write_failed(frame, exc)
                finally:
                    self._release(frame)
            while frames := self._frames:
                frame = frames.popleft()
                try:
                    await self._write(frame)
                except (ConnectionError, RuntimeError) as exc:
                    self._write_failed(frame, exc)
                finally:
                    self._release(frame)
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None
                # Emptied: an idle connection keeps no deque.
                if not self._frames:
                    self._frames = None

    def _count(self, delta: int) -> None:
        self._queued_bytes += delta
        self._policy.budget.total += delta

    def _release(self, frame: Frame) -> None:
        if not isinstance(frame, CloseFrame):
            # Never below 0: force_close and a failed write set the count to 0 while a
            # frame was still being written.
            self._count(-min(self._queued_bytes, len(frame)))

    def _write_failed(self, frame: Frame, exc: BaseException) -> None:
        # The socket went away under us: the read loop sees that too and reports the
        # close; what is left here can no longer be delivered.
        frames = self._frames
        dropped = 1
        if frames:
            dropped += len(frames)
            frames.clear()
        self._count(-self._queued_bytes)
        self._closed = True
        self._policy.on_dropped(dropped)
        log.debug("write failed, %d frame(s) dropped: %s", dropped, exc)

    async def _write(self, frame: Frame) -> None:
        ws = self._ws
        if isinstance(frame, str):
            await ws.send_str(frame)
        elif isinstance(frame, bytes):
            await ws.send_bytes(frame)
        else:
            try:
                async with asyncio.timeout(self._policy.close_timeout_s):
                    await ws.close(code=frame.code, message=frame.reason.encode("utf-8"))
            except TimeoutError:
                # The client takes nothing, not even the close frame: cut the connection.
                self._abort()
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # Not ours: force_close cancelled a write that waited for the socket to
                # drain, and aiohttp (3.14) waits for that on one future per socket, which
                # that cancel left cancelled, so this close's wait failed at once. The close
                # frame is in the transport's buffer all the same.
            self._cut_if_stalled()

    def _cut_if_stalled(self) -> None:
        """After ``ws.close``: aiohttp has closed the transport, which ends the TCP
        connection once its buffer is sent; never, if the client takes nothing (its
        window stays shut). Cut it, then, if it has not taken it all within the close
        timeout. Scheduled only when something is left to send: the timer holds the
        transport."""
        transport = self._transport
        if transport is not None and transport.get_write_buffer_size() > 0:
            asyncio.get_running_loop().call_later(self._policy.close_timeout_s, transport.abort)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
