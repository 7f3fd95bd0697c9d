"""Gateway and connection ids: single NATS tokens that name their gateway."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate import ids
from wsgate.errors import ConfigError, InvalidConnectionId

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def test_connection_ids_are_unique_tokens_naming_their_gateway() -> None:
    gateway_id = ids.new_gateway_id("node-1")
    factory = ids.ConnectionIds(gateway_id)
    made = [factory.next() for _ in range(5000)]
    assert len(set(made)) == len(made)
    for connection_id in made[:50] + made[-50:]:
        assert _TOKEN.fullmatch(connection_id)
        assert ids.gateway_of(connection_id) == gateway_id


def test_a_restarted_gateway_gets_a_new_id() -> None:
    assert ids.new_gateway_id("pod-a") != ids.new_gateway_id("pod-a")


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [("Web-1.example.com", "web-1-example-com"), ("---", "gateway"), ("ÜBER host", "ber-host")],
)
def test_node_names_from_host_names_are_usable(hostname: str, expected: str) -> None:
    name = ids.node_name_from_host(hostname)
    assert name == expected
    ids.new_gateway_id(name)


def test_node_name_at_and_over_its_length_limit() -> None:
    ids.new_gateway_id("a" * 40)
    with pytest.raises(ConfigError):
        ids.new_gateway_id("a" * 41)


@pytest.mark.parametrize("bad", ["", "-a", "a-", "A", "a_b", "a.b", "a b"])
def test_unusable_node_names_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        ids.new_gateway_id(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x",
        "node_1",
        "node-abcdefgh",
        "node-abcdefgh_",
        "a.b_1",
        "*_1",
        "node-abcdefgh_1\n",
        "node-abcdefgh\n_1",
        "node-abcdefgh_1_2",
        "node-abcdefgh_A",
    ],
)
def test_malformed_connection_ids_raise(bad: str) -> None:
    with pytest.raises(InvalidConnectionId):
        ids.gateway_of(bad)


def test_looking_up_a_connections_gateway_keeps_nothing_per_connection() -> None:
    # Every role runs it for every event and command of every connection: a cache keyed
    # by connection id grew with every connection ever seen (the churn soak found it).
    gateway_id = ids.new_gateway_id("node")
    connections = ids.ConnectionIds(gateway_id)
    before = ids._cached_valid_gateway_id.cache_info().currsize
    for _ in range(20_000):
        assert ids.gateway_of(connections.next()) == gateway_id
    assert ids._cached_valid_gateway_id.cache_info().currsize <= before + 1
    assert not hasattr(ids.gateway_of, "cache_info")


#: Trailing junk that "$" (instead of fullmatch) let through, and more of its kind.
TRAILING_JUNK = ["\n", "\r\n", " ", "\x00", "\t", "X", "."]


@pytest.mark.parametrize("junk", TRAILING_JUNK, ids=repr)
def test_ids_with_trailing_junk_are_refused(junk: str) -> None:
    gateway_id = ids.new_gateway_id("node")
    assert ids.is_gateway_id(gateway_id)
    assert ids.is_worker_id(gateway_id)
    assert not ids.is_gateway_id(gateway_id + junk)
    assert not ids.is_worker_id(gateway_id + junk)
    with pytest.raises(InvalidConnectionId):
        ids.gateway_of(f"{gateway_id}_1{junk}")
    with pytest.raises(ConfigError):
        ids.new_gateway_id("node" + junk)


def test_connection_ids_at_and_over_their_length_limit() -> None:
    longest = f"{'a' * 40}-abcdefgh_{'z' * 13}"
    assert len(longest) == ids.MAX_CONNECTION_ID_CHARS
    assert ids.gateway_of(longest) == f"{'a' * 40}-abcdefgh"
    with pytest.raises(InvalidConnectionId):
        ids.gateway_of(f"{'a' * 40}-abcdefgh_{'z' * 14}")


def test_overlong_ids_never_reach_the_cache() -> None:
    # Hostile input must not make the cache of gateway ids hold megabytes.
    before = ids._cached_valid_gateway_id.cache_info()
    huge = "a" * 1_000_000
    assert not ids.is_gateway_id(huge)
    assert not ids.is_worker_id(huge + "-abcdefgh")
    with pytest.raises(InvalidConnectionId):
        ids.gateway_of(huge + "-abcdefgh_1")
    after = ids._cached_valid_gateway_id.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)


@given(st.text(max_size=12) | st.text("0123456789abcdefghijklmnopqrstuvwxyzA_-\n", max_size=12))
def test_a_serial_is_what_its_pattern_says(serial: str) -> None:
    gateway = "edge-abcd1234"
    try:
        ids.gateway_of(f"{gateway}_{serial}")
    except InvalidConnectionId:
        taken = False
    else:
        taken = True
    assert taken == (re.fullmatch(r"[0-9a-z]+", serial) is not None)
