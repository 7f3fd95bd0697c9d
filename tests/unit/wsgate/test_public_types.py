"""No ``Any`` on the public API: every name of ``wsgate.__all__`` (the SDK), the role entry
points and the state clients have precise types, so a user's type checker checks their
calls. A value that truly is arbitrary has a named type (``wsgate.Value``)."""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import typing
from collections.abc import Iterator

import pytest

import wsgate
from wsgate.gateway.server import Gateway
from wsgate.stateservice.server import StateServer
from wsgate.worker.runtime import Worker
from wsgate.worker.state_client import StateClient
from wsgate.worker.state_services import (
    ActivationsClient,
    AlarmsClient,
    KvClient,
    MembershipClient,
)

ROLES_AND_CLIENTS: tuple[type, ...] = (
    Gateway,
    Worker,
    StateServer,
    StateClient,
    KvClient,
    MembershipClient,
    AlarmsClient,
    ActivationsClient,
)


def _public() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = [(name, getattr(wsgate, name)) for name in wsgate.__all__]
    found += [(cls.__qualname__, cls) for cls in ROLES_AND_CLIENTS]
    return found


def _annotated(name: str, obj: object) -> Iterator[tuple[str, object]]:
    """``obj`` and, for a class, its public methods, properties and annotated attributes
    (its own and inherited, except from builtins and exceptions)."""
    if not inspect.isclass(obj):
        if callable(obj):
            yield name, obj
        return
    yield name, obj  # its class-level annotations
    init = obj.__dict__.get("__init__")
    if init is not None and inspect.isfunction(init):
        yield f"{name}.__init__", init
    for attr, member in inspect.getmembers(obj):
        if attr.startswith("_"):
            continue
        if isinstance(member, property) and member.fget is not None:
            yield f"{name}.{attr}", member.fget
        elif (inspect.isfunction(member) or inspect.ismethod(member)) and (
            member.__module__.startswith("wsgate")
        ):
            yield f"{name}.{attr}", member


def _contains_any(hint: object, seen: frozenset[int] = frozenset()) -> bool:
    if hint is typing.Any:
        return True
    if id(hint) in seen:
        return False
    return any(_contains_any(arg, seen | {id(hint)}) for arg in typing.get_args(hint))


@functools.cache
def _namespace(module_name: str) -> dict[str, object]:
    """The module's globals plus what it imports under ``if TYPE_CHECKING:`` (annotations
    name those too)."""
    module = sys.modules[module_name]
    # The recursive aliases of wsgate.values name themselves ("Value") wherever they go.
    namespace = {"Value": wsgate.Value, "StorableValue": wsgate.StorableValue}
    namespace.update(vars(module))
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in {
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        }:
            block = ast.Module(body=node.body, type_ignores=[])
            exec(compile(block, module_name, "exec"), namespace)  # imports only
    return namespace


def _hints_of(obj: object, module_name: str) -> dict[str, object]:
    return dict(typing.get_type_hints(obj, globalns=_namespace(module_name)))


def _hints(obj: object) -> dict[str, object]:
    if inspect.isclass(obj):
        hints: dict[str, object] = {}
        for klass in reversed(obj.__mro__):
            if klass.__module__.startswith("wsgate"):
                own = {k: v for k, v in vars(klass).get("__annotations__", {}).items()}
                holder = type("_Own", (), {"__annotations__": own, "__module__": klass.__module__})
                hints.update(_hints_of(holder, klass.__module__))
        return {k: v for k, v in hints.items() if not k.startswith("_")}
    function = inspect.unwrap(obj)  # type: ignore[arg-type]
    return _hints_of(function, function.__module__)


CASES = [case for name, obj in _public() for case in _annotated(name, obj)]


@pytest.mark.parametrize(("name", "obj"), CASES, ids=[name for name, _ in CASES])
def test_no_any_in_a_public_signature(name: str, obj: object) -> None:
    hints = _hints(obj)
    with_any = sorted(key for key, hint in hints.items() if _contains_any(hint))
    assert not with_any, f"{name}: Any in the annotation of {', '.join(with_any)}"


def test_every_public_function_is_annotated() -> None:
    """A function with no annotations would pass the test above silently."""
    bare = [
        name
        for name, obj in CASES
        if inspect.isfunction(obj) and not name.endswith("__init__") and "return" not in _hints(obj)
    ]
    assert not bare, f"no return annotation: {bare}"


def test_the_value_alias_covers_what_the_codec_decodes() -> None:
    from wsgate.values import decode_value, encode_value

    value: wsgate.Value = {"a": [1, 2.5, "x", b"y", None, True, {"b": []}]}
    assert decode_value(encode_value(value)) == value
