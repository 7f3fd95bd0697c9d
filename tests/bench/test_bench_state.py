"""``wsgate bench state``: runs end to end through the real CLI with tiny settings and
reports every figure of the documented shape; the pure parts are checked exactly.

Speed is never asserted (it depends on the machine and its disk).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the test extras
import pytest

import wsgate.bench.state as bench_state
from wsgate.bench.processes import BenchError
from wsgate.bench.state import (
    Cell,
    NaiveFigures,
    ReplicasFigures,
    ReplicaWrites,
    ServiceFigures,
    StateReport,
    Tally,
    Window,
    filesystem_type,
    object_index,
    parse_counters,
    process_cpu_s,
    process_tree_cpu_s,
    run_state,
    value_for,
)
from wsgate.bench.state_command import StateBenchConfig
from wsgate.cli import main
from wsgate.errors import ConfigError
from wsgate.pgserver import postgres_available

SERVICE_FIGURES = {
    "writes_per_s",
    "p50_ms",
    "p99_ms",
    "writes",
    "errors",
    "writes_per_call",
    "client_cores",
    "server_cores",
    "other_cores",
}
NAIVE_FIGURES = {"writes_per_s", "p50_ms", "p99_ms", "writes", "errors", "commits", "other_cores"}
POSTGRES_FIGURES = SERVICE_FIGURES | {
    "postgres_cores",
    "redirects",
    "writes_committed",
    "replicas",
}


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _run_bench_state(*args: str, timeout_s: float) -> dict[str, Any]:
    """Run ``python -m wsgate bench state ... --json``; the one JSON object it printed."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    done = subprocess.run(
        [sys.executable, "-m", "wsgate", "bench", "state", *args, "--json"],
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
    assert after <= before, "wsgate bench state left processes behind"
    return report


@pytest.mark.timeout(150)
def test_state_reports_every_cell_with_both_targets(tmp_path: Path) -> None:
    report = _run_bench_state(
        "--seconds", "0.3", "--warmup-s", "0.1", "--clients", "1", "4", "--objects", "10",
        "--data-dir", str(tmp_path),
        timeout_s=120,
    )  # fmt: skip
    assert report["seconds"] == 0.3
    assert report["filesystem"]
    # The default backend prints what it printed before PostgreSQL was measured.
    assert "backend" not in report
    assert "replicas" not in report
    cells = report["cells"]
    assert [(c["objects"], c["clients"]) for c in cells] == [(1, 1), (1, 4), (10, 1), (10, 4)]
    for cell in cells:
        assert "postgres" not in cell
        assert "ratio_postgres_vs_sqlite" not in cell
        wsgate, naive = cell["wsgate"], cell["naive"]
        assert set(wsgate) == SERVICE_FIGURES
        assert set(naive) == NAIVE_FIGURES
        for figures in (wsgate, naive):
            for name in ("writes_per_s", "p50_ms", "p99_ms", "writes"):
                assert _positive(figures[name]), (name, figures)
            assert figures["p50_ms"] <= figures["p99_ms"]
            assert figures["other_cores"] >= 0
        assert _positive(wsgate["writes_per_call"])
        assert _positive(wsgate["client_cores"])
        assert _positive(wsgate["server_cores"])
        # One transaction per naive write: at least as many commits as writes counted.
        assert naive["commits"] >= naive["writes"]
        assert _positive(cell["ratio"])
        assert _positive(cell["ratio_vs_best_naive"])
    assert _positive(report["best_naive_writes_per_s"])
    targets = report["targets"]
    # Not measured with 128 clients: the targets are reported as unknown, not as missed.
    assert targets["single_object_writes_per_s"] is None
    assert targets["writes_per_s_met"] is None
    assert targets["ratio_met"] is None
    # The temporary directory under --data-dir is removed after a successful run.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(60)
