"""An activation's knowledge of its object's keys: key ranges in UTF-8 byte order, layers
(known values, known deletions, "whole"), filling the cache from reads, and listings merged
from the state service's answer and the layers, also against a plain dict model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.storage_keys import KEY_UNIVERSE, KEYS, weighted
from wsgate.worker.object_cache import (
    UNKNOWN,
    KeyRange,
    Layer,
    StorageCache,
    merged_listing,
    needs_remote,
    remote_limit,
)

# "\ue000" sorts before "\U00010000" in UTF-8 (and code points), after it in UTF-16.
BMP_HIGH = "\ue000"
NON_BMP = "\U00010000"


def layer(values: dict[str, bytes | None], *, whole: bool = False) -> Layer:
    result = Layer()
    for key, value in values.items():
        result.set(key, value)
    result.whole = whole
    return result


# -- KeyRange ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bounds", "key", "inside"),
    [
        (KeyRange(), "", True),
        (KeyRange(), "anything", True),
        (KeyRange(prefix="ab"), "ab", True),
        (KeyRange(prefix="ab"), "abc", True),
        (KeyRange(prefix="ab"), "a", False),
        (KeyRange(prefix="ab"), "b", False),
        (KeyRange(prefix="ab"), "xab", False),
        (KeyRange(start="b"), "b", True),  # start is inclusive
        (KeyRange(start="b"), "a\U0010ffff", False),
        (KeyRange(start="b"), "b\x00", True),
        (KeyRange(end="b"), "b", False),  # end is exclusive
        (KeyRange(end="b"), "a\U0010ffff", True),
        (KeyRange(end="b"), "", True),
        (KeyRange(start="b", end="b"), "b", False),  # empty range
        (KeyRange(start="c", end="a"), "b", False),  # inverted range
        (KeyRange(prefix="a", start="ab", end="ac"), "ab", True),
        (KeyRange(prefix="a", start="ab", end="ac"), "abz", True),
        (KeyRange(prefix="a", start="ab", end="ac"), "aa", False),
        (KeyRange(prefix="a", start="ab", end="ac"), "ac", False),
        (KeyRange(prefix="a", start="", end="z"), "b", False),  # the prefix still counts
        # UTF-8 order, not UTF-16: U+E000 comes before U+10000.
        (KeyRange(start=NON_BMP), BMP_HIGH, False),
        (KeyRange(end=NON_BMP), BMP_HIGH, True),
        (KeyRange(start=BMP_HIGH), NON_BMP, True),
        (KeyRange(end=BMP_HIGH), NON_BMP, False),
        (KeyRange(start="\uffff", end=NON_BMP), "\uffff", True),
        (KeyRange(start="\uffff", end=NON_BMP), "\U0001f600", False),
        (KeyRange(prefix="\U0001f600"), "\U0001f600a", True),
        (KeyRange(prefix="\U0001f600"), "\U0001f601", False),
    ],
)
def test_key_range_membership(bounds: KeyRange, key: str, inside: bool) -> None:
    assert (key in bounds) is inside


@pytest.mark.parametrize("key", [b"a", 1, None])
def test_a_key_that_is_not_a_str_is_never_inside(key: object) -> None:
    assert key not in KeyRange()


@pytest.mark.parametrize(
    ("bounds", "everything"),
    [
        (KeyRange(), True),
        (KeyRange(prefix="a"), False),
        (KeyRange(start=""), False),
        (KeyRange(end="z"), False),
    ],
)
def test_is_everything(bounds: KeyRange, everything: bool) -> None:
    assert bounds.is_everything is everything


# -- Layer and StorageCache --------------------------------------------------------------


def test_a_layer_tells_unknown_from_deleted_from_a_value() -> None:
    known = Layer()
    assert known.lookup("k") is UNKNOWN
    known.set("k", b"v")
    assert known.lookup("k") == b"v"
    known.set("k", None)
    assert known.lookup("k") is None
    assert known.lookup("other") is UNKNOWN
    assert repr(UNKNOWN) == "UNKNOWN"


def test_a_whole_layer_knows_unknown_keys_do_not_exist() -> None:
    known = layer({"k": b"v", "gone": None}, whole=True)
    assert known.lookup("other") is None
    assert known.lookup("k") == b"v"
    assert known.lookup("gone") is None


def test_clear_forgets_every_value_and_makes_the_layer_whole() -> None:
    known = layer({"k": b"v"})
    known.clear()
    assert known.whole
    assert known.values == {}
    assert known.lookup("k") is None
    known.set("k", b"new")
    assert known.lookup("k") == b"new"


def test_known_in_counts_values_and_deletions_inside_the_bounds() -> None:
    known = layer({"a1": b"x", "a2": None, "b1": b"y", BMP_HIGH: b"z"})
    assert known.known_in(KeyRange()) == 4
    assert known.known_in(KeyRange(prefix="a")) == 2
    assert known.known_in(KeyRange(start="a2", end="b2")) == 2
    assert known.known_in(KeyRange(start=NON_BMP)) == 0


def test_fill_teaches_the_cache_an_unknown_key() -> None:
    cache = StorageCache()
    cache.fill("k", b"remote")
    cache.fill("missing", None)
    assert cache.lookup("k") == b"remote"
    assert cache.lookup("missing") is None


@pytest.mark.parametrize("known", [b"written", None], ids=["written", "deleted"])
def test_fill_never_overrides_a_known_key(known: bytes | None) -> None:
    cache = StorageCache()
    cache.set("k", known)
    cache.fill("k", b"remote")
    assert cache.lookup("k") == known
    cache.fill("k", None)
    assert cache.lookup("k") == known


def test_fill_does_nothing_once_the_cache_is_whole() -> None:
    cache = StorageCache()
    cache.clear()
    cache.fill("k", b"remote")
    assert cache.values == {}
    assert cache.lookup("k") is None
    listed = StorageCache()
    listed.whole = True  # a listing of every key taught it every key
    listed.fill("k", b"remote")
    assert listed.values == {}


# -- merged listings ---------------------------------------------------------------------

REMOTE = {"a": b"1", "b": b"2", "c": b"3", NON_BMP: b"4", BMP_HIGH: b"5"}


def test_a_listing_with_no_layers_is_the_remote_in_utf8_order() -> None:
    assert merged_listing(REMOTE, [], KeyRange(), limit=None, reverse=False) == [
        ("a", b"1"),
        ("b", b"2"),
        ("c", b"3"),
        (BMP_HIGH, b"5"),
        (NON_BMP, b"4"),
    ]
    assert [key for key, _ in merged_listing(REMOTE, [], KeyRange(), limit=2, reverse=True)] == [
        NON_BMP,
        BMP_HIGH,
    ]


@pytest.mark.parametrize(
    ("limit", "reverse", "keys"),
    [
        (None, False, ["a", "b", "c", BMP_HIGH, NON_BMP]),
        (0, False, []),
        (1, False, ["a"]),
        (3, False, ["a", "b", "c"]),
        (99, False, ["a", "b", "c", BMP_HIGH, NON_BMP]),
        (None, True, [NON_BMP, BMP_HIGH, "c", "b", "a"]),
        (1, True, [NON_BMP]),
    ],
)
def test_listing_order_and_limit(limit: int | None, reverse: bool, keys: list[str]) -> None:
    listed = merged_listing(REMOTE, [], KeyRange(), limit=limit, reverse=reverse)
    assert [key for key, _ in listed] == keys
    assert all(REMOTE[key] == value for key, value in listed)


def test_layers_overlay_the_remote_bottom_first() -> None:
    bottom = layer({"a": b"bottom", "b": b"bottom", "new": b"bottom"})
    top = layer({"a": b"top", "b": None})
    listed = merged_listing(
        {"a": b"r", "b": b"r", "c": b"r"}, [bottom, top], KeyRange(), limit=None, reverse=False
    )
    assert listed == [("a", b"top"), ("c", b"r"), ("new", b"bottom")]
    # The other way round, the bottom layer's values win.
    listed = merged_listing(
        {"a": b"r", "b": b"r", "c": b"r"}, [top, bottom], KeyRange(), limit=None, reverse=False
    )
    assert listed == [("a", b"bottom"), ("b", b"bottom"), ("c", b"r"), ("new", b"bottom")]


def test_deletions_hide_remote_entries_before_the_limit_is_taken() -> None:
    deleted = layer({"a": None, "b": None})
    listed = merged_listing(REMOTE, [deleted], KeyRange(), limit=2, reverse=False)
    assert listed == [("c", b"3"), (BMP_HIGH, b"5")]


def test_a_whole_layer_discards_everything_below_it() -> None:
    bottom = layer({"x": b"bottom"})
    cleared = layer({"y": b"cleared"}, whole=True)
    top = layer({"z": b"top"})
    listed = merged_listing(REMOTE, [bottom, cleared, top], KeyRange(), limit=None, reverse=False)
    assert listed == [("y", b"cleared"), ("z", b"top")]
    # A whole bottom layer with nothing asked of the state service.
    assert merged_listing(None, [cleared], KeyRange(), limit=None, reverse=False) == [
        ("y", b"cleared")
    ]


def test_layer_keys_outside_the_bounds_are_left_out() -> None:
    known = layer({"a1": b"x", "b1": b"y", "a2": None})
    bounds = KeyRange(prefix="a")
    remote = {"a2": b"r", "a3": b"r"}  # the state service lists only the range
    assert merged_listing(remote, [known], bounds, limit=None, reverse=False) == [
        ("a1", b"x"),
        ("a3", b"r"),
    ]


def test_needs_remote_unless_a_layer_is_whole() -> None:
    assert needs_remote([])
    assert needs_remote([layer({"a": b"x"}), layer({"b": None})])
    assert not needs_remote([layer({}), layer({}, whole=True)])
    assert not needs_remote([layer({}, whole=True), layer({})])


def test_remote_limit_adds_the_keys_the_layers_know_in_range() -> None:
    layers = [layer({"a1": b"x", "a2": None, "b": b"y"}), layer({"a1": None, "a3": b"z"})]
    assert remote_limit(layers, KeyRange(), None) is None
    assert remote_limit(layers, KeyRange(prefix="a"), 0) == 4
    assert remote_limit(layers, KeyRange(prefix="a"), 5) == 9
    assert remote_limit(layers, KeyRange(), 1) == 6
    assert remote_limit(layers, KeyRange(start="c"), 3) == 3
    assert remote_limit([], KeyRange(), 7) == 7


@pytest.mark.parametrize("reverse", [False, True])
def test_remote_limit_leaves_enough_after_deletions(reverse: bool) -> None:
    remote = {"a": b"1", "b": b"2", "c": b"3", "d": b"4"}
    deleted = layer({"a": None, "d": None})  # the first entry in either order
    wire = remote_limit([deleted], KeyRange(), 1)
    assert wire == 3
    ordered = sorted(remote, reverse=reverse)[:wire]
    answer = {key: remote[key] for key in ordered}
    listed = merged_listing(answer, [deleted], KeyRange(), limit=1, reverse=reverse)
    assert listed == ([("c", b"3")] if reverse else [("b", b"2")])


# -- against a model ---------------------------------------------------------------------


@dataclass(frozen=True)
class Set:
    """The top layer writes ``key`` (None: deletes it)."""

    key: str
    value: bytes | None


@dataclass(frozen=True)
class Clear:
    """The top layer deletes every key."""


@dataclass(frozen=True)
class Push:
    """A new layer on top (a transaction starts)."""


@dataclass(frozen=True)
class Fill:
    """The cache (the bottom layer) learns what the state service holds under ``key``."""

    key: str


Step = Set | Clear | Push | Fill

VALUES = st.sampled_from([b"", b"x", b"y", b"\x00"])
BOUND_KEYS = weighted((2, st.none()), (1, KEYS))
PREFIXES = weighted((2, st.just("")), (1, st.sampled_from(("a", "\U0001f600"))), (1, KEYS))
RANGES = st.builds(KeyRange, PREFIXES, BOUND_KEYS, BOUND_KEYS)
LIMITS = weighted((1, st.none()), (3, st.integers(min_value=0, max_value=4)))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, bytes], list[Step]]:
    """What the state service holds, and steps on the layers whose keys are often those
    (so that deletions hide remote entries and writes replace them)."""
    remote = draw(st.dictionaries(KEYS, VALUES, max_size=6))
    keys = weighted((1, KEYS), (2, st.sampled_from(sorted(remote)))) if remote else KEYS
    steps = draw(
        st.lists(
            weighted(
                (5, st.builds(Set, keys, weighted((1, st.none()), (1, VALUES)))),
                (1, st.just(Clear())),
                (1, st.just(Push())),
                (2, st.builds(Fill, keys)),
            ),
            max_size=12,
        )
    )
    return remote, steps


def model_listing(
    state: dict[str, bytes], bounds: KeyRange, limit: int | None, reverse: bool
) -> list[tuple[str, bytes]]:
    """The listing by its definition: the keys in range, UTF-8 ordered, limited."""
    keys = sorted(
        (
            key
            for key in state
            if key.encode().startswith(bounds.prefix.encode())
            and (bounds.start is None or key.encode() >= bounds.start.encode())
            and (bounds.end is None or key.encode() < bounds.end.encode())
        ),
        key=str.encode,
        reverse=reverse,
    )
    return [(key, state[key]) for key in keys[:limit]]


@settings(max_examples=500, deadline=None)
@given(
    scenario=scenarios(),
    bounds=RANGES,
    limit=LIMITS,
    reverse=st.booleans(),
)
def test_merged_listing_matches_a_dict_model(
    scenario: tuple[dict[str, bytes], list[Step]],
    bounds: KeyRange,
    limit: int | None,
    reverse: bool,
) -> None:
    remote, steps = scenario
    cache = StorageCache()
    layers: list[Layer] = [cache]
    model = dict(remote)  # the object as the top layer must see it
    for step in steps:
        if isinstance(step, Set):
            layers[-1].set(step.key, step.value)
            if step.value is None:
                model.pop(step.key, None)
            else:
                model[step.key] = step.value
        elif isinstance(step, Clear):
            layers[-1].clear()
            model.clear()
        elif isinstance(step, Push):
            layers.append(Layer())
        else:
            cache.fill(step.key, remote.get(step.key))  # a read changes nothing
    # Reading one key: the first layer from the top that knows it, else the remote.
    for key in {*KEY_UNIVERSE, *remote, *model}:
        found: bytes | None = remote.get(key)
        for known in reversed(layers):
            value = known.lookup(key)
            if value is not UNKNOWN:
                assert not isinstance(value, type(UNKNOWN))
                found = value
                break
        assert found == model.get(key), key
    # Listing: what the state service would answer (if asked), then merged.
    answer: dict[str, bytes] | None = None
    if needs_remote(layers):
        wire_limit = remote_limit(layers, bounds, limit)
        answer = dict(model_listing(remote, bounds, wire_limit, reverse))
    else:
        assert any(known.whole for known in layers)
    expected = model_listing(model, bounds, limit, reverse)
    assert merged_listing(answer, layers, bounds, limit=limit, reverse=reverse) == expected
