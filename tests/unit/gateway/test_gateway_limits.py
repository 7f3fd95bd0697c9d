"""The gateway's abuse bounds without sockets: the message rate's token bucket (time
passed in), the outbound budget's shedding policy, and their settings."""

from __future__ import annotations

import math

import pytest

from wsgate.cli import build_parser
from wsgate.config import GatewayConfig
from wsgate.errors import ConfigError
from wsgate.gateway.budget import OutboundBudget, choose_victims
from wsgate.gateway.rate import TokenBucket

# -- the token bucket --------------------------------------------------------------------

RATE, BURST = 4.0, 3  # a token every 0.25 s: exact in binary floating point


def _takes(bucket: TokenBucket, now: float, count: int) -> list[bool]:
    return [bucket.take(now) for _ in range(count)]


def test_a_full_bucket_lets_burst_messages_through_at_once_and_refuses_the_next() -> None:
    bucket = TokenBucket(RATE, BURST, now=100.0)
    assert _takes(bucket, 100.0, BURST) == [True] * BURST
    assert bucket.take(100.0) is False


def test_the_bucket_refills_at_the_rate() -> None:
    bucket = TokenBucket(RATE, BURST, now=0.0)
    assert _takes(bucket, 0.0, BURST + 1) == [True] * BURST + [False]
    assert bucket.take(0.2) is False  # 0.8 of a token
    assert bucket.take(0.25) is True  # one token after 1/rate seconds
    assert bucket.take(0.25) is False
    assert _takes(bucket, 0.75, 3) == [True, True, False]  # two more after 2/rate


def test_a_refused_message_takes_nothing() -> None:
    bucket = TokenBucket(RATE, BURST, now=0.0)
    _takes(bucket, 0.0, BURST)
    assert _takes(bucket, 0.125, 5) == [False] * 5  # half a token, refused five times
    assert bucket.take(0.25) is True  # the half token was kept


def test_an_idle_bucket_holds_no_more_than_burst() -> None:
    bucket = TokenBucket(RATE, BURST, now=0.0)
    _takes(bucket, 0.0, BURST)
    assert _takes(bucket, 3600.0, BURST + 1) == [True] * BURST + [False]


def test_a_steady_client_at_the_rate_is_never_refused() -> None:
    bucket = TokenBucket(RATE, 1, now=0.0)
    assert all(bucket.take(i / RATE) for i in range(1000))
    assert bucket.take(999 / RATE) is False  # one more in the same instant is over


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0), (math.nan, 1)])
def test_a_bucket_needs_a_positive_rate_and_room_for_a_message(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(rate, burst, now=0.0)


# -- the outbound budget -----------------------------------------------------------------


def test_the_budget_is_over_just_past_its_limit_or_while_a_shed_connection_closes() -> None:
    budget = OutboundBudget(1000)
    budget.total = 1000
    assert (budget.over, budget.excess) == (False, 0)
    budget.total = 1001
    assert (budget.over, budget.excess) == (True, 1)
    budget.total = 10
    budget.shed_started()
    assert budget.over
    budget.shed_finished()
    assert not budget.over
    with pytest.raises(ValueError, match="limit_bytes"):
        OutboundBudget(0)


def test_the_largest_queues_are_shed_first_and_no_more_than_needed() -> None:
    queued = [("a", 100), ("b", 700), ("c", 0), ("d", 300), ("e", 500)]
    assert choose_victims(queued, 1) == ["b"]
    assert choose_victims(queued, 700) == ["b"]  # freeing exactly the excess is enough
    assert choose_victims(queued, 701) == ["b", "e"]  # one byte more takes the next
    assert choose_victims(queued, 1200) == ["b", "e"]
    assert choose_victims(queued, 1201) == ["b", "e", "d"]


def test_no_excess_sheds_nobody() -> None:
    queued = [("a", 100), ("b", 700)]
    assert choose_victims(queued, 0) == []
    assert choose_victims(queued, -5) == []


def test_equal_queues_are_shed_in_the_order_given() -> None:
    queued = [("old", 400), ("small", 10), ("mid", 400), ("new", 400)]
    assert choose_victims(queued, 401) == ["old", "mid"]
    assert choose_victims(reversed(queued), 401) == ["new", "mid"]


def test_connections_with_nothing_queued_are_never_shed() -> None:
    queued = [("idle", 0), ("a", 5), ("idle2", 0)]
    assert choose_victims(queued, 1000) == ["a"]  # all it can free, though not enough
    assert choose_victims([("idle", 0)], 1) == []


# -- the settings ------------------------------------------------------------------------


def test_defaults_and_flags() -> None:
    config = GatewayConfig()
    assert (config.message_rate, config.message_burst) == (1000.0, 1000)
    assert config.outbound_budget_bytes == 256 * 1024 * 1024
    args = build_parser(
        {"WSGATE_MESSAGE_RATE": "0.5", "WSGATE_OUTBOUND_BUDGET_BYTES": "9"}
    ).parse_args(["gateway", "--message-burst", "7"])
    assert (args.message_rate, args.message_burst, args.outbound_budget_bytes) == (0.5, 7, 9)


def test_settings_at_their_limits_are_accepted() -> None:
    GatewayConfig(message_rate=0)  # off
    GatewayConfig(message_burst=1)
    GatewayConfig(max_outbound_bytes=1000, outbound_budget_bytes=1000)


@pytest.mark.parametrize(
    ("kwargs", "variable"),
    [
        ({"message_rate": -0.001}, "WSGATE_MESSAGE_RATE"),
        ({"message_rate": math.inf}, "WSGATE_MESSAGE_RATE"),
        ({"message_rate": math.nan}, "WSGATE_MESSAGE_RATE"),
        ({"message_burst": 0}, "WSGATE_MESSAGE_BURST"),
        (
            {"max_outbound_bytes": 1000, "outbound_budget_bytes": 999},
            "WSGATE_OUTBOUND_BUDGET_BYTES",
        ),
    ],
)
def test_settings_just_past_their_limits_are_refused_by_name(
    kwargs: dict[str, object], variable: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        GatewayConfig(**kwargs)  # type: ignore[arg-type]
