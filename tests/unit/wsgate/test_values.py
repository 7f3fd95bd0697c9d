"""The value codec: what round-trips, what is refused, and where."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.errors import InvalidValue
from wsgate.v1 import state_pb2 as pb
from wsgate.values import INT64_MAX, INT64_MIN, MAX_DEPTH, decode_value, encode_value


def round_trip(obj: object) -> Any:
    return decode_value(encode_value(obj))


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
trees = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=40,
)


@given(trees)
def test_json_and_bytes_trees_round_trip(value: object) -> None:
    assert round_trip(value) == value


@given(st.dictionaries(st.text(), st.integers(min_value=0, max_value=9), max_size=10))
def test_encoding_does_not_depend_on_key_order(value: dict[str, int]) -> None:
    backwards = dict(reversed(list(value.items())))
    assert encode_value(backwards) == encode_value(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        1.5,
        "",
        "héllo \U0001f600",
        b"",
        b"\x00\xff",
        [],
        {},
        [[], {}],
        {"": None},
        {"a": [1, "two", b"three", {"four": 4.0}]},
    ],
)
def test_each_type_round_trips_as_itself(value: object) -> None:
    decoded = round_trip(value)
    assert decoded == value
    assert type(decoded) is type(value)


def test_bool_stays_bool_and_int_stays_int() -> None:
    assert round_trip(True) is True
    assert round_trip(1) == 1
    assert type(round_trip(1)) is int


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_infinities_round_trip(value: float) -> None:
    assert round_trip(value) == value


def test_nan_round_trips() -> None:
    assert math.isnan(round_trip(math.nan))


def test_negative_zero_keeps_its_sign() -> None:
    assert math.copysign(1.0, round_trip(-0.0)) == -1.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (bytearray(b"ab"), b"ab"),
        (memoryview(b"ab"), b"ab"),
        ((1, (2, 3)), [1, [2, 3]]),
        (collections.OrderedDict(a=1), {"a": 1}),
    ],
)
def test_accepted_variants_decode_as_base_types(value: object, expected: object) -> None:
    decoded = round_trip(value)
    assert decoded == expected
    assert type(decoded) is type(expected)


def test_subclasses_are_stored_as_their_base_type() -> None:
    class Color(enum.IntEnum):
        RED = 1

    class Name(str, enum.Enum):  # noqa: UP042 - its __str__ is "Name.ALICE", unlike StrEnum
        ALICE = "alice"

    assert round_trip([Color.RED, Name.ALICE]) == [1, "alice"]
    assert round_trip({Name.ALICE: Color.RED}) == {"alice": 1}
    assert type(round_trip(Color.RED)) is int


@pytest.mark.parametrize("value", [INT64_MIN, INT64_MAX])
def test_int64_edges_round_trip(value: int) -> None:
    assert round_trip(value) == value


@pytest.mark.parametrize("value", [INT64_MIN - 1, INT64_MAX + 1, 10**30])
def test_ints_outside_int64_are_refused(value: int) -> None:
    with pytest.raises(InvalidValue, match="int64") as info:
        encode_value(value)
    assert info.value.path == "value"


class Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        frozenset(),
        1j,
        decimal.Decimal("1.5"),
        datetime.date(2024, 1, 1),
        Opaque(),
        Opaque,
        print,
        range(3),
        Ellipsis,
    ],
)
def test_other_types_are_refused_naming_the_type(value: object) -> None:
    with pytest.raises(InvalidValue) as info:
        encode_value(value)
    assert type(value).__qualname__ in str(info.value)
    assert info.value.path == "value"
    assert isinstance(info.value, TypeError)


def test_refusal_names_the_path_inside_the_value() -> None:
    with pytest.raises(InvalidValue, match=r"value\['a'\]\[2\] is of type set") as info:
        encode_value({"a": [1, 2, {3}]})
    assert info.value.path == "value['a'][2]"


@pytest.mark.parametrize("key", [1, None, b"a", ("t",), 1.5])
def test_dict_keys_other_than_str_are_refused(key: object) -> None:
    with pytest.raises(InvalidValue, match="map keys must be str") as info:
        encode_value({"outer": {key: 1}})
    assert info.value.path == "value['outer']"
    assert type(key).__qualname__ in str(info.value)


@pytest.mark.parametrize("value", ["\udc80", ["ok", "\ud800"], {"\udfff": 1}])
def test_strings_without_utf8_form_are_refused(value: object) -> None:
    with pytest.raises(InvalidValue, match="UTF-8"):
        encode_value(value)


def nested_lists(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def nested_dicts(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("nest", [nested_lists, nested_dicts])
def test_nesting_at_the_depth_limit_round_trips(nest: Any) -> None:
    value = nest(MAX_DEPTH)
    assert round_trip(value) == value


@pytest.mark.parametrize("nest", [nested_lists, nested_dicts])
def test_nesting_over_the_depth_limit_is_refused(nest: Any) -> None:
    with pytest.raises(InvalidValue, match=f"deeper than {MAX_DEPTH}"):
        encode_value(nest(MAX_DEPTH + 1))


def test_a_value_containing_itself_is_refused_not_a_recursion_error() -> None:
    loop: list[object] = []
    loop.append(loop)
    mapping: dict[str, object] = {}
    mapping["self"] = mapping
    for value in (loop, mapping):
        with pytest.raises(InvalidValue, match="contains itself"):
            encode_value(value)


def test_decoding_refuses_nesting_over_the_limit() -> None:
    # Built by hand: encode_value would refuse it, but another writer might not.
    message = pb.Value(int=0)
    for _ in range(MAX_DEPTH + 1):
        message = pb.Value(list=pb.ListValue(items=[message]))
    with pytest.raises(InvalidValue, match=f"deeper than {MAX_DEPTH}"):
        decode_value(message.SerializeToString())


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty: no kind"),
        pytest.param(b"\xff\xff\xff", id="bad tag"),
        pytest.param(b"\x2a\x05ab", id="truncated string"),
        pytest.param(b"\x2a\x01\xff", id="string not UTF-8"),
        pytest.param(b"\x3a\x02\x0a\x00", id="list item with no kind"),
        pytest.param(b"\x48\x01", id="unknown field only"),
        pytest.param(encode_value({"a": [1, 2, 3]})[:-1], id="cut short"),
        pytest.param(bytes(range(256)), id="noise"),
    ],
)
def test_garbage_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidValue):
        decode_value(data)


def test_deep_garbage_is_refused_not_a_recursion_error() -> None:
    # 1000 lists in lists, written byte by byte: deeper than any protobuf parser allows.
    data = b"\x18\x00"  # Value{int: 0}
    for _ in range(1000):
        items = b"\x0a" + _varint(len(data)) + data  # ListValue{items: [data]}
        data = b"\x3a" + _varint(len(items)) + items  # Value{list: items}
    with pytest.raises(InvalidValue):
        decode_value(data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
