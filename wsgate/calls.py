"""Calls of durable objects' methods (RPC): the wire format shared by callers and hosts.

A call travels as an ``ObjectCall`` (``proto/wsgate/v1/envelope.proto``) and is answered
with a ``CallResult``. Its arguments and its result are values of the storage codec
(:mod:`wsgate.values`: JSON's types plus bytes, never pickle): the arguments as one value,
the list ``[positional, keyword]``. Both are limited to :data:`MAX_CALL_BYTES` encoded; a
call over it is refused where it is made (the caller's :class:`~wsgate.errors.CallTooLarge`),
a result over it is answered as TOO_LARGE.

Each :class:`~wsgate.v1.envelope_pb2.CallError` kind is one exception of
:class:`~wsgate.errors.CallError`'s tree (:func:`raise_error`, :func:`error_of`), so a
caller sees the same typed error whether it was found at its end or at the object's.
Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NoReturn

from wsgate.errors import (
    CallCycle,
    CallError,
    CallFailed,
    CallTooLarge,
    CallUnavailable,
    InvalidCall,
    InvalidValue,
    NoSuchMethod,
)
from wsgate.v1 import envelope_pb2 as pb
from wsgate.values import Value, decode_value, encode_value

#: The most bytes a call's encoded arguments, or its encoded result, may take (as a
#: storage value: a result can be recorded with its turn, and both fit NATS' default
#: 1 MiB payload with room to spare).
MAX_CALL_BYTES = 131072

#: The most objects whose turns may wait on one another in a chain of calls (A calls B,
#: which calls C...): a call made at this depth is refused.
MAX_CALL_DEPTH = 16

#: A method name's length limit (an identifier, as Python writes them).
MAX_METHOD_CHARS = 128

#: An error message sent back is cut to this many characters.
MAX_ERROR_CHARS = 1000

#: The turn of a call is recorded under this prefix and the call's id.
CALL_KEY_PREFIX = "call:"

_KIND_ERRORS: dict[pb.CallError.Kind.ValueType, type[CallError]] = {
    pb.CallError.NO_SUCH_METHOD: NoSuchMethod,
    pb.CallError.FAILED: CallFailed,
    pb.CallError.TOO_LARGE: CallTooLarge,
    pb.CallError.CYCLE: CallCycle,
    pb.CallError.UNAVAILABLE: CallUnavailable,
    pb.CallError.INVALID: InvalidCall,
}
_ERROR_KINDS = {cls: kind for kind, cls in _KIND_ERRORS.items()}


def check_method_name(method: object) -> str:
    """``method`` if it can name a callable method: a public identifier (no leading
    ``_``) of at most :data:`MAX_METHOD_CHARS` characters. Raises InvalidCall otherwise."""
    if not isinstance(method, str):
        raise InvalidCall(f"a method name is a str, not {type(method).__name__}")
    if not method.isidentifier() or method.startswith("_") or len(method) > MAX_METHOD_CHARS:
        raise InvalidCall(
            f"{method[:MAX_METHOD_CHARS]!r} is no public method name (an identifier of at most "
            f"{MAX_METHOD_CHARS} characters, not starting with '_')",
            method=method[:MAX_METHOD_CHARS],
        )
    return method


def encode_arguments(args: Sequence[object], kwargs: Mapping[str, object]) -> bytes:
    """The encoded arguments of a call. Raises InvalidCall for an argument that is not a
    storable value, CallTooLarge over :data:`MAX_CALL_BYTES`."""
    try:
        data = encode_value([list(args), dict(kwargs)])
    except InvalidValue as exc:
        raise InvalidCall(f"the arguments are not JSON types plus bytes: {exc}") from exc
    if len(data) > MAX_CALL_BYTES:
        raise CallTooLarge(
            f"the arguments are {len(data)} bytes encoded, over the limit of {MAX_CALL_BYTES}"
        )
    return data


def decode_arguments(data: bytes) -> tuple[list[Value], dict[str, Value]]:
    """The positional and keyword arguments :func:`encode_arguments` made. Raises
    InvalidCall for anything else (including a size over the limit)."""
    if len(data) > MAX_CALL_BYTES:
        raise InvalidCall(f"the arguments are {len(data)} bytes, over {MAX_CALL_BYTES}")
    try:
        decoded = decode_value(data)
    except InvalidValue as exc:
        raise InvalidCall(f"the arguments do not decode: {exc}") from exc
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or not isinstance(decoded[0], list)
        or not isinstance(decoded[1], dict)
    ):
        raise InvalidCall("the arguments are not [positional, keyword]")
    return decoded[0], decoded[1]


def value_result(value: object) -> pb.CallResult:
    """The answer carrying ``value``: TOO_LARGE over :data:`MAX_CALL_BYTES`, INVALID if it
    is not a storable value."""
    try:
        data = encode_value(value)
    except InvalidValue as exc:
        return error_result(
            InvalidCall(f"the method returned what is not JSON types plus bytes: {exc}")
        )
    if len(data) > MAX_CALL_BYTES:
        return error_result(
            CallTooLarge(
                f"the result is {len(data)} bytes encoded, over the limit of {MAX_CALL_BYTES}"
            )
        )
    return pb.CallResult(value=data)


def error_result(error: CallError) -> pb.CallResult:
    """The answer for ``error`` (the kind of its class)."""
    kind = pb.CallError.KIND_UNSPECIFIED
    for cls in type(error).__mro__:
        if cls in _ERROR_KINDS:
            kind = _ERROR_KINDS[cls]
            break
    remote_type = error.remote_type if isinstance(error, CallFailed) else ""
    return pb.CallResult(
        error=pb.CallError(kind=kind, message=str(error)[:MAX_ERROR_CHARS], type=remote_type)
    )


def failed_result(exc: BaseException) -> pb.CallResult:
    """The answer for a method that raised ``exc``."""
    return error_result(
        CallFailed(f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS], remote_type=type(exc).__name__)
    )


def error_of(error: pb.CallError, call: pb.ObjectCall) -> CallError:
    """The exception an answered ``error`` to ``call`` stands for."""
    cls = _KIND_ERRORS.get(error.kind, CallError)
    where = {"namespace": call.object.namespace, "name": call.object.name, "method": call.method}
    if cls is CallFailed:
        return CallFailed(error.message, remote_type=error.type, **where)
    return cls(error.message, **where)


def result_value(result: pb.CallResult, call: pb.ObjectCall) -> Value:
    """The value ``result`` answers to ``call``; raises its CallError if it is one (a
    result that is neither is a CallError too)."""
    outcome = result.WhichOneof("outcome")
    if outcome == "value":
        try:
            return decode_value(result.value)
        except InvalidValue as exc:
            raise_error(pb.CallError(kind=pb.CallError.INVALID, message=str(exc)), call)
    if outcome == "error":
        raise_error(result.error, call)
    raise_error(pb.CallError(message="the answer holds no result"), call)


def raise_error(error: pb.CallError, call: pb.ObjectCall) -> NoReturn:
    """Raise the exception of :func:`error_of`."""
    raise error_of(error, call)


def object_ref(namespace: str, name: str) -> pb.ObjectRef:
    """The ``ObjectRef`` of an object."""
    return pb.ObjectRef(namespace=namespace, name=name)


def in_chain(chain: Sequence[pb.ObjectRef], namespace: str, name: str) -> bool:
    """Whether the object (``namespace``, ``name``) is one of ``chain``."""
    return any(ref.namespace == namespace and ref.name == name for ref in chain)
