"""A load run's results: the JSON, the timeline picture (matplotlib) and a text summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt

#: The fields of ``--json``'s summary, per scenario.
SUMMARY_FIELDS = (
    "name", "lost", "duplicates", "reordered", "dropped_sockets", "recovery_s", "msgs_per_s",
    "p99_ms",
)  # fmt: skip


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``./scripts/load --json`` prints: the headline figures of each scenario."""
    return {
        "scenarios": [{key: r[key] for key in (*SUMMARY_FIELDS, "ok")} for r in results],
        "ok": all(r["ok"] for r in results),
    }


def write_json(results: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps({**meta, "scenarios": results}, indent=1) + "\n")


def plot_timeline(results: list[dict[str, Any]], path: Path) -> None:
    """One column per scenario: msgs/s, p99 (ms) and errors per second, faults marked."""
    columns = len(results)
    figure, axes = plt.subplots(3, columns, figsize=(4.2 * columns, 7), sharex="col", squeeze=False)
    for column, result in enumerate(results):
        timeline = result["timeline"]
        seconds = timeline["second"]
        rows = (
            ("received", "msgs/s", "tab:blue"),
            ("p99_ms", "p99 (ms)", "tab:orange"),
            ("errors", "errors/s", "tab:red"),
        )
        for row, (key, label, colour) in enumerate(rows):
            ax = axes[row][column]
            ax.plot(seconds, timeline[key], color=colour, linewidth=1.2)
            ax.grid(alpha=0.3)
            if column == 0:
                ax.set_ylabel(label)
            for at, fault in result["faults"]:
                ax.axvline(at, color="black", linestyle="--", linewidth=0.8)
                if row == 0:
                    ax.annotate(
                        fault, (at, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                        fontsize=7, va="top", ha="right",
                    )  # fmt: skip
        verdict = "ok" if result["ok"] else "FAILED"
        axes[0][column].set_title(f"({result['letter']}) {result['name']}: {verdict}", fontsize=9)
        axes[2][column].set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_usage(result: dict[str, Any], path: Path) -> None:
    """The churn's RSS per process against connections churned."""
    samples = result["usage"]
    figure, ax = plt.subplots(figsize=(8, 4.5))
    nodes = sorted({node for sample in samples for node in sample["usage"]})
    for node in nodes:
        points = [(s["connections"], s["usage"][node][0] / 2**20) for s in samples
                  if node in s["usage"]]  # fmt: skip
        ax.plot(*zip(*points, strict=True), label=node, linewidth=1.2)
    ax.set_xlabel("connections churned")
    ax.set_ylabel("RSS (MiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def text_summary(results: list[dict[str, Any]]) -> str:
    """One line per scenario, then its failures."""
    lines = [
        f"{'scenario':<20} {'conns':>6} {'msgs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
        f"{'lost':>5} {'dups':>5} {'reord':>5} {'drops':>5} {'recover s':>9}  result"
    ]
    for r in results:
        lines.append(
            f"({r['letter']}) {r['name']:<16} {r['connections']:>6} {r['msgs_per_s']:>8} "
            f"{r['p50_ms']:>8} {r['p99_ms']:>8} {r['errors']:>6} {r['lost']:>5} "
            f"{r['duplicates']:>5} {r['reordered']:>5} {r['dropped_sockets']:>5} "
            f"{r['recovery_s']:>9}  {'ok' if r['ok'] else 'FAILED'}"
        )
        lines += [f"    - {failure}" for failure in r["failures"]]
    return "\n".join(lines)
