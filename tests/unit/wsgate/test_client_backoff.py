"""The reconnect backoff of wsgate.client: exponential growth, the cap, full jitter, the
attempt limit and the reset, with a seeded random so every sequence is exact."""

from __future__ import annotations

import random

import pytest

from wsgate.client import Backoff, ReconnectPolicy


def test_the_ceiling_grows_by_the_multiplier_up_to_the_cap() -> None:
    policy = ReconnectPolicy(initial_delay=0.1, max_delay=1.0, multiplier=2.0)
    ceilings = [policy.ceiling(n) for n in range(7)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_the_cap_holds_for_attempt_numbers_that_overflow_a_float() -> None:
    policy = ReconnectPolicy(initial_delay=0.5, max_delay=30.0, multiplier=3.0)
    assert policy.ceiling(10_000) == 30.0
    assert policy.delay(10_000, 0.5) == 15.0


def test_a_multiplier_of_one_is_a_constant_ceiling() -> None:
    policy = ReconnectPolicy(initial_delay=0.25, max_delay=10.0, multiplier=1.0)
    assert {policy.ceiling(n) for n in range(50)} == {0.25}


def test_full_jitter_is_the_draw_times_the_ceiling() -> None:
    policy = ReconnectPolicy(initial_delay=1.0, max_delay=8.0, multiplier=2.0)
    assert policy.delay(0, 0.0) == 0.0
    assert policy.delay(2, 0.5) == 2.0
    assert policy.delay(5, 0.25) == 2.0  # capped at 8 first
    assert policy.delay(3, 0.999) < 8.0
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="draw"):
            policy.delay(0, bad)


def test_the_sequence_is_the_seeded_draws_scaled_by_the_growing_ceiling() -> None:
    policy = ReconnectPolicy(initial_delay=0.1, max_delay=2.0, multiplier=2.0)
    backoff = Backoff(policy, random.Random(1234).random)
    delays = [backoff.next_delay() for _ in range(8)]
    draws = random.Random(1234)
    expected = [draws.random() * c for c in (0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0)]
    assert delays == pytest.approx(expected)
    assert backoff.attempts == 8


def test_every_delay_is_within_zero_and_its_ceiling() -> None:
    policy = ReconnectPolicy(initial_delay=0.05, max_delay=3.0, multiplier=1.7)
    backoff = Backoff(policy, random.Random(7).random)
    for attempt in range(2000):
        delay = backoff.next_delay()
        assert delay is not None
        assert 0.0 <= delay < policy.ceiling(attempt) + 1e-12


def test_jitter_spreads_the_delays_over_the_whole_range() -> None:
    """Full jitter, not "equal" jitter: capped delays cover [0, cap), low and high alike,
    so clients dropped together do not come back together."""
    policy = ReconnectPolicy(initial_delay=1.0, max_delay=1.0)
    backoff = Backoff(policy, random.Random(99).random)
    delays = [backoff.next_delay() for _ in range(1000)]
    assert all(d is not None for d in delays)
    values = [d for d in delays if d is not None]
    assert min(values) < 0.01
    assert max(values) > 0.99
    assert 0.45 < sum(values) / len(values) < 0.55
    assert sum(1 for d in values if d < 0.5) == pytest.approx(500, abs=60)


def test_with_a_fixed_draw_the_delays_double_until_the_cap() -> None:
    """With the draw pinned at 0.5 each delay is half its ceiling: the bare curve."""
    policy = ReconnectPolicy(initial_delay=0.5, max_delay=10.0, multiplier=2.0)
    backoff = Backoff(policy, lambda: 0.5)
    delays = [backoff.next_delay() for _ in range(7)]
    assert delays == pytest.approx([0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0])


def test_max_attempts_ends_the_sequence_and_a_reset_starts_it_again() -> None:
    policy = ReconnectPolicy(initial_delay=1.0, max_delay=60.0, max_attempts=3)
    backoff = Backoff(policy, lambda: 0.5)
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, None, None]
    assert backoff.attempts == 3
    backoff.reset()  # a connection lasted: the next outage starts from the beginning
    assert [backoff.next_delay() for _ in range(4)] == [0.5, 1.0, 2.0, None]


def test_a_reset_after_success_restarts_from_the_initial_delay() -> None:
    policy = ReconnectPolicy(initial_delay=0.2, max_delay=5.0)
    seeded = random.Random(5)
    backoff = Backoff(policy, seeded.random)
    for _ in range(6):
        backoff.next_delay()
    assert policy.ceiling(backoff.attempts) == 5.0  # grown to the cap
    backoff.reset()
    after = [backoff.next_delay() for _ in range(3)]
    replay = random.Random(5)
    for _ in range(6):
        replay.random()
    assert after == pytest.approx([replay.random() * c for c in (0.2, 0.4, 0.8)])


def test_unlimited_attempts_never_give_up() -> None:
    backoff = Backoff(ReconnectPolicy(max_attempts=None), random.Random(0).random)
    assert all(backoff.next_delay() is not None for _ in range(10_000))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"initial_delay": 0.0}, "initial_delay"),
        ({"initial_delay": -1.0}, "initial_delay"),
        ({"initial_delay": 5.0, "max_delay": 1.0}, "initial_delay"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"reset_after": -1.0}, "reset_after"),
        ({"send_timeout": -0.1}, "send_timeout"),
    ],
)
def test_a_policy_that_makes_no_sense_is_refused(settings: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReconnectPolicy(**settings)  # type: ignore[arg-type]


def test_a_negative_attempt_is_refused() -> None:
    with pytest.raises(ValueError, match="attempt"):
        ReconnectPolicy().ceiling(-1)
