"""One load-generator process of ``wsgate bench`` (``python -m wsgate.bench.loadgen``).

The parent starts several of these so that the client side is never the bottleneck; each
runs picows (a WebSocket client written in Cython, driven by callbacks, no coroutine per
message) on uvloop. Protocol with the parent, in order:

1. The parent passes ``--ready-fd N`` (see :mod:`wsgate.readiness`). The process opens its
   connections, then writes one JSON line there: ``{"role": "loadgen", "pid", "open",
   "failed", "error"}`` (``error``: the first failure, or "").
2. ``idle``: it holds the connections until SIGTERM, then closes them (1000) and exits.
3. ``echo``: it waits for SIGUSR1 (the parent sends it to every client at once), runs
   each connection as a closed loop (send a message, wait for its echo, send the next)
   for ``--warmup-s`` then ``--duration-s``, prints one JSON object on stdout
   (``{"count", "errors", "window_s", "cpu_s", "run_s", "histogram", "answered"}``),
   closes and exits. SIGTERM at any point closes the connections and exits.
4. ``count``: as ``echo``, against a durable counter (``/counter/{name}`` of the example
   app): each message is the text ``increment``, each answer is the new value, and the
   first message of a connection (the value ``on_connect`` sends) is not an answer.
   ``answered`` counts every increment answered, warm-up included, so that the parent can
   check the counter against it. With ``--spread N``, connection ``i`` (counting from
   ``--offset``) uses ``<url><i mod N>``: one object each.

Only the round trips that complete inside the measurement window are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from wsgate.bench.histogram import LatencyHistogram
from wsgate.readiness import notify_ready

#: Handshakes in flight at once: enough to open thousands quickly without a thundering
#: herd on the gateway's connect path (each upgrade is a NATS request to a worker).
CONNECT_CONCURRENCY = 64
HANDSHAKE_TIMEOUT_S = 15.0
#: How long past the end of the window a round trip may still be outstanding.
DRAIN_GRACE_S = 10.0
CLOSE_TIMEOUT_S = 5.0
#: Wait at most this long for the parent's start signal.
GO_TIMEOUT_S = 600.0


def raise_nofile_limit() -> int:
    """Raise this process' soft RLIMIT_NOFILE to its hard limit; returns the soft limit
    now in force. Each connection is a descriptor, and the usual soft limit (1024) is
    below what a load generator needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class EchoWindow:
    """The clock of one echo run: a warm-up, then the measurement window.

    Pure bookkeeping for all connections of a process: :meth:`completed` is told of each
    round trip and says whether the connection should send another.
    """

    def __init__(self, start_ns: int, warmup_s: float, duration_s: float) -> None:
        self.measure_from_ns = start_ns + int(warmup_s * 1e9)
        self.measure_until_ns = self.measure_from_ns + int(duration_s * 1e9)
        self.histogram = LatencyHistogram()
        self.count = 0

    def completed(self, sent_ns: int, now_ns: int) -> bool:
        """Count a round trip sent at ``sent_ns`` and answered at ``now_ns`` if it ended in
        the window; True while the window is still open (send the next message)."""
        if now_ns >= self.measure_until_ns:
            return False
        if now_ns >= self.measure_from_ns:
            self.count += 1
            self.histogram.record_ns(now_ns - sent_ns)
        return True


class EchoLoad:
    """What the echo connections of one process share: the payload, the window, the
    error count and the number of loops still running."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.window: EchoWindow | None = None
        self.errors = 0
        self.running = 0
        #: Answers received, warm-up included.
        self.answered = 0
        self.all_done = asyncio.Event()

    def loop_ended(self) -> None:
        """One connection's loop is over (window closed, or the connection failed)."""
        self.running -= 1
        if self.running <= 0:
            self.all_done.set()


