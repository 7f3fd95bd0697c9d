"""``wsgate bench``: the commands run end to end and print figures of the documented shape.

Speed is never asserted here (figures depend on the machine); only that each benchmark
runs, stops what it started and reports positive numbers. The pure parts (histogram,
measurement window, connection split) are checked exactly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from wsgate.bench.config import EchoBenchConfig
from wsgate.bench.echo import EchoFigures, EchoReport, EchoRound
from wsgate.bench.histogram import LatencyHistogram
from wsgate.bench.loadgen import EchoWindow
from wsgate.bench.machine import BUSY_SHARE, OtherLoad, own_tree_cpu_s
from wsgate.bench.processes import split
from wsgate.cli import main
from wsgate.config import DEFAULT_WORKER_PORT


def _bench(*args: str, timeout_s: float) -> dict[str, Any]:
    """Run ``wsgate bench ...`` and return the one JSON object it printed on stdout."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    done = subprocess.run(
        [sys.executable, "-m", "wsgate", "bench", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stdout, got {lines!r}"
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before, "wsgate bench left processes behind"
    return report


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(150)
def test_echo_reports_full_path_and_baseline() -> None:
    report = _bench(
        "echo", "--connections", "20", "--duration-s", "2", "--warmup-s", "0.5", "--rounds", "2",
        "--json",
        timeout_s=120,
    )  # fmt: skip
    assert set(report) == {
        "full", "baseline", "ratio", "p99_ratio", "round_ratio", "round_p99_ratio", "rounds",
        "other_cpu_share",
    }  # fmt: skip
    for target in ("full", "baseline"):
        figures = report[target]
        assert set(figures) == {"msgs_per_s", "p50_ms", "p99_ms"}
        assert all(_positive(v) for v in figures.values()), figures
        assert figures["p50_ms"] <= figures["p99_ms"]
    assert all(_positive(report[k]) for k in ("ratio", "p99_ratio", "round_ratio"))
    assert report["p99_ratio"] == pytest.approx(
        report["full"]["p99_ms"] / report["baseline"]["p99_ms"], rel=0.01
    )
    assert len(report["rounds"]) == 2
    for one in report["rounds"]:
        assert set(one) == {"ratio", "p99_ratio", "other_cpu_share"}
        assert _positive(one["ratio"])
        assert _positive(one["p99_ratio"])
        assert 0 <= one["other_cpu_share"] <= report["other_cpu_share"] <= 1


@contextlib.contextmanager
def _port_taken(port: int) -> Iterator[None]:
    """``port`` on 127.0.0.1 is held by someone else meanwhile (by this, if it was free)."""
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", port))
            held.listen()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        yield


@pytest.mark.timeout(150)
def test_idle_reports_memory_per_connection() -> None:
    # A bench runs beside anything else on the machine (a dev stack, another bench): its
    # roles take free ports, never their defaults.
    with _port_taken(DEFAULT_WORKER_PORT):
        report = _bench("idle", "--connections", "200", "--json", timeout_s=120)
    assert set(report) == {
        "connections",
        "gateway_rss_before_kib",
        "gateway_rss_after_kib",
        "kib_per_connection",
        "baseline_rss_before_kib",
        "baseline_rss_after_kib",
        "baseline_kib_per_connection",
        "ratio",
        "other_cpu_share",
    }
    assert report["connections"] == 200
    for target in ("gateway", "baseline"):
        assert _positive(report[f"{target}_rss_before_kib"])
        assert _positive(report[f"{target}_rss_after_kib"])
    assert _positive(report["kib_per_connection"])
    assert report["ratio"] == pytest.approx(
        report["kib_per_connection"] / report["baseline_kib_per_connection"], rel=0.01
    )
    assert 0 <= report["other_cpu_share"] <= 1


@pytest.mark.timeout(200)
def test_object_reports_one_object_spread_and_echo_with_nothing_lost() -> None:
    report = _bench(
        "object", "--connections", "16", "--objects", "40", "--duration-s", "2",
        "--warmup-s", "0.5", "--rounds", "1", "--json",
        timeout_s=180,
    )  # fmt: skip
    assert set(report) == {"one_object", "spread", "echo", "ratio"}
    for target in ("one_object", "spread"):
        figures = report[target]
        assert set(figures) == {"turns_per_s", "p50_ms", "p99_ms", "lost"}
        assert figures["lost"] == 0, figures
        assert all(_positive(figures[k]) for k in ("turns_per_s", "p50_ms", "p99_ms")), figures
        assert figures["p50_ms"] <= figures["p99_ms"]
    assert set(report["echo"]) == {"msgs_per_s", "p50_ms", "p99_ms"}
    assert report["ratio"] == pytest.approx(
        report["one_object"]["turns_per_s"] / report["echo"]["msgs_per_s"], rel=0.01
    )


@pytest.mark.parametrize(
    "args",
    [
        ["echo", "--connections", "0"],
        ["object", "--connections", "0"],
        ["object", "--objects", "0"],
        ["object", "--rounds", "0"],
    ],
)
def test_bad_settings_are_refused_as_usage_errors(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", *args])
    assert exited.value.code == 2
    assert args[1] in capsys.readouterr().err


def test_histogram_percentiles_are_within_one_percent() -> None:
    histogram = LatencyHistogram()
    for ms in range(1, 101):  # 1 ms .. 100 ms, one sample each
        histogram.record_ns(ms * 1_000_000)
    assert histogram.percentile_ms(50) == pytest.approx(50, rel=0.01)
    assert histogram.percentile_ms(99) == pytest.approx(99, rel=0.01)
    assert histogram.percentile_ms(100) == pytest.approx(100, rel=0.01)


def test_histograms_merge_through_json() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    for _ in range(99):
        a.record_ns(1_000_000)
    b.record_ns(50_000_000)
    merged = LatencyHistogram.from_json(json.loads(json.dumps(a.to_json())))
    merged.merge(LatencyHistogram.from_json(b.to_json()))
    assert merged.total == 100
    assert merged.percentile_ms(99) == pytest.approx(1, rel=0.01)
    assert merged.percentile_ms(100) == pytest.approx(50, rel=0.01)
    with pytest.raises(ValueError, match="no samples"):
        LatencyHistogram().percentile_ms(50)
    with pytest.raises(ValueError, match="bucket, count"):
        LatencyHistogram.from_json([[1, 2, 3]])


def test_echo_window_counts_only_round_trips_that_end_inside_it() -> None:
    window = EchoWindow(start_ns=0, warmup_s=1, duration_s=2)
    assert window.completed(sent_ns=0, now_ns=500_000_000)  # warm-up: not counted
    assert window.completed(sent_ns=900_000_000, now_ns=1_000_000_000)  # counted: 100 ms
    assert window.completed(sent_ns=2_000_000_000, now_ns=2_999_999_999)  # counted
    assert not window.completed(sent_ns=2_999_000_000, now_ns=3_000_000_000)  # window over
    assert window.count == 2
    assert window.histogram.percentile_ms(50) == pytest.approx(100, rel=0.01)


def test_connections_are_split_evenly_without_empty_shares() -> None:
    assert split(200, 2) == [100, 100]
    assert split(5, 3) == [2, 2, 1]
    assert split(1, 4) == [1]


def _figures(msgs_per_s: float, p99_ms: float) -> EchoFigures:
    return EchoFigures(msgs_per_s, p99_ms / 2, p99_ms, 1, 0, 0.1)


def test_echo_ratios_are_taken_per_round_and_their_median_reported() -> None:
    quiet, busy = OtherLoad(cores=0.0, share=0.0), OtherLoad(cores=0.5, share=0.25)
    rounds = (
        EchoRound(_figures(300, 40), _figures(1000, 10), quiet, quiet),  # 0.30, p99 4.0
        EchoRound(_figures(500, 30), _figures(1000, 20), quiet, busy),  # 0.50, p99 1.5
        EchoRound(_figures(400, 20), _figures(2000, 10), quiet, quiet),  # 0.20, p99 2.0
    )
    report = EchoReport(
        config=EchoBenchConfig(),
        full=rounds[2].full,  # the median rounds by msgs/s, each chosen apart
        baseline=rounds[0].baseline,
        rounds=rounds,
    )
    assert report.ratio == pytest.approx(0.4)  # 400 / 1000: today's figure, kept
    assert report.p99_ratio == pytest.approx(2.0)  # 20 ms / 10 ms
    assert report.round_ratio == pytest.approx(0.3)
    assert report.round_p99_ratio == pytest.approx(2.0)
    assert report.other_share == pytest.approx(0.25)
    assert report.to_json()["rounds"][1] == {
        "ratio": 0.5, "p99_ratio": 1.5, "other_cpu_share": 0.25,
    }  # fmt: skip
    assert "median of rounds: msgs/s 0.300 (0.300, 0.500, 0.200)" in report.render()
    assert OtherLoad(cores=0.0, share=BUSY_SHARE + 0.01).busy
    assert not OtherLoad(cores=0.0, share=BUSY_SHARE).busy


def test_own_cpu_counts_children_that_ended() -> None:
    """A load generator that exits during a window is the benchmark's CPU, not another
    process': its time moves into this process' children time when it is waited for."""
    before = own_tree_cpu_s()
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", spin], check=True, timeout=60)
    # At least the 0.3 s of CPU the child spun for, less a clock tick or two of rounding.
    assert own_tree_cpu_s() - before >= 0.28
