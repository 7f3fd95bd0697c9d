"""Failpoints: parsing ``name=argument,...`` and the kill-after-commit trigger, with the
kill itself replaced by a recorder (the test process must live on)."""

from __future__ import annotations

import os
import signal

import pytest

from wsgate.errors import ConfigError
from wsgate.v1 import envelope_pb2 as envelope
from wsgate.worker import failpoints
from wsgate.worker.failpoints import KILL_AFTER_COMMIT, Failpoints


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The os.kill calls the failpoint makes, recorded instead of made."""
    calls: list[tuple[int, int]] = []

    def record(pid: int, sig: int) -> None:
        calls.append((pid, sig))

    monkeypatch.setattr(failpoints.os, "kill", record)
    return calls


def text_event(
    text: str, *, redelivered: bool = False, sequence: int = 1
) -> envelope.ConnectionEvent:
    return envelope.ConnectionEvent(
        connection_id="gw-abcdefgh.c1",
        sequence=sequence,
        redelivered=redelivered,
        message=envelope.Message(text=text),
    )


# -- parse -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["", " ", ",", " , ,"])
def test_an_empty_spec_arms_nothing(spec: str) -> None:
    assert Failpoints.parse(spec) == Failpoints()
    assert Failpoints.parse(spec).kill_after_commit is None


@pytest.mark.parametrize(
    ("spec", "argument"),
    [
        ("kill-after-commit=boom", "boom"),
        ("  kill-after-commit=boom  ", "boom"),
        ("kill-after-commit=a=b", "a=b"),  # only the first '=' separates
        ("kill-after-commit=hello world", "hello world"),
    ],
)
def test_one_failpoint(spec: str, argument: str) -> None:
    assert Failpoints.parse(spec).kill_after_commit == argument


@pytest.mark.parametrize("spec", ["kill-after-commit", "kill-after-commit="])
def test_a_failpoint_without_its_argument_is_a_config_error(spec: str) -> None:
    # Armed with "", it would fire on every empty text message.
    with pytest.raises(ConfigError, match="needs an argument"):
        Failpoints.parse(spec)


@pytest.mark.parametrize(
    ("spec", "argument"),
    [
        ("kill-after-commit=first,kill-after-commit=second", "second"),
        ("kill-after-commit=one, ,kill-after-commit=two,", "two"),
        (" kill-after-commit=x , kill-after-commit=y ", "y"),
    ],
)
def test_several_failpoints_the_last_of_a_name_wins(spec: str, argument: str) -> None:
    assert Failpoints.parse(spec).kill_after_commit == argument


@pytest.mark.parametrize(
    "spec",
    [
        "nope=1",
        "kill-after-commit=a,nope",
        "KILL-AFTER-COMMIT=a",  # names are case-sensitive
        "kill_after_commit=a",
        "=a",
    ],
)
def test_an_unknown_name_is_a_config_error_naming_the_known_ones(spec: str) -> None:
    with pytest.raises(ConfigError, match=f"known: {KILL_AFTER_COMMIT}") as info:
        Failpoints.parse(spec)
    assert "unknown failpoint" in str(info.value)


def test_the_error_names_the_unknown_failpoint() -> None:
    with pytest.raises(ConfigError, match="'frobnicate'"):
        Failpoints.parse("kill-after-commit=x,frobnicate=3")


# -- after_commit ------------------------------------------------------------------------


def test_a_first_delivery_of_the_text_kills_the_process(kills: list[tuple[int, int]]) -> None:
    Failpoints(kill_after_commit="boom").after_commit([text_event("boom")])
    assert kills == [(os.getpid(), signal.SIGKILL)]


def test_a_match_anywhere_among_the_events_kills(kills: list[tuple[int, int]]) -> None:
    armed = Failpoints(kill_after_commit="boom")
    armed.after_commit([None, text_event("other"), text_event("boom", sequence=2)])
    assert kills == [(os.getpid(), signal.SIGKILL)]


def test_nothing_armed_does_nothing(kills: list[tuple[int, int]]) -> None:
    Failpoints().after_commit([text_event("boom"), text_event("")])
    Failpoints.parse("").after_commit([text_event("boom")])
    assert kills == []


@pytest.mark.parametrize(
    "event",
    [
        None,
        text_event("boom", redelivered=True),
        text_event("Boom"),
        text_event("boom "),
        text_event("boo"),
        text_event(""),
        envelope.ConnectionEvent(
            connection_id="gw-abcdefgh.c1", sequence=1, message=envelope.Message(binary=b"boom")
        ),
        envelope.ConnectionEvent(
            connection_id="gw-abcdefgh.c1", sequence=1, closed=envelope.Closed(reason="boom")
        ),
        envelope.ConnectionEvent(connection_id="gw-abcdefgh.c1", sequence=1),  # no kind
    ],
    ids=[
        "no-event",
        "redelivered",
        "other-case",
        "trailing-space",
        "shorter",
        "empty",
        "binary",
        "closed",
        "no-kind",
    ],
)
def test_anything_else_does_not_kill(
    kills: list[tuple[int, int]], event: envelope.ConnectionEvent | None
) -> None:
    Failpoints(kill_after_commit="boom").after_commit([event])
    assert kills == []


def test_no_events_do_not_kill(kills: list[tuple[int, int]]) -> None:
    Failpoints(kill_after_commit="boom").after_commit([])
    Failpoints(kill_after_commit="boom").after_commit(iter(()))
    assert kills == []


def test_a_parsed_failpoint_triggers(kills: list[tuple[int, int]]) -> None:
    armed = Failpoints.parse("kill-after-commit=crash here")
    armed.after_commit([text_event("crash")])
    assert kills == []
    armed.after_commit([text_event("crash here")])
    assert kills == [(os.getpid(), signal.SIGKILL)]
