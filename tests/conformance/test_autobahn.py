"""RFC 6455 conformance of the full path (client → gateway → NATS → worker → NATS →
gateway), measured by the Autobahn|Testsuite fuzzingclient against ``wsgate dev``'s
``/echo`` route. See docs/conformance.md.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from tests.conformance import autobahn

SCRIPT = autobahn.REPO / "scripts" / "autobahn"
#: Cases 1-7 and 10 in the pinned autobahntestsuite 25.10.1; fewer means wstest stopped early.
EXPECTED_CASE_COUNT = 247
#: Failing cases spelled out in the assertion message; the rest are counted.
MAX_CASES_IN_MESSAGE = 25


@pytest.mark.timeout(900)
def test_fuzzingclient_finds_no_failing_case(tmp_path: Path) -> None:
    """Every case OK, NON-STRICT or INFORMATIONAL, with an acceptable closing handshake."""
    # The script finds Python 2.7 and makes, once, the virtualenv that holds wstest (~30 s).
    setup = subprocess.run(
        [str(SCRIPT), "--setup-only"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if setup.returncode == autobahn.EXIT_NO_PYTHON27:
        pytest.skip(setup.stderr.strip())
    assert setup.returncode == 0, f"scripts/autobahn --setup-only failed:\n{setup.stderr}"

    # Deadlines: 240 s setup + 60 s dev start + 540 s wstest + 30 s dev stop < 900 s.
    summary = autobahn.run(autobahn.RunConfig(work_dir=tmp_path, wstest_timeout_s=540))

    assert summary.total == EXPECTED_CASE_COUNT, summary.format_text()
    if not summary.passed:
        shown = dataclasses.replace(summary, failing=summary.failing[:MAX_CASES_IN_MESSAGE])
        more = len(summary.failing) - len(shown.failing)
        pytest.fail(
            f"{len(summary.failing)} of {summary.total} cases failed "
            f"(behaviors {summary.behaviors}, close {summary.close_behaviors}):\n"
            + shown.format_failures()
            + (f"\n... and {more} more" if more > 0 else "")
            + f"\nreports: {summary.reports_dir}/index.html",
            pytrace=False,
        )
