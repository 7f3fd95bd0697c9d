"""The worker's side of calls of durable objects' methods: take ObjectCalls from NATS and
run each as a turn of its object's activation, which answers with a CallResult.

For each namespace the app serves with a durable class (``App.durable``) the runner
subscribes to ``<prefix>.call.<namespace>`` in queue group ``calls-<namespace>``, so each
call goes to one worker; that worker runs it in the object's activation, activating it
here or forwarding the call to the worker that holds it (on that worker's
``<prefix>.worker.<worker_id>.call``, which the runner takes too). The activation answers
once the turn has committed (the output gate).

A call that comes back to an object whose turn waits for it (its chain names the object)
is answered CYCLE at once: queued behind that turn, it would never run. A message that is
no call is answered INVALID, if it has a reply subject, and counted as garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from wsgate import calls, envelopes, subjects
from wsgate.errors import CallCycle, CallError, CallUnavailable, InvalidCall, InvalidEnvelope
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.object_calls import cycle_message
from wsgate.worker.work import Work

if TYPE_CHECKING:
    from wsgate.worker.activations import Activations
    from wsgate.worker.app import ObjectClass

log = logging.getLogger(__name__)


class CallRunner:
    """Runs calls of the objects of ``classes`` (namespace → class) in ``activations``.

    At most ``max_concurrent`` calls wait for their turns at once; more wait in NATS'
    buffer. :meth:`close` stops taking calls; those taken already are answered by their
    activations (which drain with the worker).
    """

    def __init__(
        self,
        nc: NatsClient,
        classes: Mapping[str, type[ObjectClass]],
        activations: Activations,
        *,
        prefix: str,
        worker_id: str,
        max_concurrent: int,
        on_garbage: Callable[[], None] = lambda: None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self._nc = nc
        self._classes = dict(classes)
        self._activations = activations
        self._prefix = prefix
        self._worker_id = worker_id
        self._slots = asyncio.Semaphore(max_concurrent)
        self._on_garbage = on_garbage
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        """Subscribe for every namespace served, and this worker's own call subject."""
        for namespace in self._classes:
            self._subscriptions.append(
                await self._nc.subscribe(
                    subjects.call_subject(self._prefix, namespace),
                    queue=subjects.call_queue(namespace),
                    cb=self._take,
                )
            )
        if self._classes:
            self._subscriptions.append(
                await self._nc.subscribe(
                    subjects.worker_subject(self._prefix, self._worker_id, "call"),
                    cb=self._take,
                )
            )

    async def close(self) -> None:
        """Stop taking calls. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in self._subscriptions:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subscriptions.clear()

    async def _take(self, msg: Msg) -> None:
        """NATS callback (one message at a time per subscription): waiting for a slot here
        is what pushes back when too many calls wait."""
        try:
            call = envelopes.read_object_call(msg.data)
            if not msg.reply:
                raise InvalidEnvelope("ObjectCall", "no reply subject")
        except InvalidEnvelope as exc:
            self._on_garbage()
            log.warning("dropped a call (%d bytes): %s", len(msg.data), exc)
            await self._answer(msg, calls.error_result(InvalidCall(str(exc))))
            return
        target = call.object
        cls = self._classes.get(target.namespace)
        if cls is None:
            refusal: CallError = InvalidCall(
                f"namespace {target.namespace[:80]!r} is served by no durable class here"
            )
            await self._answer(msg, calls.error_result(refusal))
            return
        if calls.in_chain(call.chain, target.namespace, target.name):
            cycle = CallCycle(cycle_message(call.chain, target.namespace, target.name))
            await self._answer(msg, calls.error_result(cycle))
            return
        await self._slots.acquire()
        if self._closed:
            self._slots.release()
            await self._answer(msg, calls.error_result(CallUnavailable("the worker is draining")))
            return
        task = asyncio.get_running_loop().create_task(self._run(Work.for_call(msg, call), cls))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _run(self, work: Work, cls: type[ObjectClass]) -> None:
        assert work.call is not None
        self._activations.submit(cls, work.call.object.name, work)
        await work.done

    async def _answer(self, msg: Msg, result: pb.CallResult) -> None:
        """Answer a call that is not run (its caller raises the error)."""
        await self._activations.respond(msg, result.SerializeToString())
