"""The app: routes and their handlers, written by users, run by workers.

::

    from wsgate import Accept, App, Connection, ConnectRequest, Reject

    app = App()
    echo = app.route("/echo")

    @echo.on_message
    async def echo_back(conn: Connection, message: str | bytes) -> None:
        await conn.send(message)

A route's ``on_connect(conn, request)`` decides the upgrade: return :class:`Accept`
(or ``None``, which accepts) or :class:`Reject`. A route declared with ``auth=`` (a
``JWTVerifier``, say: :mod:`wsgate.worker.auth`) has every connect verified first: a refusal is a
401 that never reaches ``on_connect``, and ``request.claims`` holds the verified claims.
``on_message(conn, message)`` gets each message, text as ``str`` and binary as ``bytes``,
in the order the client sent them.
``on_close(conn, code, reason)`` runs once when the connection has ended, whoever closed
it. Every handler is optional; all are coroutines. Nothing here does I/O.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    ClassVar,
    NoReturn,
    Protocol,
    TypeVar,
    overload,
    runtime_checkable,
)

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from wsgate.worker.errors import InvalidResponse, InvalidRoute

if TYPE_CHECKING:
    from wsgate.v1 import envelope_pb2 as pb
    from wsgate.values import StorableValue
    from wsgate.worker.alarms_client import AlarmInfo
    from wsgate.worker.auth import Authenticator, Claims
    from wsgate.worker.connection import Connection
    from wsgate.worker.http import HttpRequest, Response


def query_of(query_string: str) -> MultiDictProxy[str]:
    """A raw query string's parameters (all values of a repeated name kept), read-only."""
    return MultiDictProxy(MultiDict(urllib.parse.parse_qsl(query_string)))


def headers_of(headers: Iterable[pb.Header]) -> CIMultiDictProxy[str]:
    """An envelope's headers, looked up case-insensitively, read-only."""
    return CIMultiDictProxy(CIMultiDict((h.name, h.value) for h in headers))


@dataclass(frozen=True)
class ConnectRequest:
    """What the client asked for when it opened the connection."""

    connection_id: str
    path: str
    #: Values of the route's ``{name}`` segments.
    params: Mapping[str, str]
    #: The query string's parameters (all values of a repeated name are kept).
    query: MultiDictProxy[str]
    #: The request headers, looked up case-insensitively.
    headers: CIMultiDictProxy[str]
    #: The subprotocols the client offered, in its order of preference.
    subprotocols: tuple[str, ...]
    #: The client's "host:port" ("[host]:port" for IPv6; the host alone when a proxy's
    #: X-Forwarded-For gave no port), as the gateway found it: behind a trusted proxy,
    #: the client the proxy names.
    remote_address: str
    #: The claims the route's authenticator verified (``auth=``), read-only; empty on a
    #: route without one. Only ``on_connect`` sees them: what later events need, the app
    #: keeps (on a durable object route, in ``Accept(state=...)``).
    claims: Claims = field(default_factory=lambda: _NO_CLAIMS)

    @classmethod
    def from_envelope(
        cls,
        envelope: pb.ConnectRequest,
        params: Mapping[str, str],
        claims: Claims | None = None,
    ) -> ConnectRequest:
        """Build from the NATS envelope (with the claims verified for it, if any)."""
        return cls(
            connection_id=envelope.connection_id,
            path=envelope.path,
            params=dict(params),
            query=query_of(envelope.query),
            headers=headers_of(envelope.headers),
            subprotocols=tuple(envelope.subprotocols),
            remote_address=envelope.remote_address,
            claims=_NO_CLAIMS if claims is None else claims,
        )


@dataclass(frozen=True)
class Accept:
    """Accept the upgrade, optionally with one of the client's subprotocols.

    On a durable object route (:meth:`App.durable`) the connection also joins the object,
    with ``tags`` (at most 10, each 1-256 characters) to find it by, and ``state``, its
    attachment (a storable value of at most 16 KiB, ``conn.state`` in later handlers).
    """

    subprotocol: str | None = None
    #: Kept as a tuple, whatever sequence was given.
    tags: Sequence[str] = ()
    state: StorableValue = None

    def __post_init__(self) -> None:
        if isinstance(self.tags, str):
            raise InvalidResponse("tags must be a sequence of str, not one str; use tags=[tag]")
        object.__setattr__(self, "tags", tuple(self.tags))


@dataclass(frozen=True)
class Reject:
    """Refuse the upgrade; the client gets exactly this HTTP response."""

    status: int = 403
    body: str | bytes = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise InvalidResponse(f"a rejection needs a 4xx or 5xx status, got {self.status}")


Message = str | bytes
ConnectHandler = Callable[["Connection", ConnectRequest], Awaitable[Accept | Reject | None]]
MessageHandler = Callable[["Connection", Message], Awaitable[None]]
CloseHandler = Callable[["Connection", int, str], Awaitable[None]]
AlarmHandler = Callable[["AlarmInfo"], Awaitable[None]]
RequestHandler = Callable[["HttpRequest"], Awaitable["Response"]]
H = TypeVar("H")


