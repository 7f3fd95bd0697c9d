"""Frames waiting to go out on one socket, written in order by a task that exists only while
there is something to write.

Commands arrive from NATS for many connections on one subscription; writing to a slow
socket there would stall every other connection. So each command is queued here without
waiting, and a per-connection writer task, started on demand and ended when the queue is
empty, does the writing. An idle connection holds no task.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CloseFrame:
    """Close the socket with this code and reason once everything before it is written."""

    code: int
    reason: str


Frame = str | bytes | CloseFrame


class Outbox:
    """An ordered queue of frames for one WebSocket, drained by an on-demand writer task.

    ``push`` never blocks. Frames after a CloseFrame are dropped. Bounding the queue for
    slow consumers is a later step (see docs/architecture.md).
    """

    def __init__(self, ws: web.WebSocketResponse, on_dropped: Callable[[int], None]) -> None:
        self._ws = ws
        self._frames: collections.deque[Frame] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._on_dropped = on_dropped

    def push(self, frame: Frame) -> None:
        """Queue a frame; starts the writer if none is running."""
        if self._closed:
            self._on_dropped(1)
            return
        if isinstance(frame, CloseFrame):
            self._closed = True
        self._frames.append(frame)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def flush(self) -> None:
        """Wait until everything queued so far has been written (or failed)."""
        writer = self._writer
        if writer is not None:
            await asyncio.shield(writer)

    async def _drain(self) -> None:
        try:
            while self._frames:
                frame = self._frames.popleft()
                try:
                    await _write(self._ws, frame)
                except (ConnectionError, RuntimeError) as exc:
                    # The socket went away under us: the read loop sees that too and
                    # reports the close; what is left here can no longer be delivered.
                    dropped = 1 + len(self._frames)
                    self._frames.clear()
                    self._closed = True
                    self._on_dropped(dropped)
                    log.debug("write failed, %d frame(s) dropped: %s", dropped, exc)
        finally:
            self._writer = None


def _write(ws: web.WebSocketResponse, frame: Frame) -> Awaitable[object]:
    if isinstance(frame, str):
        return ws.send_str(frame)
    if isinstance(frame, bytes):
        return ws.send_bytes(frame)
    return ws.close(code=frame.code, message=frame.reason.encode("utf-8"))
