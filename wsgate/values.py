"""The value codec: what a durable object can store, as the ``wsgate.v1.Value`` message.

Storable values are JSON's types plus bytes:

====================================  ============================  ======================
Python, when encoding                 Value                         Python, when decoding
====================================  ============================  ======================
``None``                              ``null``                      ``None``
``bool``                              ``bool``                      ``bool``
``int`` in int64 range                ``int`` (zigzag varint)       ``int``
``float`` (NaN and ±inf included)     ``float`` (IEEE 754 double)   ``float``
``str``                               ``string``                    ``str``
``bytes``, ``bytearray``, memoryview  ``bytes``                     ``bytes``
``list``, ``tuple``                   ``list``                      ``list``
``dict`` with str keys                ``map`` (key order not kept)  ``dict``
====================================  ============================  ======================

Subclasses of these types (``IntEnum``, ``OrderedDict``, ...) are stored as their base
type. Anything else raises :class:`~wsgate.errors.InvalidValue` naming the type and where
it sits in the value, e.g. ``value['a'][2]``. The codec is data only: decoding never
imports or calls anything, unlike pickle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

from google.protobuf.message import DecodeError

from wsgate.errors import InvalidValue
from wsgate.v1 import state_pb2 as pb

#: The deepest nesting of lists and maps, counting the outermost container as 1.
#: A map costs three protobuf message levels (Value, MapValue, map entry), and protobuf
#: parsers refuse more than 100 levels by default (upb, C++, Java), so 32 is the most a
#: value can nest and still be read by any stock protobuf library.
MAX_DEPTH = 32

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_ROOT = "value"

#: A stored value as it is read back (:func:`decode_value`): JSON's types plus bytes.
Value: TypeAlias = bool | int | float | str | bytes | list["Value"] | dict[str, "Value"] | None

#: What may be given to store (:func:`encode_value`): a :data:`Value`, a tuple (stored as a
#: list), a bytes-like (stored as bytes). Sequence and Mapping (read-only, so
#: ``list[int]`` is one) are what the type checker sees; at run time only list, tuple and
#: dict with str keys are containers, and anything else raises InvalidValue.
StorableValue: TypeAlias = (
    bool
    | int
    | float
    | str
    | bytes
    | bytearray
    | memoryview
    | Sequence["StorableValue"]
    | Mapping[str, "StorableValue"]
    | None
)


def encode_value(obj: object) -> bytes:
    """Encode ``obj`` as a serialized ``wsgate.v1.Value``.

    The encoding is deterministic (map entries sorted by key): the same value always gives
    the same bytes. Raises InvalidValue for a type that cannot be stored, a dict key that
    is not a str, an int outside int64, nesting deeper than :data:`MAX_DEPTH` (including
    a value that contains itself), or a str with no UTF-8 form (lone surrogates).
    """
    message = pb.Value()
    _encode_into(message, obj, _ROOT, 0)
    return message.SerializeToString(deterministic=True)


def decode_value(data: bytes) -> Value:
    """Decode a serialized ``wsgate.v1.Value`` made by :func:`encode_value`.

    Raises InvalidValue if ``data`` is not a Value: malformed protobuf, invalid UTF-8 in a
    string, a Value (at any depth) with no kind set (``b""`` is not a value), or nesting
    deeper than :data:`MAX_DEPTH`.
    """
    try:
        message = pb.Value.FromString(bytes(data))
    except DecodeError as exc:
        raise InvalidValue(f"not a serialized Value: {exc}", path=_ROOT) from exc
    return _decode(message, _ROOT, 0)


def encode_optional(obj: StorableValue) -> bytes:
    """:func:`encode_value`, except that None is ``b""`` (an attachment's "none": it costs
    no bytes on the wire)."""
    return b"" if obj is None else encode_value(obj)


def decode_optional(data: bytes) -> Value:
    """:func:`decode_value`, except that ``b""`` is None (see :func:`encode_optional`)."""
    return None if not data else decode_value(data)


def _encode_into(message: pb.Value, obj: object, path: str, depth: int) -> None:
    # Order matters: bool before int (bool is an int), str before the sequence checks.
    if obj is None:
        message.null = pb.NULL_VALUE
    elif isinstance(obj, bool):
        message.bool = obj
    # Subclasses (IntEnum, str-valued Enum, ...) are stored by the base type's own
    # conversion: their __str__ / __int__ / __float__ may say something else.
    elif isinstance(obj, int):
        number = int.__int__(obj)
        if not INT64_MIN <= number <= INT64_MAX:
            raise InvalidValue(
                f"{path} is the int {number}, outside the int64 range [-2**63, 2**63)", path=path
            )
        message.int = number
    elif isinstance(obj, float):
        message.float = float.__float__(obj)
    elif isinstance(obj, str):
        try:
            message.string = str.__str__(obj)
        except (ValueError, UnicodeError) as exc:
            # protobuf strings are UTF-8; a lone surrogate has no UTF-8 form.
            raise InvalidValue(f"{path} is a str that is not valid UTF-8", path=path) from exc
    elif isinstance(obj, bytes | bytearray | memoryview):
        message.bytes = bytes(obj)
    elif isinstance(obj, list | tuple):
        depth = _deeper(path, depth)
        items = message.list.items
        for index, item in enumerate(obj):
            _encode_into(items.add(), item, f"{path}[{index}]", depth)
        # An empty list must still set the oneof: touching .items alone does not.
        message.list.SetInParent()
    elif isinstance(obj, dict):
        depth = _deeper(path, depth)
        entries = message.map.entries
        for key, item in obj.items():
            if not isinstance(key, str):
                raise InvalidValue(
                    f"{path} has a key of type {type(key).__qualname__} ({key!r}); "
                    "map keys must be str",
                    path=path,
                )
            item_path = f"{path}[{key!r}]"
            try:
                entry = entries[key]
            except (ValueError, UnicodeError) as exc:
                raise InvalidValue(
                    f"{item_path}: the key is a str that is not valid UTF-8", path=path
                ) from exc
            _encode_into(entry, item, item_path, depth)
        message.map.SetInParent()
    else:
        raise InvalidValue(
            f"{path} is of type {type(obj).__qualname__}; only None, bool, int, float, str, "
            "bytes, list and dict (with str keys) can be stored",
            path=path,
        )


def _deeper(path: str, depth: int) -> int:
    depth += 1
    if depth > MAX_DEPTH:
        raise InvalidValue(
            f"{path} nests lists and dicts deeper than {MAX_DEPTH} levels "
            "(or the value contains itself)",
            path=path,
        )
    return depth


def _decode(message: pb.Value, path: str, depth: int) -> Value:
    kind = message.WhichOneof("kind")
    if kind == "null":
        return None
    if kind == "bool":
        return message.bool
    if kind == "int":
        return message.int
    if kind == "float":
        return message.float
    if kind == "string":
        return message.string
    if kind == "bytes":
        return message.bytes
    if kind == "list":
        depth = _deeper(path, depth)
        return [
            _decode(item, f"{path}[{index}]", depth)
            for index, item in enumerate(message.list.items)
        ]
    if kind == "map":
        depth = _deeper(path, depth)
        return {
            key: _decode(item, f"{path}[{key!r}]", depth)
            for key, item in message.map.entries.items()
        }
    raise InvalidValue(f"{path} is a Value with no kind set", path=path)