@runtime_checkable
class ObjectClass(Protocol):
    """A class whose objects serve durable object routes, as App and Route know it:
    :class:`~wsgate.worker.durable.DurableObject` and its subclasses.

    Named by this protocol so that this module never imports ``wsgate.worker.durable``:
    durable objects build on the app, not the reverse.
    """

    #: The kind of object; one class serves a namespace.
    namespace: ClassVar[str]

    @classmethod
    def handles_requests(cls) -> bool:
        """Whether the class answers plain HTTP requests to its routes (``on_request``)."""
        ...

    @classmethod
    def object_alarm_handler(cls) -> AlarmHandler | None:
        """The alarm handler to register for the class's namespace (None: no alarms)."""
        ...


D = TypeVar("D", bound=ObjectClass)

_RESOLVED_CACHE_SIZE = 4096
_NO_CLAIMS: Claims = MappingProxyType({})
#: Longer paths are resolved every time, not cached: the cache holds at most 4096 of 1 KiB
#: whatever paths hostile envelopes carry (up to 8 KiB each, wsgate/envelopes.py).
_RESOLVED_MAX_PATH_CHARS = 1024
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Route:
    """One path pattern and its handlers. Made by :meth:`App.route`."""

    def __init__(self, pattern: str, auth: Authenticator | None = None) -> None:
        self.pattern = pattern
        self._regex, self.param_names = _compile(pattern)
        #: Verifies every connect before on_connect (None: the route is open).
        self.auth = auth
        self.connect_handler: ConnectHandler | None = None
        self.message_handler: MessageHandler | None = None
        self.close_handler: CloseHandler | None = None
        #: Answers plain HTTP requests (no upgrade); None: ``400 Expected websocket``.
        self.request_handler: RequestHandler | None = None
        #: Served by a durable object class (App.durable): its connections join the object.
        self.durable = False
        #: The class whose objects serve the route, and the parameter naming the object.
        self.object_class: type[ObjectClass] | None = None
        self.object_param = ""

    def on_connect(self, handler: ConnectHandler) -> ConnectHandler:
        """Decorator: decide the upgrade (return Accept, Reject or None for accept)."""
        self.connect_handler = handler
        return handler

    def on_message(self, handler: MessageHandler) -> MessageHandler:
        """Decorator: handle one message (``str`` for text, ``bytes`` for binary)."""
        self.message_handler = handler
        return handler

    def on_close(self, handler: CloseHandler) -> CloseHandler:
        """Decorator: the connection ended with ``code`` and ``reason``; runs once."""
        self.close_handler = handler
        return handler

    def on_request(self, handler: RequestHandler) -> RequestHandler:
        """Decorator: answer a plain HTTP request to the route (one without a WebSocket
        upgrade): ``async def handler(request: HttpRequest) -> Response``. Without one, such
        a request gets ``400 Expected websocket``."""
        self.request_handler = handler
        return handler

    def serve_object(self, cls: type[ObjectClass], param: str) -> None:
        """Make the route a durable object route: each event runs as a turn of the object
        of class ``cls`` named by the path parameter ``param``, in its activation."""
        self.durable = True
        self.object_class = cls
        self.object_param = param
        # The worker runs the object's methods in its activation, never these.
        self.connect_handler = _served_by_activation
        self.message_handler = _served_by_activation
        self.close_handler = _served_by_activation
        self.request_handler = _served_by_activation if cls.handles_requests() else None

    def match(self, path: str) -> dict[str, str] | None:
        """The parameters if ``path`` matches this route, else None."""
        m = self._regex.fullmatch(path)
        return m.groupdict() if m else None

    def __repr__(self) -> str:
        return f"Route({self.pattern!r})"


