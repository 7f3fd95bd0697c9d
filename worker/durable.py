"""Durable object classes: the Cloudflare model, routed by path.

::

    from worker import Accept, App, Connection, ConnectRequest, DurableObject

    app = App()


    @app.durable("/chat/{room}")  # the object is named by the path's {room}
    class ChatRoom(DurableObject):
        async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept:
            name = request.query.get("name", "anonymous")
            return Accept(tags=[name], state={"name": name})

        async def on_message(self, conn: Connection, message: str | bytes) -> None:
            await self.broadcast(f"{conn.state['name']}: {message}")

Every connection to ``/chat/lobby`` reaches the same object, ``("ChatRoom", "lobby")``,
whichever gateway and worker serve it. Workers hold nothing between events: an instance
is made for each event, and everything the object keeps lives in the state service —
``self.storage`` (keys, values and transactions), its members (the connections accepted
into it, with tags and a per-connection ``conn.state``), and its alarm. That is what lets
any worker serve any event, and a worker die at any time.

What an instance offers:

- ``self.storage``: :class:`~worker.state_client.ObjectStorage` (get/put/delete/list, the
  batch forms, ``transaction``);
- ``await self.broadcast(message, tag=None, exclude=())``: to the object's connections;
- ``await self.connections(tag=None)``: its open connections, as :class:`Peer` handles;
- ``self.alarm``: :class:`~worker.alarms_client.ObjectAlarm` (``await self.alarm.set(t)``),
  and ``on_alarm()`` runs when it is due;
- ``self.name``, ``self.namespace``, ``self.env``.

A connection accepted with ``Accept(tags=..., state=...)`` joins the object (the
hibernation API's ``acceptWebSocket(ws, tags)`` and ``serializeAttachment``); it leaves
when it closes. In its handlers ``conn.state`` is the attachment, and assigning it stores
a new one (durable before the handler's output leaves, as every write).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from worker.app import Accept, ConnectRequest, Reject, Route
from worker.errors import InvalidResponse, InvalidRoute
from worker.membership import BroadcastResult, ObjectMembers

if TYPE_CHECKING:
    from worker.alarms_client import AlarmInfo, ObjectAlarm
    from worker.app import App
    from worker.connection import Connection
    from worker.env import Env
    from worker.state_client import ObjectStorage

D = TypeVar("D", bound="DurableObject")


class DurableObject:
    """Base class of durable objects. Override the ``on_*`` methods you need; each is a
    coroutine and optional.

    ``namespace`` (a class attribute) names the kind of object; it defaults to the class's
    name. Two classes with the same namespace share their objects' data.
    """

    namespace: ClassVar[str] = ""

    def __init__(self, env: Env, name: str) -> None:
        #: The worker's environment (other objects: ``env.storage(ns, name)`` and so on).
        self.env = env
        #: The object's name within its namespace (e.g. the room).
        self.name = name
        self.storage: ObjectStorage = env.storage(self.namespace, name)
        self.members: ObjectMembers = env.members(self.namespace, name)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("namespace"):
            cls.namespace = cls.__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.namespace!r}/{self.name!r}>"

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

    # -- what it uses ----------------------------------------------------------------------

    @property
    def alarm(self) -> ObjectAlarm:
        """The object's alarm: ``await self.alarm.set(when)``, ``get()``, ``delete()``."""
        return self.env.alarm(self.namespace, self.name)

    async def broadcast(
        self,
        message: str | bytes | bytearray | memoryview,
        *,
        tag: str | None = None,
        exclude: Iterable[Connection | str] = (),
    ) -> BroadcastResult:
        """Send ``message`` to the object's connections (those with ``tag``, if given),
        except ``exclude``: one command per gateway, after this handler's writes are
        durable and after what it sent to its own connection."""
        return await self.members.broadcast(message, tag=tag, exclude=exclude)

    async def connections(self, tag: str | None = None) -> list[Peer]:
        """The object's open connections (with ``tag``, if given), in id order."""
        return [
            Peer(self.env, member.id, member.tags, member.attachment)
            for member in await self.members.connections(tag)
        ]


