"""The gateway role: terminates WebSockets and moves their events over NATS.

It owns live sockets (upgrade, frames, limits, shutdown) and never runs user code or
keeps durable state. :class:`gateway.server.Gateway` is the entry point.
"""

from gateway.server import Gateway

__all__ = ["Gateway"]