class App:
    """A set of WebSocket routes. Patterns are paths whose ``{name}`` segments match one
    path segment each, e.g. ``/chat/{room}``; the first registered match wins."""

    def __init__(self) -> None:
        self._routes: list[Route] = []
        # path -> match: every event is routed by its path, and a connection has many.
        self._resolved: dict[str, tuple[Route, Mapping[str, str]] | None] = {}
        self._alarm_handlers: dict[str, AlarmHandler] = {}
        #: Namespace -> the durable object class that serves it (App.durable).
        self.durable_classes: dict[str, type[ObjectClass]] = {}

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routes in registration order."""
        return tuple(self._routes)

    def route(self, pattern: str, *, auth: Authenticator | None = None) -> Route:
        """Register and return a new route; raises InvalidRoute for a duplicate pattern.

        With ``auth`` (e.g. a ``JWTVerifier``), every connect is verified before
        ``on_connect``: a refusal is a 401 (``Unauthorized.reject()``) and the verified
        claims are ``request.claims``.
        """
        if any(r.pattern == pattern for r in self._routes):
            raise InvalidRoute(f"route {pattern!r} is already registered")
        route = Route(pattern, auth)
        self._routes.append(route)
        self._resolved.clear()
        return route

    @overload
    def durable(
        self,
        pattern: str,
        cls: type[D],
        *,
        name: str | None = None,
        auth: Authenticator | None = None,
    ) -> type[D]: ...

    @overload
    def durable(
        self,
        pattern: str,
        cls: None = None,
        *,
        name: str | None = None,
        auth: Authenticator | None = None,
    ) -> Callable[[type[D]], type[D]]: ...

    def durable(
        self,
        pattern: str,
        cls: type[D] | None = None,
        *,
        name: str | None = None,
        auth: Authenticator | None = None,
    ) -> type[D] | Callable[[type[D]], type[D]]:
        """Serve ``pattern`` with a :class:`~wsgate.worker.durable.DurableObject` class, named by
        the path parameter ``name`` (by default the pattern's only one)::

            @app.durable("/chat/{room}")
            class ChatRoom(DurableObject): ...

        or ``app.durable("/chat/{room}", ChatRoom)``. With ``auth``, as for
        :meth:`route`: connects are verified before they reach the object (a refused one
        never activates it). The class's ``on_alarm``, if it overrides it, becomes its
        namespace's alarm handler. Returns the class (a decorator's result).

        Raises InvalidRoute for a class that is not a DurableObject, a namespace another
        class serves already, or a pattern with no parameter to name the object (or
        several and no ``name``, or a ``name`` that is not one of them).
        """
        if cls is not None:
            return self._serve_objects(pattern, cls, name=name, auth=auth)

        def register(decorated: type[D]) -> type[D]:
            return self._serve_objects(pattern, decorated, name=name, auth=auth)

        return register

    def _serve_objects(
        self, pattern: str, cls: type[D], *, name: str | None, auth: Authenticator | None
    ) -> type[D]:
        if not (isinstance(cls, type) and isinstance(cls, ObjectClass)):
            raise InvalidRoute(f"{cls!r} is not a DurableObject subclass")
        serving = self.durable_classes.get(cls.namespace)
        if serving is not None and serving is not cls:
            raise InvalidRoute(
                f"namespace {cls.namespace!r} is served by {serving.__qualname__} already: "
                "an object runs in one activation, of one class"
            )
        params = _compile(pattern)[1]
        if name is None:
            if len(params) != 1:
                raise InvalidRoute(
                    f"route {pattern!r} has {len(params)} parameters; say which names the "
                    f"object: app.durable({pattern!r}, name=...)"
                )
            name = params[0]
        elif name not in params:
            raise InvalidRoute(f"route {pattern!r} has no parameter {name!r} to name the object")
        route = self.route(pattern, auth=auth)
        route.serve_object(cls, name)
        self.durable_classes[cls.namespace] = cls
        alarm_handler = cls.object_alarm_handler() if serving is None else None
        if alarm_handler is not None:
            self.on_alarm(cls.namespace)(alarm_handler)
        return cls

    def on_alarm(self, namespace: str) -> Callable[[AlarmHandler], AlarmHandler]:
        """Decorator: ``async def handler(alarm: AlarmInfo) -> None`` runs when an alarm of
        an object in ``namespace`` is due (at least once; an exception makes it retried).

        Raises ValueError for an empty namespace or one that already has a handler.
        """
        if not namespace:
            raise ValueError("an alarm handler needs a namespace")
        if namespace in self._alarm_handlers:
            raise ValueError(f"namespace {namespace!r} already has an alarm handler")

        def register(handler: AlarmHandler) -> AlarmHandler:
            self._alarm_handlers[namespace] = handler
            return handler

        return register

    @property
    def alarm_handlers(self) -> Mapping[str, AlarmHandler]:
        """Namespace → alarm handler, read-only."""
        return MappingProxyType(self._alarm_handlers)

    def resolve(self, path: str) -> tuple[Route, Mapping[str, str]] | None:
        """The route serving ``path`` and its (read-only) parameters, or None (the client
        gets 404)."""
        try:
            return self._resolved[path]
        except KeyError:
            pass
        found = None
        for route in self._routes:
            params = route.match(path)
            if params is not None:
                found = (route, MappingProxyType(params))
                break
        if len(path) <= _RESOLVED_MAX_PATH_CHARS:
            if len(self._resolved) >= _RESOLVED_CACHE_SIZE:
                self._resolved.clear()
            self._resolved[path] = found
        return found


async def _served_by_activation(*args: object) -> NoReturn:
    raise RuntimeError("a durable object route's events run in the object's activation")


def _compile(pattern: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    if not pattern.startswith("/"):
        raise InvalidRoute(f"route pattern must start with '/', got {pattern!r}")
    if any(c in _PARAM.sub("", pattern) for c in "{}"):
        raise InvalidRoute(f"malformed parameter in route pattern {pattern!r}")
    names: list[str] = []
    parts: list[str] = []
    last = 0
    for m in _PARAM.finditer(pattern):
        parts.append(re.escape(pattern[last : m.start()]))
        name = m.group(1)
        if name in names:
            raise InvalidRoute(f"parameter {name!r} appears twice in {pattern!r}")
        names.append(name)
        parts.append(f"(?P<{name}>[^/]+)")
        last = m.end()
    parts.append(re.escape(pattern[last:]))
    return re.compile("".join(parts)), tuple(names)
