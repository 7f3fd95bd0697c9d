"""The baseline of ``wsgate bench echo``: a plain single-process aiohttp echo server.

What a WebSocket echo costs with the same server library on the same event loop (uvloop)
and no bus, no worker and no envelopes: the ceiling the full path is compared with.
``python -m wsgate.bench.baseline --port 0 --ready-fd N`` serves ``/echo`` on 127.0.0.1
and reports ``{"role": "baseline", "url", "port", "pid"}`` on the descriptor, as the
roles do (:mod:`wsgate.readiness`). Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import sys

from aiohttp import WSMsgType, web

from wsgate.bench.config import ECHO_PATH
from wsgate.readiness import notify_ready


async def echo(request: web.Request) -> web.WebSocketResponse:
    """Send every message back as it came: text as text, binary as binary."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def serve(host: str, port: int, ready_fd: int | None) -> int:
    """Listen, report readiness, serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    app = web.Application()
    app.router.add_get(ECHO_PATH, echo)
    # As the gateway: no access log, signals handled here.
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
        notify_ready(
            ready_fd,
            {
                "role": "baseline",
                "url": f"http://{host}:{bound}",
                "port": bound,
                "pid": os.getpid(),
            },
        )
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse flags and serve on uvloop."""
    parser = argparse.ArgumentParser(prog="python -m wsgate.bench.baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-fd", type=int, default=None)
    args = parser.parse_args(argv)
    # As the gateway does at start (`bench idle` opens thousands of connections to both).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(args.host, args.port, args.ready_fd))


if __name__ == "__main__":
    sys.exit(main())
