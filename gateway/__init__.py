"""The gateway role: terminates WebSockets and moves their events over NATS.

It owns live sockets (upgrade, frames, limits, shutdown) and never runs user code or
keeps durable state. :class:`wsgate.gateway.server.Gateway` is the entry point.
"""

from wsgate.gateway.server import Gateway

__all__ = ["Gateway"]