@dataclass(frozen=True)
class Peer:
    """Another connection of the object, as :meth:`DurableObject.connections` lists it."""

    env: Env
    #: The connection id.
    id: str
    #: Its tags.
    tags: tuple[str, ...]
    #: Its state (attachment), as it was when listed.
    state: Any

    async def send(self, message: str | bytes | bytearray | memoryview) -> None:
        """Send one message to this connection (a connection that is gone is skipped)."""
        await self.env.send_many([self.id], message)


def durable_route(app: App, pattern: str, cls: type[D], *, name: str | None = None) -> type[D]:
    """Serve ``pattern`` with the durable object class ``cls``: the object is named by the
    path parameter ``name`` (by default the pattern's only parameter). Registers ``cls``'s
    ``on_alarm`` for its namespace if it overrides it. Returns ``cls`` (a decorator's
    result).

    Raises InvalidRoute when ``cls`` is not a DurableObject, or the pattern has no
    parameter to name the object (or several and ``name`` is not given, or ``name`` is not
    one of them).
    """
    if not (isinstance(cls, type) and issubclass(cls, DurableObject)):
        raise InvalidRoute(f"{cls!r} is not a DurableObject subclass")
    route = app.route(pattern)
    params = route.param_names
    if name is None:
        if len(params) != 1:
            raise InvalidRoute(
                f"route {pattern!r} has {len(params)} parameters; say which names the "
                f"object: app.durable({pattern!r}, name=...)"
            )
        name = params[0]
    elif name not in params:
        raise InvalidRoute(f"route {pattern!r} has no parameter {name!r} to name the object")
    _Adapter(cls, name).install(route)
    if _overrides(cls, "on_alarm"):
        app.on_alarm(cls.namespace)(_alarm_handler(cls))
    return cls


class _Adapter:
    """Turns a DurableObject class into a route's three handlers."""

    def __init__(self, cls: type[DurableObject], param: str) -> None:
        self._cls = cls
        self._param = param

    def install(self, route: Route) -> None:
        route.durable = True
        route.on_connect(self._connect)
        route.on_message(self._message)
        route.on_close(self._close)

    def _object(self, conn: Connection, params: Mapping[str, str]) -> DurableObject:
        return self._cls(conn.env, params[self._param])

    async def _connect(self, conn: Connection, request: ConnectRequest) -> Accept | Reject | None:
        obj = self._object(conn, request.params)
        outcome = await obj.on_connect(conn, request)
        if outcome is None:
            outcome = Accept()
        if isinstance(outcome, Accept):
            # A member from now on: broadcasts and connections() include it, and its state
            # is there for its first message.
            await obj.members.accept(conn, tags=outcome.tags, attachment=outcome.state)
            conn._attach_state(obj.members, outcome.state)
        return outcome

    async def _message(self, conn: Connection, message: str | bytes) -> None:
        obj = self._object(conn, conn.params)
        conn._attach_state(obj.members, await obj.members.attachment(conn))
        await obj.on_message(conn, message)

    async def _close(self, conn: Connection, code: int, reason: str) -> None:
        obj = self._object(conn, conn.params)
        conn._attach_state(obj.members, await obj.members.attachment(conn))
        await obj.on_close(conn, code, reason)


def _alarm_handler(cls: type[DurableObject]) -> Callable[[AlarmInfo], Any]:
    async def run_alarm(alarm: AlarmInfo) -> None:
        await cls(alarm.env, alarm.name).on_alarm()

    run_alarm.__qualname__ = f"{cls.__qualname__}.on_alarm"
    return run_alarm


def _overrides(cls: type[DurableObject], method: str) -> bool:
    return inspect.getattr_static(cls, method) is not inspect.getattr_static(DurableObject, method)


def check_plain_accept(outcome: Accept) -> None:
    """Raise InvalidResponse if a plain (function) route's Accept asks for membership,
    which only a durable object route has."""
    if outcome.tags or outcome.state is not None:
        raise InvalidResponse(
            "Accept(tags=..., state=...) needs a durable object route (app.durable); "
            "a function route can use conn.env.members(...).accept(conn, ...)"
        )
