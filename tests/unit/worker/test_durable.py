"""Registering durable object classes: naming, routing and misuse, without I/O."""

from __future__ import annotations

import pytest

from wsgate import Accept, App, DurableObject, InvalidCall, NoSuchMethod
from wsgate.worker.durable import public_method
from wsgate.worker.errors import InvalidResponse, InvalidRoute


class Plain(DurableObject):
    pass


class Named(DurableObject):
    namespace = "rooms"

    async def on_alarm(self) -> None:
        pass


def test_the_namespace_defaults_to_the_class_name() -> None:
    assert Plain.namespace == "Plain"
    assert Named.namespace == "rooms"


def test_the_only_parameter_names_the_object() -> None:
    app = App()
    assert app.durable("/room/{room}", Plain) is Plain
    route, params = app.resolve("/room/lobby") or (None, {})
    assert route is not None
    assert route.durable
    assert params == {"room": "lobby"}
    assert route.connect_handler is not None
    assert route.message_handler is not None
    assert route.close_handler is not None


def test_the_decorator_form_and_an_explicit_name() -> None:
    app = App()

    @app.durable("/org/{org}/room/{room}", name="room")
    class Room(DurableObject):
        pass

    assert app.resolve("/org/acme/room/lobby") is not None


def test_an_alarm_handler_is_registered_only_when_overridden() -> None:
    app = App()
    app.durable("/a/{name}", Plain)
    app.durable("/b/{name}", Named)
    assert set(app.alarm_handlers) == {"rooms"}


@pytest.mark.parametrize(
    ("pattern", "name", "match"),
    [
        ("/room", None, "0 parameters"),
        ("/org/{org}/room/{room}", None, "2 parameters"),
        ("/room/{room}", "name", "no parameter 'name'"),
    ],
)
def test_a_pattern_that_cannot_name_the_object_is_refused(
    pattern: str, name: str | None, match: str
) -> None:
    with pytest.raises(InvalidRoute, match=match):
        App().durable(pattern, Plain, name=name)


def test_a_class_that_is_not_a_durable_object_is_refused() -> None:
    with pytest.raises(InvalidRoute, match="not a DurableObject"):
        App().durable("/x/{y}", int)  # type: ignore[type-var]


def test_tags_must_be_a_sequence_not_one_string() -> None:
    with pytest.raises(InvalidResponse, match="tags=\\[tag\\]"):
        Accept(tags="lobby")  # a str is a Sequence[str]: refused at run time
    assert Accept(tags=["a", "b"]).tags == ("a", "b")


def test_a_class_with_only_a_namespace_is_refused() -> None:
    class LooksLikeOne:
        namespace = "rooms"

    with pytest.raises(InvalidRoute, match="not a DurableObject"):
        App().durable("/x/{y}", LooksLikeOne)  # type: ignore[type-var]


# -- which methods a call may run ----------------------------------------------------------


class Callable_(DurableObject):
    namespace = "Callable"

    async def add(self, n: int) -> int:
        return n + 1

    def plain(self) -> str:
        return "plain"

    async def on_message(self, conn: object, message: str | bytes) -> None:
        pass

    def _private(self) -> None:
        pass

    @staticmethod
    def static() -> None:
        pass

    @property
    def prop(self) -> int:
        return 1

    attribute = 5


def instance() -> Callable_:
    obj = Callable_.__new__(Callable_)
    obj.name = "one"
    return obj


def test_a_call_may_run_the_public_methods_a_class_defines() -> None:
    obj = instance()
    assert public_method(obj, "plain")() == "plain"
    assert public_method(obj, "add").__func__ is Callable_.add  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "name",
    [
        "missing",
        "on_message",  # a hook, even overridden
        "on_connect",
        "broadcast",  # DurableObject's own API
        "connections",
        "alarm",
        "storage",
        "env",
        "static",
        "prop",
        "attribute",
    ],
)
def test_a_call_may_not_run_anything_else(name: str) -> None:
    with pytest.raises(NoSuchMethod) as raised:
        public_method(instance(), name)
    assert (raised.value.namespace, raised.value.name, raised.value.method) == (
        "Callable",
        "one",
        name,
    )


@pytest.mark.parametrize("name", ["_private", "__init__", "__class__", "not a name"])
def test_a_private_or_malformed_name_is_an_invalid_call(name: str) -> None:
    with pytest.raises(InvalidCall):
        public_method(instance(), name)
