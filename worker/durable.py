"""Durable object classes: the Cloudflare model, routed by path.

::

    from wsgate import Accept, App, Connection, ConnectRequest, DurableObject

    app = App()


    @app.durable("/chat/{room}")  # the object is named by the path's {room}
    class ChatRoom(DurableObject):
        async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept:
            name = request.query.get("name", "anonymous")
            return Accept(tags=[name], state={"name": name})

        async def on_message(self, conn: Connection, message: str | bytes) -> None:
            await self.broadcast(f"{conn.state['name']}: {message}")

Every connection to ``/chat/lobby`` reaches the same object, ``("ChatRoom", "lobby")``,
whichever gateway and worker serve it: the object lives in one *activation* at a time, on
one worker (:mod:`wsgate.worker.activation`), which runs its events one at a time, in arrival
order. An instance of the class is made once per activation, so its attributes are
in-memory state that lasts between events, until the activation is evicted (hibernation)
or moves to another worker; what must outlive that goes in storage.

What an instance offers:

- ``self.storage``: get/put/delete/list, the batch forms and ``transaction``, served from
  the activation's memory; writes are durable with the turn, before its output leaves;
- ``await self.broadcast(message, tag=None, exclude=())``: to the object's connections;
- ``await self.connections(tag=None)``: its open connections, as :class:`Peer` handles;
- ``self.alarm``: ``await self.alarm.set(t)``, and ``on_alarm()`` runs, as a turn, when due;
- ``self.name``, ``self.namespace``, ``self.env``.

``on_request(self, request)``, if the class overrides it, answers plain HTTP requests (no
upgrade) to its routes, as a turn (:mod:`wsgate.worker.http`); ``conn.tags`` can be changed
in its handlers (``conn.add_tags``, ``conn.remove_tags``, or assigned).

Its other public methods (plain or ``async``, names not starting with ``_``) can be called
from anywhere, as a turn of its activation: ``await env.objects("ChatRoom").get("lobby")
.call("post", text="hi")`` (:mod:`wsgate.worker.object_calls`).

A connection accepted with ``Accept(tags=..., state=...)`` joins the object (the
hibernation API's ``acceptWebSocket(ws, tags)`` and ``serializeAttachment``); it leaves
when it closes. In its handlers ``conn.state`` is the attachment, and assigning it stores
a new one (durable with the turn, as every write).
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from wsgate.calls import check_method_name
from wsgate.errors import NoSuchMethod
from wsgate.values import Value
from wsgate.worker.app import Accept, AlarmHandler, ConnectRequest, ObjectClass, Reject
from wsgate.worker.errors import InvalidResponse, TurnOver
from wsgate.worker.membership import BroadcastResult
from wsgate.worker.turn import current_turn

if TYPE_CHECKING:
    from wsgate.worker.activation import Activation
    from wsgate.worker.alarms_client import AlarmInfo, ObjectAlarm
    from wsgate.worker.connection import Connection
    from wsgate.worker.env import Env
    from wsgate.worker.http import HttpRequest, Response
    from wsgate.worker.object_storage import ObjectStorage

#: The activation an instance is being made for (set around the class's constructor).
_binding: contextvars.ContextVar[Activation | None] = contextvars.ContextVar(
    "wsgate_durable_binding", default=None
)


class DurableObject:
    """Base class of durable objects. Override the ``on_*`` methods you need; each is a
    coroutine and optional.

    ``namespace`` (a class attribute) names the kind of object; it defaults to the class's
    name. One class serves a namespace (it may be routed by several patterns).
    """

    namespace: ClassVar[str] = ""

    def __init__(self, env: Env, name: str) -> None:
        #: The worker's environment (other objects: ``env.storage(ns, name)`` and so on).
        self.env = env
        #: The object's name within its namespace (e.g. the room).
        self.name = name
        self._activation = _binding.get()
        self.storage: ObjectStorage
        if self._activation is not None:
            self.storage = self._activation.storage
        else:
            # Made outside an activation (a test, a script): the remote object, unfenced.
            self.storage = env.storage(self.namespace, name)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("namespace"):
            cls.namespace = cls.__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.namespace!r}/{self.name!r}>"

    @classmethod
    def handles_requests(cls) -> bool:
        """For ``App.durable``: whether the class answers plain HTTP requests to its
        routes (it overrides ``on_request``)."""
        return _overrides(cls, "on_request")

    @classmethod
    def object_alarm_handler(cls) -> AlarmHandler | None:
        """For ``App.durable``: the alarm handler of the class's namespace, which runs
        ``on_alarm`` as a turn of the object's activation; None unless the class
        overrides ``on_alarm``."""
        return DurableAlarm(cls) if _overrides(cls, "on_alarm") else None

    # -- what a subclass overrides ---------------------------------------------------------

    async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept | Reject | None:
        """Decide the upgrade: ``Accept(subprotocol=, tags=, state=)`` (or None) accepts and
        makes the connection a member of this object; ``Reject(status, body)`` refuses."""
        return None

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        """One message from ``conn``: ``str`` for text, ``bytes`` for binary."""

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        """``conn`` ended with ``code`` and ``reason`` (once; it then leaves the object)."""

    async def on_alarm(self) -> None:
        """The object's alarm is due (at least once; raising makes it retried later)."""

    async def on_request(self, request: HttpRequest) -> Response:
        """A plain HTTP request (no WebSocket upgrade) to one of the object's routes, as a
        turn: the response leaves once the turn's writes are durable. Not overridden: the
        routes answer ``400 Expected websocket``. Raising answers 500."""
        raise NotImplementedError  # never called: App.durable routes it only if overridden

    # -- what it uses ----------------------------------------------------------------------

    @property
    def alarm(self) -> ObjectAlarm:
        """The object's alarm: ``await self.alarm.set(when)``, ``get()``, ``delete()``."""
        if self._activation is not None:
            return self._activation.alarm
        return self.env.alarm(self.namespace, self.name)

    async def broadcast(
        self,
        message: str | bytes | bytearray | memoryview,
        *,
        tag: str | None = None,
        exclude: Iterable[Connection | str] = (),
    ) -> BroadcastResult:
        """Send ``message`` to the object's connections (those with ``tag``, if given),
        except ``exclude``: one command per gateway, after what this handler sent before,
        once its turn has committed (the output gate)."""
        if self._activation is not None:
            turn = current_turn.get()
            if turn is None or turn.activation is not self._activation:
                raise TurnOver(f"{self!r}.broadcast() runs in the object's own handlers")
            return await self._activation.members.broadcast(turn, message, tag=tag, exclude=exclude)
        members = self.env.members(self.namespace, self.name)
        return await members.broadcast(message, tag=tag, exclude=exclude)

    async def connections(self, tag: str | None = None) -> list[Peer]:
        """The object's open connections (with ``tag``, if given), in id order."""
        if self._activation is not None:
            found = await self._activation.members.connections(tag)
        else:
            found = await self.env.members(self.namespace, self.name).connections(tag)
        return [Peer(self.env, member.id, member.tags, member.attachment) for member in found]


