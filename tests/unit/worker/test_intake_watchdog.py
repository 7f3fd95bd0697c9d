"""IntakeWatchdog: why a worker takes no more requests (queued ones not taken for too
long, or a subscription whose delivery task ended), on a clock the test moves, with fake
subscriptions."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from wsgate.worker.intake import IntakeWatchdog

STALL_S = 5.0
START = 100.0


@dataclass
class FakeTask:
    """What the watchdog reads of a subscription's delivery task."""

    finished: bool = False

    def done(self) -> bool:
        return self.finished


@dataclass
class FakeSub:
    """A subscription without a delivery task (nats-py's before it starts one)."""

    subject: str
    pending_msgs: int = 0


@dataclass
class FakeSubWithTask:
    subject: str
    pending_msgs: int = 0
    _wait_for_msgs_task: FakeTask | None = None


def test_no_reason_while_nothing_waits() -> None:
    watchdog = IntakeWatchdog(STALL_S, START)
    subs = [FakeSub("wsgate.connect"), FakeSubWithTask("wsgate.events", 0, FakeTask())]
    assert watchdog.check(subs, START) is None
    assert watchdog.check(subs, START + 1000 * STALL_S) is None  # idle, not stuck
    assert watchdog.check([], START + 1000 * STALL_S) is None


def test_queued_requests_not_taken_for_stall_s_are_a_reason() -> None:
    watchdog = IntakeWatchdog(STALL_S, START)
    subs = [FakeSub("a", pending_msgs=2), FakeSub("b", pending_msgs=1)]
    assert watchdog.check(subs, START) is None
    assert watchdog.check(subs, START + STALL_S - 0.001) is None  # just before
    reason = watchdog.check(subs, START + STALL_S)  # at it exactly
    assert reason is not None
    assert "3 request(s) waiting" in reason
    assert f"{STALL_S:.1f} s" in reason


def test_taken_resets_the_clock() -> None:
    watchdog = IntakeWatchdog(STALL_S, START)
    subs = [FakeSub("a", pending_msgs=1)]
    assert watchdog.check(subs, START + STALL_S) is not None
    watchdog.taken(START + STALL_S)
    assert watchdog.check(subs, START + STALL_S) is None
    assert watchdog.check(subs, START + 2 * STALL_S - 0.001) is None
    reason = watchdog.check(subs, START + 2 * STALL_S + 1)
    assert reason is not None
    assert f"{STALL_S + 1:.1f} s" in reason


def test_requests_waiting_for_a_slot_count_as_queued() -> None:
    watchdog = IntakeWatchdog(STALL_S, START)
    subs = [FakeSub("a")]
    later = START + STALL_S
    watchdog.waiting(+1)
    reason = watchdog.check(subs, later)
    assert reason is not None
    assert "1 request(s) waiting" in reason
    watchdog.waiting(+1)
    subs[0].pending_msgs = 3
    reason = watchdog.check(subs, later)
    assert reason is not None
    assert "5 request(s) waiting" in reason
    watchdog.waiting(-1)
    watchdog.waiting(-1)
    subs[0].pending_msgs = 0
    assert watchdog.check(subs, later) is None


def test_a_waiter_alone_is_a_reason_even_without_subscriptions() -> None:
    watchdog = IntakeWatchdog(STALL_S, START)
    watchdog.waiting(+1)
    assert watchdog.check([], START + STALL_S) is not None


def test_a_subscription_whose_task_ended_is_reported_by_subject() -> None:
    watchdog = IntakeWatchdog(STALL_S, START)
    subs = [
        FakeSubWithTask("wsgate.connect", 0, FakeTask(finished=False)),
        FakeSubWithTask("wsgate.worker.w1.events", 0, FakeTask(finished=True)),
    ]
    # At once: a stopped delivery task needs no stall time and no queued request.
    reason = watchdog.check(subs, START)
    assert reason is not None
    assert "wsgate.worker.w1.events" in reason
    assert "wsgate.connect" not in reason
    assert "stopped delivering" in reason


def test_the_first_stopped_subscription_is_named_before_a_stall() -> None:
    watchdog = IntakeWatchdog(STALL_S, START)
    subs = [
        FakeSub("stuck", pending_msgs=4),
        FakeSubWithTask("first", 0, FakeTask(finished=True)),
        FakeSubWithTask("second", 0, FakeTask(finished=True)),
    ]
    reason = watchdog.check(subs, START + STALL_S)
    assert reason is not None
    assert "first" in reason
    assert "second" not in reason


def test_a_running_or_missing_task_is_not_a_reason() -> None:
    watchdog = IntakeWatchdog(STALL_S, START)
    subs = [
        FakeSubWithTask("running", 0, FakeTask(finished=False)),
        FakeSubWithTask("not-started", 0, None),
        FakeSub("plain"),
    ]
    assert watchdog.check(subs, START + 1000 * STALL_S) is None


@pytest.mark.parametrize("stall_s", [0.0, -1.0, float("nan")])
def test_stall_s_must_be_positive(stall_s: float) -> None:
    with pytest.raises(ValueError, match="stall_s"):
        IntakeWatchdog(stall_s, START)