class EchoClient(WSListener):
    """One connection's closed loop: at most one message in flight."""

    #: Whether the first message the server sends is a greeting, not an answer.
    greeted = False

    def __init__(self, load: EchoLoad) -> None:
        super().__init__()
        self.load = load
        self.transport: WSTransport | None = None
        self.active = False
        self._sent_ns = 0
        self._greeting_pending = self.greeted

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def start(self) -> None:
        """Begin the loop (call once, after the window is set)."""
        if self.transport is None or self.transport.is_disconnected:
            self.load.errors += 1
            return
        self.active = True
        self.load.running += 1
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self._sent_ns = time.perf_counter_ns()
        self.transport.send(WSMsgType.BINARY, self.load.payload)

    def _check(self, frame: WSFrame) -> bool:
        """Whether ``frame`` is the answer expected (an echo of the same size)."""
        return frame.payload_size == len(self.load.payload)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type not in (WSMsgType.BINARY, WSMsgType.TEXT):
            return
        if self._greeting_pending:
            self._greeting_pending = False
            return
        if not self.active:
            return
        now_ns = time.perf_counter_ns()
        self.load.answered += 1
        if not self._check(frame):
            self.load.errors += 1
        window = self.load.window
        assert window is not None
        if window.completed(self._sent_ns, now_ns):
            self._send()
        else:
            self._end()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.active:
            self.load.errors += 1
            self._end()

    def _end(self) -> None:
        if self.active:
            self.active = False
            self.load.loop_ended()

    def stalled(self) -> bool:
        """Still waiting for an echo after the run (counted as an error)."""
        return self.active


class CountClient(EchoClient):
    """A closed loop of increments of a durable counter (see the module docstring)."""

    greeted = True
    MESSAGE = b"increment"

    def _send(self) -> None:
        assert self.transport is not None
        self._sent_ns = time.perf_counter_ns()
        self.transport.send(WSMsgType.TEXT, self.MESSAGE)

    def _check(self, frame: WSFrame) -> bool:
        return frame.msg_type == WSMsgType.TEXT


class IdleClient(WSListener):
    """A connection that only answers what the protocol requires (pings, close)."""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def open_connections(
    url: str | Callable[[int], str], count: int, factory: Callable[[], WSListener]
) -> tuple[list[tuple[WSTransport, Any]], int, str]:
    """Open ``count`` connections, :data:`CONNECT_CONCURRENCY` handshakes at a time, to
    ``url`` (or ``url(i)`` for the ``i``-th).

    Returns the open (transport, listener) pairs, the number that failed and the first
    failure's description.
    """
    slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(i: int) -> tuple[WSTransport, Any]:
        target = url if isinstance(url, str) else url(i)
        async with slots, asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            return await ws_connect(factory, target, websocket_handshake_timeout=None)

    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    opened: list[tuple[WSTransport, Any]] = []
    failures: list[BaseException] = []
    for result in results:
        if isinstance(result, BaseException):
            failures.append(result)
        else:
            opened.append(result)
    first = f"{type(failures[0]).__name__}: {failures[0]}" if failures else ""
    return opened, len(failures), first


async def close_all(transports: Sequence[WSTransport]) -> None:
    """Close every connection with 1000 and wait (bounded) until they are down."""
    for transport in transports:
        if not transport.is_disconnected:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
    waits = [t.wait_disconnected() for t in transports]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await asyncio.gather(*waits)


def _signal_events(*signums: int) -> dict[int, asyncio.Event]:
    loop = asyncio.get_running_loop()
    events: dict[int, asyncio.Event] = {}
    for signum in signums:
        events[signum] = asyncio.Event()
        loop.add_signal_handler(signum, events[signum].set)
    return events


async def _first(*events: asyncio.Event, timeout_s: float) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def run_idle(url: str, connections: int, ready_fd: int | None) -> int:
    """Open ``connections`` idle connections, report, hold them until SIGTERM."""
    signals = _signal_events(signal.SIGTERM, signal.SIGINT)
    limit = raise_nofile_limit()
    opened, failed, error = await open_connections(url, connections, IdleClient)
    notify_ready(ready_fd, _ready_info(len(opened), failed, error, limit))
    await _first(*signals.values(), timeout_s=GO_TIMEOUT_S)
    await close_all([t for t, _ in opened])
    return 0


