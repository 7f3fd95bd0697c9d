"""One heartbeat for all of a gateway's WebSockets (``WSGATE_HEARTBEAT_S``).

aiohttp's own heartbeat (``WebSocketResponse(heartbeat=...)``) keeps a timer per socket
and, on every chunk received, schedules a callback that re-arms it: about 0.55 KiB per
idle connection and a ``call_soon`` per inbound chunk. Here one timer serves them all.
Each watched socket has a counter of sweeps without inbound data, that receiving any
data sets back to 0 (aiohttp's per-chunk hook, one attribute store). A sweep every half
period adds 1 to each counter; at 2 (a period or a little more without data) the socket is
pinged; at 3 (no data, pong or other, within half a period after the ping) it is
dropped the way aiohttp drops it: closed as 1006 (abnormal closure), and the reader sees
an ERROR message holding a TimeoutError, which the read loop reports as "no pong to
heartbeat". So the semantics are aiohttp's with the period rounded to half of it.

The timer runs only while a socket is watched. ``forget`` must follow every ``watch``
(the handler's ``finally``): it also breaks the reference cycle protocol → hook →
socket → request → protocol, so a closed connection is freed by reference counting
(aiohttp's own heartbeat left the same cycle behind, and under connection churn the
gateway's RSS grew by about 0.25 KB per connection until a full collection, which the
collector's thresholds set at start-up make rare: tests/integration/test_gateway_memory.py).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

log = logging.getLogger(__name__)

#: An unmasked PING frame with no payload (RFC 6455 5.5.2), as a server sends it. Written
#: straight to the transport: aiohttp writes every uncompressed frame in one synchronous
#: step, so it never lands inside another frame.
PING_FRAME = b"\x89\x00"
#: Sweeps without inbound data after which a socket is pinged, then dropped.
_PING_AT = 2
_DROP_AT = 3


class _Watched:
    """One socket's heartbeat state."""

    __slots__ = ("idle", "transport", "ws")

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        self.ws = ws
        self.transport = transport
        #: Sweeps since data last came in.
        self.idle = 0

    def touch(self) -> None:
        """Data came in (called by aiohttp's protocol for every chunk)."""
        self.idle = 0


class HeartbeatSweep:
    """Pings the gateway's quiet WebSockets and drops those that do not answer.

    ``interval_s``: the heartbeat period; 0 turns it off (``watch`` does nothing).
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        #: By the request's protocol (a request is a mapping, not hashable).
        self._watched: dict[object, _Watched] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, request: web.BaseRequest, ws: web.WebSocketResponse) -> None:
        """Look after ``ws``, prepared (upgraded) on ``request``'s connection."""
        if not self.interval_s or request.transport is None:
            return
        protocol = request.protocol
        watched = _Watched(ws, request.transport)
        # aiohttp's hook for its own heartbeat, left unused by heartbeat=None: its
        # protocol calls it for every chunk it receives, pongs included.
        protocol._data_received_cb = watched.touch
        self._watched[protocol] = watched
        if self._timer is None:
            self._schedule()

    def forget(self, request: web.BaseRequest) -> None:
        """Stop looking after the socket of ``request`` (any request: unwatched ones are
        ignored). Call it once its handler is done."""
        protocol = request.protocol
        if self._watched.pop(protocol, None) is not None:
            protocol._data_received_cb = None

    def close(self) -> None:
        """Stop the timer (sockets still watched are left as they are)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + self.interval_s / 2, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        if not self._watched:
            return  # watch() starts it again
        self._schedule()  # first: a failure below must not stop the heartbeat
        for watched in list(self._watched.values()):
            watched.idle += 1
            ws = watched.ws
            if watched.idle < _PING_AT or ws.closed:
                continue
            try:
                if watched.idle == _PING_AT:
                    if not watched.transport.is_closing():
                        watched.transport.write(PING_FRAME)
                elif watched.idle >= _DROP_AT:
                    _drop(ws, self.interval_s / 2)
            except Exception:  # one socket's failure must not stop the sweep
                log.exception("heartbeat of a WebSocket failed")


def _drop(ws: web.WebSocketResponse, waited_s: float) -> None:
    """Close ``ws`` as aiohttp does when its heartbeat gets no pong: 1006, the transport
    closed, and a TimeoutError for the reader."""
    ws._handle_ping_pong_exception(TimeoutError(f"No PONG received after {waited_s:g} seconds"))
