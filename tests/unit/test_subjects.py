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


def _assert_safe(token: str) -> None:
    assert _TOKEN.fullmatch(token), token
    assert len(token) <= subjects.MAX_TOKEN_CHARS


@pytest.mark.parametrize("name", AWKWARD)
def test_awkward_names_encode_to_one_safe_token(name: str) -> None:
    token = subjects.encode_token(name)
    _assert_safe(token)
    subject = subjects.connect_subject("wsgate", name)
    assert subject.split(".") == ["wsgate", "connect", token]


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