async def run_echo(
    url: str | Callable[[int], str],
    connections: int,
    size_bytes: int,
    warmup_s: float,
    duration_s: float,
    ready_fd: int | None,
    client_type: type[EchoClient] = EchoClient,
) -> int:
    """Open the connections, report, wait for SIGUSR1, run the closed loops (of
    ``client_type``), print the result on stdout."""
    signals = _signal_events(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    limit = raise_nofile_limit()
    load = EchoLoad(os.urandom(size_bytes))
    opened, failed, error = await open_connections(url, connections, lambda: client_type(load))
    notify_ready(ready_fd, _ready_info(len(opened), failed, error, limit))
    go = signals[signal.SIGUSR1]
    await _first(*signals.values(), timeout_s=GO_TIMEOUT_S)
    if not go.is_set():
        await close_all([t for t, _ in opened])
        return 1
    clients: list[EchoClient] = [listener for _, listener in opened]
    cpu_start_s = time.process_time()
    load.window = EchoWindow(time.perf_counter_ns(), warmup_s, duration_s)
    started_ns = time.perf_counter_ns()
    for client in clients:
        client.start()
    if load.running > 0:
        stop = [signals[signal.SIGTERM], signals[signal.SIGINT]]
        await _first(load.all_done, *stop, timeout_s=warmup_s + duration_s + DRAIN_GRACE_S)
    stalled = sum(client.stalled() for client in clients)
    result = {
        "count": load.window.count,
        "errors": load.errors + stalled,
        "window_s": duration_s,
        # How busy this process was: a client near one core may be the bottleneck.
        "cpu_s": time.process_time() - cpu_start_s,
        "run_s": (time.perf_counter_ns() - started_ns) / 1e9,
        "histogram": load.window.histogram.to_json(),
        "answered": load.answered,
    }
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    await close_all([t for t, _ in opened])
    return 0


def _ready_info(opened: int, failed: int, error: str, nofile_limit: int) -> dict[str, Any]:
    return {
        "role": "loadgen",
        "pid": os.getpid(),
        "open": opened,
        "failed": failed,
        "error": error,
        "nofile_limit": nofile_limit,
    }


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m wsgate.bench.loadgen``."""
    parser = argparse.ArgumentParser(prog="python -m wsgate.bench.loadgen")
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("echo", "count", "idle"):
        p = sub.add_parser(mode)
        p.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/PATH")
        p.add_argument("--connections", type=int, required=True)
        p.add_argument("--ready-fd", type=int, default=None)
        if mode in ("echo", "count"):
            p.add_argument("--size", type=int, default=64, help="message size in bytes")
            p.add_argument("--warmup-s", type=float, default=2.0)
            p.add_argument("--duration-s", type=float, default=10.0)
        if mode == "count":
            p.add_argument("--spread", type=int, default=0, help="objects (0: one, the url)")
            p.add_argument("--offset", type=int, default=0, help="index of the first connection")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run one mode on uvloop."""
    args = build_parser().parse_args(argv)
    import uvloop

    if args.mode == "echo":
        coro = run_echo(
            args.url, args.connections, args.size, args.warmup_s, args.duration_s, args.ready_fd
        )
    elif args.mode == "count":
        url: str | Callable[[int], str] = args.url
        if args.spread:
            base, spread, offset = args.url, args.spread, args.offset

            def url(i: int) -> str:
                return f"{base}{(offset + i) % spread}"

        coro = run_echo(
            url,
            args.connections,
            args.size,
            args.warmup_s,
            args.duration_s,
            args.ready_fd,
            CountClient,
        )
    else:
        coro = run_idle(args.url, args.connections, args.ready_fd)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


if __name__ == "__main__":
    sys.exit(main())
