"""Calling durable objects' methods from anywhere: handlers, alarms, other objects (RPC).

::

    room = env.objects("ChatRoom").get("lobby")
    count = await room.call("post", "hello", author="ann")   # or: await room.post(...)

The call goes over NATS to whichever worker holds the object's activation (activating it
if none does) and runs there as one turn of the object: after the turns queued before it,
with the object's storage from memory, its writes durable before its result comes back
(the output gate), exactly like an event of one of its connections. Arguments and result
are JSON types plus bytes (:mod:`wsgate.calls`).

Errors, each a :class:`~wsgate.errors.CallError`: NoSuchMethod, CallFailed (the method
raised), CallTooLarge, InvalidCall, CallTimeout, CallUnavailable, and CallCycle.

**Cycles.** A turn that calls another object waits for it, and a turn runs to its end
before the object's next one starts. So a chain of calls that comes back to an object
whose turn is waiting (A calls B, which calls A) could never be answered. Every call
carries the chain of objects whose turns wait for it; a call to one of them is refused at
once with CallCycle, at the caller and again at the object's worker, never a deadlock.
Chains are at most :data:`~wsgate.calls.MAX_CALL_DEPTH` long.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient

from wsgate import calls, subjects
from wsgate.errors import CallCycle, CallError, CallTimeout, CallUnavailable, InvalidCall
from wsgate.v1 import envelope_pb2 as pb
from wsgate.values import Value
from wsgate.worker.turn import current_turn

#: Retries of a call that found no worker (or an object that could not be activated) wait
#: this long first, doubling up to the last.
FIRST_RETRY_S = 0.05
MAX_RETRY_S = 1.0


class ObjectCalls:
    """Makes calls on ``nc``, under subject prefix ``prefix``; a call waits at most
    ``timeout_s`` for its answer (retries included) unless it says otherwise."""

    def __init__(self, nc: NatsClient, prefix: str, timeout_s: float) -> None:
        self._nc = nc
        self._prefix = prefix
        self.timeout_s = timeout_s

    async def call(
        self,
        namespace: str,
        name: str,
        method: str,
        args: Sequence[object] = (),
        kwargs: dict[str, object] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Value:
        """Run ``method(*args, **kwargs)`` on the object (``namespace``, ``name``) as one of
        its turns, and return its value. Raises a CallError (see the module)."""
        where = {"namespace": namespace, "name": name, "method": method}
        if not namespace:
            raise InvalidCall("an object call needs a namespace", **where)
        calls.check_method_name(method)
        arguments = calls.encode_arguments(args, kwargs or {})
        chain = waiting_chain()
        if calls.in_chain(chain, namespace, name):
            raise CallCycle(cycle_message(chain, namespace, name), **where)
        if len(chain) >= calls.MAX_CALL_DEPTH:
            raise InvalidCall(
                f"a chain of {len(chain) + 1} calls: deeper than {calls.MAX_CALL_DEPTH}", **where
            )
        request = pb.ObjectCall(
            object=calls.object_ref(namespace, name),
            method=method,
            arguments=arguments,
            call_id=uuid.uuid4().hex,
            chain=chain,
        )
        return await self._send(request, self.timeout_s if timeout_s is None else timeout_s)

    async def _send(self, request: pb.ObjectCall, timeout_s: float) -> Value:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        subject = subjects.call_subject(self._prefix, request.object.namespace)
        backoff_s = FIRST_RETRY_S
        where = {
            "namespace": request.object.namespace,
            "name": request.object.name,
            "method": request.method,
        }
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CallTimeout(f"no answer within {timeout_s:g} s", **where)
            try:
                reply = await self._nc.request(subject, request.SerializeToString(), remaining)
            except nats.errors.NoRespondersError:
                unavailable: CallError = CallUnavailable(
                    f"no worker serves namespace {request.object.namespace!r}", **where
                )
            except nats.errors.TimeoutError:
                raise CallTimeout(f"no answer within {timeout_s:g} s", **where) from None
            except nats.errors.Error as exc:
                raise CallUnavailable(f"the call could not be sent: {exc!r}", **where) from exc
            else:
                try:
                    result = pb.CallResult.FromString(reply.data)
                except DecodeError as exc:
                    raise CallError(f"the answer does not parse: {exc}", **where) from exc
                error = result.error if result.WhichOneof("outcome") == "error" else None
                if error is None or error.kind != pb.CallError.UNAVAILABLE:
                    return calls.result_value(result, request)
                unavailable = calls.error_of(error, request)
            # Not run: try again (the same call id, marked as a retry) while time is left.
            if loop.time() + backoff_s >= deadline:
                raise unavailable
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, MAX_RETRY_S)
            request.retried = True


def waiting_chain() -> list[pb.ObjectRef]:
    """The objects whose turns wait for a call made here: none outside a durable object's
    turn; in one, the chain its own call came with (if it is a call's turn) and itself."""
    turn = current_turn.get()
    if turn is None:
        return []
    activation = turn.activation
    return [*turn.call_chain, calls.object_ref(activation.namespace, activation.name)]


def cycle_message(chain: Sequence[pb.ObjectRef], namespace: str, name: str) -> str:
    """Says which objects wait for one another."""
    path = " -> ".join(f"{ref.namespace}/{ref.name}" for ref in chain)
    return f"{path} -> {namespace}/{name}: a call to an object whose turn waits for it"


class ObjectNamespace:
    """The objects of one namespace (``env.objects(namespace)``)."""

    def __init__(self, calls_: ObjectCalls, namespace: str) -> None:
        self._calls = calls_
        self.namespace = namespace

    def get(self, name: str) -> ObjectStub:
        """The object named ``name`` (it need not exist yet: a call activates it)."""
        return ObjectStub(self._calls, self.namespace, name)


class ObjectStub:
    """One durable object, to call: ``await stub.call("method", ...)``, or
    ``await stub.method(...)`` for a method whose name is not one of the stub's own."""

    def __init__(self, calls_: ObjectCalls, namespace: str, name: str) -> None:
        self._calls = calls_
        self.namespace = namespace
        self.name = name

    def __repr__(self) -> str:
        return f"<ObjectStub {self.namespace!r}/{self.name!r}>"

    async def call(
        self, method: str, /, *args: object, timeout_s: float | None = None, **kwargs: object
    ) -> Value:
        """``method(*args, **kwargs)`` on the object, as one of its turns; its value.
        ``timeout_s``: how long to wait for the answer (the worker's call timeout unless
        given). Raises a CallError."""
        return await self._calls.call(
            self.namespace, self.name, method, args, kwargs, timeout_s=timeout_s
        )

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Value]]:
        if method.startswith("_"):
            raise AttributeError(method)

        async def call(*args: object, **kwargs: object) -> Value:
            return await self._calls.call(self.namespace, self.name, method, args, kwargs)

        call.__name__ = method
        return call
