"""Encoding user strings into subject tokens: never fails, never changes routing."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate import subjects
from wsgate.errors import ConfigError, InvalidToken

_TOKEN = re.compile(r"[A-Za-z0-9_~-]+")
AWKWARD = ["", ".", "*", ">", " ", "a.b", "a.*", "a.>", "a b", "\t", "\n", "_", "_2E", "~",
           "é", "日本語", "😀", "\x00", "\ud800", "a" * 500, ". * >"]  # fmt: skip


GATEWAY = "edge-1-abcd1234"
WORKER = "box-7-zyxw9876"


def _assert_safe(token: str) -> None:
    assert _TOKEN.fullmatch(token), token
    assert len(token) <= subjects.MAX_TOKEN_CHARS


@pytest.mark.parametrize("name", AWKWARD)
def test_awkward_names_encode_to_one_safe_token(name: str) -> None:
    token = subjects.encode_token(name)
    _assert_safe(token)
    subject = subjects.connect_subject("wsgate", name, GATEWAY)
    assert subject.split(".") == ["wsgate", "connect", token, "edge-1", GATEWAY]


@given(st.text())
def test_any_string_encodes_to_one_safe_token(name: str) -> None:
    _assert_safe(subjects.encode_token(name))


@given(st.text(max_size=16))  # at most 16 * 4 * 3 = 192 characters: never shortened
def test_short_tokens_decode_to_what_was_encoded(name: str) -> None:
    assert subjects.decode_token(subjects.encode_token(name)) == name


@given(st.text(), st.text())
def test_different_strings_never_share_a_token(a: str, b: str) -> None:
    if a != b:
        assert subjects.encode_token(a) != subjects.encode_token(b)


def test_awkward_names_all_differ() -> None:
    tokens = [subjects.encode_token(n) for n in AWKWARD]
    assert len(set(tokens)) == len(AWKWARD)


def test_plain_names_stay_readable() -> None:
    assert subjects.encode_token("room-42") == "room-42"
    assert subjects.encode_token("a.b") == "a_2Eb"


def test_long_names_differing_only_at_the_end_get_different_tokens() -> None:
    a, b = "x" * 1000 + "a", "x" * 1000 + "b"
    assert subjects.encode_token(a) != subjects.encode_token(b)
    with pytest.raises(InvalidToken):
        subjects.decode_token(subjects.encode_token(a))


def test_length_at_and_just_over_the_shortening_threshold() -> None:
    at = "a" * subjects.MAX_TOKEN_CHARS
    over = "a" * (subjects.MAX_TOKEN_CHARS + 1)
    assert subjects.encode_token(at) == at
    assert "~" in subjects.encode_token(over)


@pytest.mark.parametrize(
    "bad", ["a.b", "__", "_2e", "_41", "_ZZ", "é", "a b", "*", "room\n", "_2E\n", "a "]
)
def test_decoding_something_encode_never_makes_raises(bad: str) -> None:
    with pytest.raises(InvalidToken):
        subjects.decode_token(bad)


@pytest.mark.parametrize("prefix", ["wsgate", "acme.wsgate", "a-b_c"])
def test_good_prefixes(prefix: str) -> None:
    assert subjects.validate_prefix(prefix) == prefix


@pytest.mark.parametrize(
    "prefix", ["", "a..b", ".a", "a.", "a.*", "a.>", "a b", "ü", "wsgate\n", "a.b\n", "a\r\n", "a "]
)
def test_bad_prefixes_are_config_errors(prefix: str) -> None:
    with pytest.raises(ConfigError):
        subjects.validate_prefix(prefix)


# -- identities in subjects -----------------------------------------------------------------


def test_a_gateways_own_subjects_carry_its_node_as_a_token_of_its_own() -> None:
    """NATS permissions wildcard whole tokens: the node must stand alone, before the id."""
    for subject in (
        subjects.gateway_subject("wsgate", GATEWAY),
        subjects.presence_subject("wsgate", GATEWAY),
        subjects.ack_prefix("wsgate", GATEWAY),
        subjects.events_subject("wsgate", "main", GATEWAY),
        subjects.worker_subject("wsgate", WORKER, "events", GATEWAY),
    ):
        assert subject.split(".")[-2:] == ["edge-1", GATEWAY], subject
    assert subjects.worker_subject("wsgate", WORKER, "alarm").split(".") == [
        "wsgate", "worker", "box-7", WORKER, "alarm"
    ]  # fmt: skip
    assert subjects.ack_subject("wsgate", GATEWAY, f"{GATEWAY}_1z", 7) == (
        f"wsgate.ack.edge-1.{GATEWAY}.{GATEWAY}_1z.7"
    )


def test_patterns_put_wildcards_only_where_asked() -> None:
    mine = subjects.any_id_of("edge-1")
    assert subjects.gateway_subject("wsgate", mine) == "wsgate.gw.edge-1.*"
    assert subjects.gateway_subject("wsgate", subjects.ANY) == "wsgate.gw.*.*"
    assert subjects.events_subject("wsgate", subjects.ANY, mine) == "wsgate.events.*.edge-1.*"
    assert (
        subjects.ack_subject("a.b", subjects.ANY, subjects.ANY, subjects.ANY) == "a.b.ack.*.*.*.*"
    )
    assert subjects.alarm_subject("wsgate", subjects.ANY) == "wsgate.alarm.*"
    assert subjects.under(subjects.inbox_prefix("wsgate", "gateway", "edge-1")) == (
        "wsgate.inbox.gateway.edge-1.>"
    )
    # A user string that looks like a wildcard is only ever a name.
    assert subjects.events_subject("wsgate", "*", GATEWAY).split(".")[2] == "_2A"
    assert subjects.alarm_subject("wsgate", ">") == "wsgate.alarm._3E"


@pytest.mark.parametrize("node", ["", "Edge", "a.b", "*", "-a", "a" * 41])
def test_a_pattern_of_an_unusable_node_is_a_config_error(node: str) -> None:
    with pytest.raises(ConfigError, match="WSGATE_NODE_NAME"):
        subjects.any_id_of(node)


def test_sent_by_tells_the_sender_of_a_gateways_subject() -> None:
    other = "edge-1-zzzz0000"
    namesake = "dge-1-abcd1234"  # a suffix of GATEWAY's id: must not pass for it
    for subject in (
        subjects.connect_subject("wsgate", "main", GATEWAY),
        subjects.events_subject("wsgate", "main", GATEWAY),
        subjects.presence_subject("wsgate", GATEWAY),
        subjects.worker_subject("wsgate", WORKER, "connect", GATEWAY),
    ):
        assert subjects.sent_by(subject, GATEWAY)
        assert not subjects.sent_by(subject, other)
        assert not subjects.sent_by(subject, namesake)


def test_an_events_origin_is_sent_by_and_ack_subject_made_once() -> None:
    end, start = subjects.event_origin("wsgate", GATEWAY)
    subject = subjects.events_subject("wsgate", "main", GATEWAY)
    assert subject.endswith(end) == subjects.sent_by(subject, GATEWAY) is True
    assert not subjects.events_subject("wsgate", "main", "dge-1-abcd1234").endswith(end)
    connection_id = f"{GATEWAY}_1z"
    assert f"{start}{connection_id}.7" == subjects.ack_subject("wsgate", GATEWAY, connection_id, 7)
    assert subjects.event_origin("wsgate", GATEWAY) is subjects.event_origin("wsgate", GATEWAY)


def test_a_worker_subject_names_a_gateway_exactly_when_not_an_alarm() -> None:
    with pytest.raises(ValueError, match="gateway id"):
        subjects.worker_subject("wsgate", WORKER, "events")
    with pytest.raises(ValueError, match="gateway id"):
        subjects.worker_subject("wsgate", WORKER, "alarm", GATEWAY)
    with pytest.raises(ValueError, match="no worker subject"):
        subjects.worker_subject("wsgate", WORKER, "other", GATEWAY)
    with pytest.raises(ValueError, match="no inbox"):
        subjects.inbox_prefix("wsgate", "intruder", "edge-1")
