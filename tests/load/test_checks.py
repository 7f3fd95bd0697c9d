"""The load tests' own checks, without containers: a checker that cannot fail would make
every scenario pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.load.report import plot_timeline, summary
from tests.load.scenarios import SCENARIOS, Result, check, cpu_share, recovery_s
from tests.load.traffic import Shape, Tally, Timeline, Verdict


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def timeline_with(answers: list[tuple[float, float]], faults: list[float]) -> Timeline:
    clock = Clock()
    timeline = Timeline(clock)
    timeline.answers = answers
    timeline.faults = [(at, f"fault at {at}") for at in faults]
    return timeline


def test_no_fault_no_recovery() -> None:
    assert recovery_s(timeline_with([(1.0, 0.01)], []), 10.0) == (0.0, 0.0)


def test_recovery_ends_with_the_last_slow_answer_sent_after_the_fault() -> None:
    steady = [(t / 10, 0.02) for t in range(50)]  # p99 20 ms: the threshold is the floor
    slow = [(6.0, 4.0), (7.0, 2.5), (9.0, 0.1)]  # answered at 10.0, 9.5 and 9.1
    recovery, threshold = recovery_s(timeline_with(steady + slow, [5.0]), 30.0)
    assert threshold == pytest.approx(0.5)
    assert recovery == pytest.approx(5.0)  # 10.0 - 5.0


def test_a_slow_answer_is_charged_to_the_fault_it_was_sent_after() -> None:
    # Sent before the restart at 20 s, answered after it: the kill at 5 s caused it.
    answers = [(1.0, 0.01), (15.0, 6.0), (21.0, 0.6)]
    recovery, _ = recovery_s(timeline_with(answers, [5.0, 20.0]), 30.0)
    assert recovery == pytest.approx(16.0)  # 21.0 - 5.0, not 1.6 after the restart


def test_errors_count_as_not_recovered() -> None:
    timeline = timeline_with([(1.0, 0.01)], [5.0])
    timeline.error_times = [12.5]
    assert recovery_s(timeline, 30.0)[0] == pytest.approx(7.5)


def result_with(tally: Tally, scenario: str = "steady", faults: int = 0) -> Result:
    timeline = timeline_with([(1.0, 0.01)], [float(5 + i) for i in range(faults)])
    verdict = Verdict(echo=tally, chat=Tally(), counters=Tally(), timeline=timeline)
    return Result(SCENARIOS[scenario], 10.0, Shape(), verdict)


@pytest.mark.parametrize(
    "field", ["lost", "duplicates", "reordered", "dropped_sockets", "send_failures"]
)
def test_any_loss_duplicate_reorder_or_drop_fails_the_scenario(field: str) -> None:
    tally = Tally(answered=10)
    setattr(tally, field, 1)
    result = result_with(tally)
    check(result, gateway_clients=0)
    assert not result.ok
    assert any(field.split("_")[0] in failure for failure in result.failures)


def test_a_clean_run_holds() -> None:
    result = result_with(Tally(answered=10, in_doubt=0))
    check(result, gateway_clients=0)
    assert result.ok, result.failures


def test_a_gateway_stop_must_drop_exactly_its_clients_with_1001() -> None:
    moved = Tally(answered=10, dropped_sockets=3, drop_codes=[1001, 1001, 1001])
    result = result_with(moved, "gateway-stop", faults=2)
    check(result, gateway_clients=3)
    assert result.ok, result.failures

    wrong_code = Tally(answered=10, dropped_sockets=3, drop_codes=[1001, 1006, 1001])
    result = result_with(wrong_code, "gateway-stop", faults=2)
    check(result, gateway_clients=3)
    assert any("1006" in failure for failure in result.failures)

    too_many = Tally(answered=10, dropped_sockets=4, drop_codes=[1001] * 4)
    result = result_with(too_many, "gateway-stop", faults=2)
    check(result, gateway_clients=3)
    assert not result.ok


def test_recovery_over_the_bound_fails() -> None:
    timeline = timeline_with([(1.0, 0.01), (6.0, 30.0)], [5.0])
    verdict = Verdict(echo=Tally(answered=2), chat=Tally(), counters=Tally(), timeline=timeline)
    result = Result(SCENARIOS["worker-kill"], 60.0, Shape(), verdict)
    check(result, gateway_clients=0)
    assert any("recovered in" in failure for failure in result.failures)


def test_cpu_share_counts_a_restarted_process_from_its_restart() -> None:
    shares = cpu_share({"a": 10.0, "b": 50.0}, {"a": 15.0, "b": 2.0}, 10.0)
    assert shares == {"a": 0.5, "b": 0.2}


def test_the_json_summary_has_the_promised_fields(tmp_path: Path) -> None:
    result = result_with(Tally(answered=10), "worker-kill", faults=2)
    check(result, gateway_clients=0)
    figures = result.as_dict()
    printed = json.loads(json.dumps(summary([figures])))
    (scenario,) = printed["scenarios"]
    assert set(scenario) >= {
        "name", "lost", "duplicates", "reordered", "dropped_sockets", "recovery_s",
        "msgs_per_s", "p99_ms",
    }  # fmt: skip
    assert printed["ok"] is result.ok
    plot_timeline([figures], tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").read_bytes().startswith(b"\x89PNG")