@dataclass(frozen=True)
class Peer:
    """Another connection of the object, as :meth:`DurableObject.connections` lists it."""

    env: Env
    #: The connection id.
    id: str
    #: Its tags.
    tags: tuple[str, ...]
    #: Its state (attachment), as it was when listed.
    state: Value

    async def send(self, message: str | bytes | bytearray | memoryview) -> None:
        """Send one message to this connection (a connection that is gone is skipped)."""
        await self.env.send_many([self.id], message)


class DurableAlarm:
    """The alarm handler of a durable class's namespace, as ``App.alarm_handlers`` lists
    it: the worker runs it as a turn of the object's activation, not as a plain call."""

    def __init__(self, cls: type[DurableObject]) -> None:
        self.durable_class = cls
        self.__qualname__ = f"{cls.__qualname__}.on_alarm"

    async def __call__(self, alarm: AlarmInfo) -> None:
        raise RuntimeError(
            f"{self.__qualname__} runs as a turn of its object's activation, not as a call"
        )


def _overrides(cls: type[DurableObject], method: str) -> bool:
    return inspect.getattr_static(cls, method) is not inspect.getattr_static(DurableObject, method)


#: What DurableObject itself defines (its hooks and its API) is never callable from outside.
_NOT_CALLABLE = frozenset(dir(DurableObject))


def public_method(instance: DurableObject, name: str) -> Callable[..., object]:
    """The bound method ``name`` of ``instance`` that a call may run: a plain or ``async``
    function defined by the object's class (not by DurableObject: ``on_message`` and the
    like are not callable), whose name does not start with ``_``. Raises NoSuchMethod
    otherwise (InvalidCall for a name that is no identifier)."""
    check_method_name(name)
    cls = type(instance)
    found = None if name in _NOT_CALLABLE else inspect.getattr_static(cls, name, None)
    if not inspect.isfunction(found):
        raise NoSuchMethod(
            f"{cls.__qualname__} has no public method {name!r}",
            namespace=instance.namespace,
            name=instance.name,
            method=name,
        )
    method: Callable[..., object] = getattr(instance, name)
    return method


def instantiate(cls: type[ObjectClass], activation: Activation) -> DurableObject:
    """The instance of ``cls`` an activation runs (its constructor sees the activation).

    Raises TypeError if ``cls`` is not a DurableObject subclass (``App.durable`` checks
    only the :class:`~wsgate.worker.app.ObjectClass` protocol).
    """
    if not issubclass(cls, DurableObject):
        raise TypeError(f"{cls!r} is not a DurableObject subclass")
    token = _binding.set(activation)
    try:
        return cls(activation.env, activation.name)
    finally:
        _binding.reset(token)


def check_plain_accept(outcome: Accept) -> None:
    """Raise InvalidResponse if a plain (function) route's Accept asks for membership,
    which only a durable object route has."""
    if outcome.tags or outcome.state is not None:
        raise InvalidResponse(
            "Accept(tags=..., state=...) needs a durable object route (app.durable); "
            "a function route can use conn.env.members(...).accept(conn, ...)"
        )
