"""Hypothesis strategies for hostile protobuf messages, built from their descriptors.

:func:`messages` draws a message of any type with random field values: any subset of its
fields set (each three times in four), one member (or none) of each oneof, repeated and map
fields of a few entries, nested messages down to a depth. Integers favour their edges (0, 1,
-1, 2**31-1, 2**32-1, 2**63-1, 2**64-1, the type's extremes), enums include values the
schema does not name (proto3 enums are open), and strings come from the strategy the caller
gives, so that hostile ids that look valid (those of the running roles) mix with junk.
:func:`payloads` draws the bytes a hostile peer sends: random bytes, a random message of
some type, or one of those cut short or with junk appended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

_F = FieldDescriptor
_RANGES = {
    _F.TYPE_INT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _F.TYPE_INT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _F.TYPE_UINT32: (0, 2**32 - 1),
    _F.TYPE_FIXED32: (0, 2**32 - 1),
    _F.TYPE_UINT64: (0, 2**64 - 1),
    _F.TYPE_FIXED64: (0, 2**64 - 1),
}
_EDGES = (0, 1, 2, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1)
#: Entries drawn for a repeated or map field (at most).
MAX_ENTRIES = 3
#: True three times in four.
_MOSTLY = st.integers(0, 3).map(bool)


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (*_EDGES, low, high) if low <= v <= high})
    return st.sampled_from(edges) | st.integers(low, high)


def _scalar(field: FieldDescriptor, strings: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == _F.TYPE_STRING:
        return strings
    if kind == _F.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == _F.TYPE_BOOL:
        return st.booleans()
    if kind == _F.TYPE_DOUBLE:
        return st.floats()
    if kind == _F.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == _F.TYPE_ENUM:
        assert field.enum_type is not None
        named = [value.number for value in field.enum_type.values]
        return st.sampled_from([*named, max(named) + 1, 2**31 - 1, -1])
    return _integers(*_RANGES[kind])


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@st.composite
def messages(
    draw: st.DrawFn, descriptor: Descriptor, strings: st.SearchStrategy[str], depth: int = 3
) -> Message:
    """A message of ``descriptor``'s type with random fields (see the module docstring)."""
    message = message_factory.GetMessageClass(descriptor)()
    chosen: list[FieldDescriptor] = []
    in_oneofs: set[str] = set()
    for oneof in descriptor.oneofs:
        in_oneofs.update(field.name for field in oneof.fields)
        member = draw(st.sampled_from([None, *oneof.fields]))
        if member is not None:
            chosen.append(member)
    # Most fields set: a hostile message that reaches deep into a handler needs many of them.
    chosen += [f for f in descriptor.fields if f.name not in in_oneofs and draw(_MOSTLY)]
    for field in chosen:
        _fill(draw, message, field, strings, depth)
    return message


def _fill(
    draw: st.DrawFn,
    message: Message,
    field: FieldDescriptor,
    strings: st.SearchStrategy[str],
    depth: int,
) -> None:
    target = getattr(message, field.name)
    if _is_map(field):
        assert field.message_type is not None
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        for _ in range(draw(st.integers(0, MAX_ENTRIES))):
            key = draw(_scalar(key_field, strings))
            if value_field.message_type is None:
                target[key] = draw(_scalar(value_field, strings))
            elif depth > 0:
                target[key].CopyFrom(draw(messages(value_field.message_type, strings, depth - 1)))
        return
    if field.is_repeated:
        for _ in range(draw(st.integers(0, MAX_ENTRIES))):
            if field.message_type is None:
                target.append(draw(_scalar(field, strings)))
            elif depth > 0:
                target.add().CopyFrom(draw(messages(field.message_type, strings, depth - 1)))
        return
    if field.message_type is not None:
        if depth > 0:
            target.CopyFrom(draw(messages(field.message_type, strings, depth - 1)))
        else:
            target.SetInParent()
        return
    setattr(message, field.name, draw(_scalar(field, strings)))


def payloads(
    descriptors: Sequence[Descriptor], strings: st.SearchStrategy[str]
) -> st.SearchStrategy[bytes]:
    """What a hostile peer sends: random bytes, a random message of one of ``descriptors``
    (serialized), or one of those cut short or followed by junk."""
    whole = st.sampled_from(list(descriptors)).flatmap(
        lambda d: messages(d, strings).map(lambda m: m.SerializeToString())
    )
    damaged = st.tuples(whole, st.integers(0, 64), st.binary(min_size=1, max_size=8)).map(
        lambda t: t[0][: t[1]] if t[1] < len(t[0]) else t[0] + t[2]
    )
    return st.one_of(st.binary(max_size=128), whole, damaged)