def test_state_over_postgres_replicas_reports_all_three_and_the_spread(tmp_path: Path) -> None:
    if not postgres_available():
        pytest.skip("PostgreSQL's binaries are not installed (scripts/bootstrap test does)")
    report = _run_bench_state(
        "--backend", "postgres", "--replicas", "2", "--seconds", "0.5", "--warmup-s", "0.2",
        "--clients", "4", "--objects", "20", "--data-dir", str(tmp_path),
        timeout_s=50,
    )  # fmt: skip
    assert (report["backend"], report["replicas"]) == ("postgres", 2)
    cells = report["cells"]
    assert [(c["objects"], c["clients"]) for c in cells] == [(1, 4), (20, 4)]
    for cell in cells:
        postgres, wsgate, naive = cell["postgres"], cell["wsgate"], cell["naive"]
        assert set(postgres) == POSTGRES_FIGURES
        assert set(wsgate) == SERVICE_FIGURES
        assert set(naive) == NAIVE_FIGURES
        for figures in (postgres, wsgate, naive):
            for name in ("writes_per_s", "p50_ms", "p99_ms", "writes"):
                assert _positive(figures[name]), (name, figures)
            assert figures["p50_ms"] <= figures["p99_ms"]
        for name in ("writes_per_call", "client_cores", "server_cores", "postgres_cores"):
            assert _positive(postgres[name]), (name, postgres)
        assert _positive(cell["ratio_postgres_vs_sqlite"])
        assert _positive(cell["ratio"])
        replicas = postgres["replicas"]
        assert [r["replica_id"] for r in replicas] == ["replica-0", "replica-1"]
        for replica in replicas:
            assert replica["writes"] >= 0
            assert replica["commits"] >= 0
            # A replica that committed writes did so in at least one transaction.
            assert replica["commits"] >= 1 or replica["writes"] == 0
        # The client sent each write to its object's owner: no replica had to refuse one.
        assert postgres["redirects"] == 0
        # Counted over the whole cell (warm-up included): at least the window's writes.
        assert sum(r["writes"] for r in replicas) == postgres["writes_committed"]
        assert postgres["writes_committed"] >= postgres["writes"]
    # One object: one owner takes every write; 20 objects land on both replicas.
    one, spread = (cell["postgres"]["replicas"] for cell in cells)
    assert sorted(r["writes"] > 0 for r in one) == [False, True]
    assert all(r["writes"] > 0 for r in spread)
    # Everything started was stopped (checked in _run_bench_state) and the run dir removed.
    assert list(tmp_path.iterdir()) == []


def test_postgres_backend_says_what_to_install_when_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_state, "postgres_available", lambda: False)
    config = StateBenchConfig(backend="postgres", data_dir=tmp_path)
    with pytest.raises(BenchError, match="install Debian's postgresql package"):
        run_state(config)
    # Refused before anything was made.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--clients", "0"], "--clients"),
        (["--seconds", "0"], "--seconds"),
        (["--objects", "0"], "--objects"),
        (["--warmup-s", "-1"], "--warmup-s"),
        (["--backend", "postgres", "--replicas", "0"], "--replicas must be >= 1"),
        (["--backend", "postgres", "--replicas", "-2"], "--replicas must be >= 1"),
        (["--replicas", "2"], "--replicas is only for --backend postgres"),
        (["--backend", "sqlite", "--replicas", "1"], "--replicas is only for --backend postgres"),
        (["--backend", "mysql"], "--backend"),
    ],
)
def test_bad_settings_are_refused_as_usage_errors(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "state", *args])
    assert exited.value.code == 2
    assert flag in capsys.readouterr().err


def test_config_measures_one_object_and_the_spread() -> None:
    assert StateBenchConfig().spreads == (1, 1000)
    assert StateBenchConfig(objects=1).spreads == (1,)
    with pytest.raises(ConfigError, match="--clients"):
        StateBenchConfig(clients=())


def test_config_runs_three_replicas_only_over_postgres() -> None:
    assert StateBenchConfig().postgres_replicas == 0
    assert StateBenchConfig(backend="postgres").postgres_replicas == 3
    assert StateBenchConfig(backend="postgres", replicas=1).postgres_replicas == 1
    with pytest.raises(ConfigError, match="--replicas is only for --backend postgres"):
        StateBenchConfig(replicas=3)
    with pytest.raises(ConfigError, match="--replicas must be >= 1"):
        StateBenchConfig(backend="postgres", replicas=0)
    with pytest.raises(ConfigError, match="--backend"):
        StateBenchConfig(backend="oracle")


def test_replica_counters_are_read_from_prometheus_text() -> None:
    text = (
        "# HELP wsgate_state_writes_total Write operations committed\n"
        "# TYPE wsgate_state_writes_total counter\n"
        "wsgate_state_writes_total 1234.0\n"
        "wsgate_state_commits_total 56.0\n"
        "wsgate_state_commits_created 1.7e+09\n"
    )
    names = ("wsgate_state_writes_total", "wsgate_state_commits_total")
    assert parse_counters(text, names) == [1234.0, 56.0]
    with pytest.raises(BenchError, match="wsgate_state_commits_total"):
        parse_counters("wsgate_state_writes_total 1\n", names)


def test_process_tree_cpu_includes_the_root() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc")
    pid = os.getpid()
    own = process_cpu_s(pid)
    assert process_tree_cpu_s(pid) >= own


def test_a_round_of_writes_hits_distinct_objects() -> None:
    clients, spread = 16, 1000
    for seq in (1, 2, 57):
        hit = {object_index(c, seq, clients, spread) for c in range(clients)}
        assert len(hit) == clients
    # Over time every object is written.
    every = {object_index(c, s, 128, spread) for c in range(128) for s in range(1, 100)}
    assert every == set(range(spread))
    assert {object_index(c, s, 4, 1) for c in range(4) for s in range(10)} == {0}


def test_values_are_distinct_and_of_fixed_length() -> None:
    values = {value_for(c, s) for c in range(3) for s in range(1, 1000)}
    assert len(values) == 3 * 999
    assert {len(v) for v in values} == {64}


