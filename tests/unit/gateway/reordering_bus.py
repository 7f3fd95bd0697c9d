"""An in-memory bus (:class:`wsgate.bus.Bus`) that reorders everything NATS may reorder.

NATS promises one order only: what one publisher (one client connection) publishes reaches
each subscriber in the order it was published. Messages of different publishers interleave
in any way, and a client library that runs one task per subscription may wake those tasks
in any order, so two subscriptions of one client can see a publisher's messages out of
order relative to each other.

:class:`ReorderingBus` does all of that on purpose, driven by a seeded ``random.Random``:

- what the far side publishes (:meth:`publish_as`) waits in its publisher's queue;
- a pump moves one message at a time, at random, either from the head of a random
  publisher's queue into the pending queue of every subscription it matches ("arrive"),
  or from the head of a random subscription's pending queue into its callback ("wake");
- between steps it yields to the event loop a random number of times, so the gateway's
  own tasks (read loops, outbox writers) run at varied points.

So each publisher's order holds per subscription, and nothing else. What the gateway
publishes goes to ``on_publish`` (the test's fake workers) at once, each event of an
EventBatch alone with its own reply subject, as a worker takes it; its requests (connect)
to ``on_request``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from wsgate import event_batch
from wsgate.config import GatewayConfig
from wsgate.v1 import envelope_pb2 as pb


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


@dataclass(eq=False)
class _Subscription:
    subject: str
    cb: Callable[[Msg], Awaitable[None]]
    pending: deque[Msg] = field(default_factory=deque)


@dataclass(frozen=True)
class _Published:
    subject: str
    data: bytes
    reply: str
    headers: dict[str, str] | None


class ReorderingBus:
    """A :class:`wsgate.bus.Bus` for one gateway, with adversarial ordering (see module)."""

    def __init__(
        self,
        rng: random.Random,
        *,
        on_publish: Callable[[str, bytes, str], None],
        on_request: Callable[[str, bytes], Awaitable[bytes]],
        max_payload: int = 8 * 1024 * 1024,
    ) -> None:
        self._rng = rng
        self._on_publish = on_publish
        self._on_request = on_request
        self._max_payload = max_payload
        self._subscriptions: list[_Subscription] = []
        self._publishers: dict[str, deque[_Published]] = {}
        self._work = asyncio.Event()
        self._closed = False
        self._pump: asyncio.Task[None] | None = None
        #: Messages handed to a callback, and how many of those woke another subscription
        #: than the one before (a sign the interleavings are varied).
        self.delivered = 0
        self.switches = 0
        #: EventBatches the gateway published (each event of one goes to ``on_publish``).
        self.batches = 0

    # -- the far side ----------------------------------------------------------------

    def publish_as(
        self, publisher: str, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> None:
        """``publisher`` (a worker, the state service) publishes: queued behind what it
        published before, and nothing else."""
        self._publishers.setdefault(publisher, deque()).append(
            _Published(subject, data, "", headers)
        )
        self._work.set()

    def start(self) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    @property
    def idle(self) -> bool:
        """Nothing queued anywhere."""
        return not any(self._publishers.values()) and not any(
            s.pending for s in self._subscriptions
        )

    async def _run(self) -> None:
        rng = self._rng
        last: _Subscription | None = None
        while True:
            publishers = [q for q in self._publishers.values() if q]
            ready = [s for s in self._subscriptions if s.pending]
            if not publishers and not ready:
                self._work.clear()
                await self._work.wait()
                continue
            for _ in range(rng.choice((0, 0, 1, 1, 2, 5))):
                await asyncio.sleep(0)
            if publishers and (not ready or rng.random() < 0.5):
                message = rng.choice(publishers).popleft()
                for sub in self._subscriptions:
                    if matches(sub.subject, message.subject):
                        sub.pending.append(
                            Msg(
                                _client=None,  # type: ignore[arg-type]
                                subject=message.subject,
                                reply=message.reply,
                                data=message.data,
                                headers=message.headers,
                            )
                        )
                continue
            sub = rng.choice(ready)
            self.switches += sub is not last
            last = sub
            self.delivered += 1
            # As nats-py: a subscription's callback is awaited before its next message.
            await sub.cb(sub.pending.popleft())

    # -- the gateway's side (wsgate.bus.Bus) ------------------------------------------

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @property
    def is_connected(self) -> bool:
        return not self._closed

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        if not event_batch.is_batch(payload):
            self._on_publish(subject, payload, reply)
            return
        # As a worker takes them: each event alone, with its own reply subject.
        self.batches += 1
        ack_prefix = reply.rsplit(".", 2)[0]
        for data in event_batch.split(payload):
            event = pb.ConnectionEvent.FromString(data)
            self._on_publish(subject, data, f"{ack_prefix}.{event.connection_id}.{event.sequence}")

    async def subscribe(
        self,
        subject: str,
        queue: str = "",
        cb: Callable[[Msg], Awaitable[None]] | None = None,
    ) -> object:
        assert cb is not None, "the gateway subscribes with callbacks"
        subscription = _Subscription(subject, cb)
        self._subscriptions.append(subscription)
        return subscription

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5) -> Msg:  # noqa: ASYNC109
        data = await self._on_request(subject, payload)
        return Msg(_client=None, subject="inbox", data=data)  # type: ignore[arg-type]

    async def flush(self, timeout: int = 10) -> None:  # noqa: ASYNC109
        return None

    async def drain(self) -> None:
        self._closed = True

    @property
    def subscriptions(self) -> list[str]:
        """The subjects subscribed to, in order."""
        return [s.subject for s in self._subscriptions]


def connect_to(bus: ReorderingBus) -> Callable[..., Awaitable[ReorderingBus]]:
    """A :class:`wsgate.bus.BusConnector` that hands the gateway ``bus``."""

    async def connect(*args: Any, **kwargs: Any) -> ReorderingBus:
        return bus

    return connect


def gateway_config(prefix: str, timeout_s: float) -> GatewayConfig:
    """A loopback gateway's settings for tests on this bus: nothing is lost here, so its
    ack wait (three times ``timeout_s``, the tests' own bound) is long enough that a
    redelivery would only mean a slow machine."""
    return GatewayConfig(
        host="127.0.0.1",
        port=0,
        prefix=prefix,
        ack_timeout_s=timeout_s * 3,
        delivery_timeout_s=timeout_s * 6,
        presence_interval_s=60,
        drain_timeout_s=2,
    )
