"""``/healthz``, ``/readyz`` and ``/metrics`` (Prometheus), the same on every role.

``/healthz`` answers 200 while the process runs its event loop (liveness). ``/readyz``
answers 200 only while the role wants traffic: started, connected to NATS, not draining
(readiness; it turns 503 first thing on SIGTERM); a role may give the reason it is not
ready as the 503's body (the state service's low disk). ``/metrics`` renders the role's own
registry (no global registry: two roles in one test process stay apart).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from wsgate.service import Service

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
PROBE_PATHS = frozenset({HEALTH_PATH, READY_PATH, METRICS_PATH})


def add_probe_routes(
    app: web.Application,
    *,
    is_ready: Callable[[], bool],
    registry: CollectorRegistry,
    not_ready_reason: Callable[[], str | None] | None = None,
) -> None:
    """Add the three routes to an aiohttp application. ``not_ready_reason``, if given, is
    asked when ``is_ready`` holds: a reason makes ``/readyz`` 503 with it as the body."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(request: web.Request) -> web.Response:
        if not is_ready():
            return web.Response(status=503, text="not ready")
        reason = not_ready_reason() if not_ready_reason is not None else None
        if reason is not None:
            return web.Response(status=503, text=f"not ready: {reason}")
        return web.Response(text="ready")

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get(HEALTH_PATH, healthz)
    app.router.add_get(READY_PATH, readyz)
    app.router.add_get(METRICS_PATH, metrics)


class ProbeServer(Service):
    """A small HTTP server with only the probe routes, for roles that serve no HTTP of
    their own (the worker)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        is_ready: Callable[[], bool],
        registry: CollectorRegistry,
        not_ready_reason: Callable[[], str | None] | None = None,
    ) -> None:
        super().__init__()
        self._host = host
        self._port = port
        app = web.Application()
        add_probe_routes(
            app, is_ready=is_ready, registry=registry, not_ready_reason=not_ready_reason
        )
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)

    async def start(self) -> None:
        """Listen; raises OSError if the port is taken."""
        self._enter_running()
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening. Idempotent."""
        if not await self._enter_closing():
            return
        try:
            await self._runner.cleanup()
        finally:
            self._mark_closed()