def test_tally_counts_only_acknowledgements_inside_the_window() -> None:
    window = Window(start_ns=0, warmup_s=1, seconds=2)
    tally = Tally()
    assert tally.acknowledged(window, sent_ns=0, now_ns=500_000_000)  # warm-up: not counted
    assert tally.acknowledged(window, sent_ns=900_000_000, now_ns=1_000_000_000)  # 100 ms
    assert not tally.acknowledged(window, sent_ns=2_900_000_000, now_ns=3_000_000_000)
    assert tally.count == 1
    assert tally.histogram.percentile_ms(50) == pytest.approx(100, rel=0.01)
    assert tally.failed(window, OSError("disk"), now_ns=1_500_000_000)
    assert not tally.failed(window, OSError("late"), now_ns=3_000_000_000)
    assert (tally.errors, tally.first_error) == (2, "OSError('disk')")
    merged = Tally()
    merged.merge(tally)
    assert (merged.count, merged.errors, merged.histogram.total) == (1, 2, 1)


def test_filesystem_type_reads_the_mount_table() -> None:
    if not Path("/proc/self/mounts").exists():
        pytest.skip("no /proc/self/mounts")
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(Path("/")) not in ("", "unknown")


def _cell(
    objects: int,
    clients: int,
    wsgate_rate: float,
    naive_rate: float,
    postgres: ReplicasFigures | None = None,
) -> Cell:
    wsgate = ServiceFigures(wsgate_rate, 1.0, 2.0, 100, 0, float(clients), 0.5, 0.5, 0.0)
    naive = NaiveFigures(naive_rate, 0.2, 0.4, 100, 0, 100, 0.0)
    return Cell(objects=objects, clients=clients, wsgate=wsgate, naive=naive, postgres=postgres)


def _replicas(rate: float, *writes: int) -> ReplicasFigures:
    service = ServiceFigures(rate, 3.0, 9.0, 100, 0, 16.0, 0.5, 0.9, 0.1, postgres_cores=0.4)
    spread = tuple(
        ReplicaWrites(f"replica-{i}", count, count // 10) for i, count in enumerate(writes)
    )
    return ReplicasFigures(service=service, replicas=spread, redirects=0)


def test_postgres_report_puts_the_three_side_by_side_with_the_spread() -> None:
    config = StateBenchConfig(backend="postgres", objects=1000, clients=(128,))
    cells = (
        _cell(1, 128, 20000, 5000, _replicas(5000, 0, 6000, 0)),
        _cell(1000, 128, 16000, 5000, _replicas(8000, 3000, 3300, 3700)),
    )
    report = StateReport(config=config, filesystem="ext4", cells=cells)
    figures = report.to_json()
    assert (figures["backend"], figures["replicas"]) == ("postgres", 3)
    first = figures["cells"][0]
    assert first["ratio_postgres_vs_sqlite"] == 0.25
    assert first["ratio"] == 4.0
    assert first["postgres"]["postgres_cores"] == 0.4
    assert first["postgres"]["writes_committed"] == 6000
    assert [r["writes"] for r in figures["cells"][1]["postgres"]["replicas"]] == [3000, 3300, 3700]
    text = report.render()
    assert "PostgreSQL, 3 replica(s)" in text
    # PostgreSQL over the SQLite service, per cell.
    assert "|     0.25x        4.00x" in text
    assert "|     0.50x        3.20x" in text
    assert "replica-1 6,000 (100%, 10.0)" in text
    assert "replica-0 3,000 (30%, 10.0)  replica-1 3,300 (33%, 10.0)" in text
    # The SQLite targets are still checked.
    assert ">= 5,000 writes/s on one object with 128 clients: yes (20,000)" in text


def test_report_checks_the_targets_on_one_object_with_128_clients() -> None:
    cells = (
        _cell(1, 1, 900, 6000),
        _cell(1, 128, 24000, 4000),  # 6x its naive cell, 4x the best naive cell
        _cell(1000, 128, 30000, 5000),
    )
    report = StateReport(config=StateBenchConfig(), filesystem="ext4", cells=cells)
    targets = report.to_json()["targets"]
    assert targets["single_object_writes_per_s"] == 24000
    assert targets["writes_per_s_met"] is True
    assert targets["single_object_ratio"] == 6.0
    assert targets["ratio_met"] is True
    assert report.to_json()["cells"][1]["ratio_vs_best_naive"] == 4.0
    text = report.render()
    assert ">= 5,000 writes/s on one object with 128 clients: yes (24,000)" in text
    assert "yes (6.00x the naive cell at the same concurrency; 4.00x the best naive cell)" in text
    slow = StateReport(
        config=StateBenchConfig(),
        filesystem="ext4",
        cells=(_cell(1, 128, 4000, 4000),),
    )
    assert ">= 5,000 writes/s on one object with 128 clients: no (4,000)" in slow.render()
    assert slow.to_json()["targets"]["ratio_met"] is False
