"""The Autobahn|Testsuite fuzzingclient against ``wsgate dev``'s ``/echo`` route.

Every frame takes the full path: client → gateway → NATS → worker (the example app's echo
handler) → NATS → gateway → client. ``scripts/autobahn`` makes the Python 2.7 virtualenv
that holds ``wstest`` and then runs this module; ``tests/conformance/test_autobahn.py``
calls :func:`run` directly. See ``docs/conformance.md``.

Order of a run: start ``wsgate dev --port 0`` in its own process group and read its output
up to the line with its URL; write the spec; run ``wstest -m fuzzingclient``; stop dev with
SIGINT to its group (SIGKILL if it has not exited in time); read ``index.json`` and, for
each case that is not fine, the case's own report.

``python -m tests.conformance.autobahn --wstest PATH [--json] [--cases PATTERN ...]`` exits
0 when every case is fine, 1 when some case is not, 2 when the run itself failed.

Errors::

    AutobahnError
    ├── DevStartFailed          dev exited, or printed no URL in time
    └── WstestFailed            wstest exited non-zero or wrote no index.json
        └── WstestTimeout(TimeoutError)   wstest ran past its deadline
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
#: Where ``scripts/autobahn`` makes the Python 2.7 virtualenv.
DEFAULT_WSTEST = REPO / ".autobahn" / "venv" / "bin" / "wstest"
DEFAULT_WORK_DIR = REPO / ".autobahn"
#: RFC 6455 framing, pings, reserved bits, opcodes, fragmentation, UTF-8, closing, and
#: miscellaneous (10.*). Leaves out 9.* (performance: minutes) and 12.*/13.*
#: (permessage-deflate, which wsgate does not negotiate).
DEFAULT_CASES = ("1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*")
AGENT = "wsgate"
ROUTE = "/echo"

#: Outcomes of a case that conform: NON-STRICT and INFORMATIONAL are the suite's own
#: "allowed, but note it".
ACCEPTED_BEHAVIORS = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})
ACCEPTED_CLOSE_BEHAVIORS = frozenset({"OK", "INFORMATIONAL"})
#: Always shown in the counts, even at zero; any other behavior is shown when it occurs.
COUNTED_BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
COUNTED_CLOSE_BEHAVIORS = ("OK", "INFORMATIONAL")
#: Frames shown per direction for a case that is not fine.
MAX_FRAMES_SHOWN = 8
_OPCODES = {0: "continuation", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}

EXIT_OK = 0
EXIT_CASES_FAILED = 1
EXIT_RUN_FAILED = 2
#: ``scripts/autobahn``'s status when no Python 2.7 is on the machine.
EXIT_NO_PYTHON27 = 3

_URL_LINE = re.compile(r"wsgate dev: serving \S+ at http://(127\.0\.0\.1:\d+)")


class AutobahnError(Exception):
    """Root of the errors of a conformance run (not of a case failing: that is a result)."""


class DevStartFailed(AutobahnError):
    """``wsgate dev`` exited, or printed no URL within the deadline."""


class WstestFailed(AutobahnError):
    """``wstest`` exited non-zero or wrote no ``index.json``."""


class WstestTimeout(WstestFailed, TimeoutError):
    """``wstest`` ran past its deadline and was killed."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One conformance run. ``work_dir`` receives spec.json, dev.log, wstest.log and
    reports/ (emptied first)."""

    wstest: Path = DEFAULT_WSTEST
    work_dir: Path = DEFAULT_WORK_DIR
    cases: tuple[str, ...] = DEFAULT_CASES
    #: The interpreter that runs ``-m wsgate dev``: the project's virtualenv.
    python: str = sys.executable
    dev_start_timeout_s: float = 60.0
    dev_stop_timeout_s: float = 30.0
    wstest_timeout_s: float = 600.0

    @property
    def reports_dir(self) -> Path:
        return self.work_dir / "reports"


@dataclass(frozen=True, kw_only=True)
class CaseResult:
    """One case as ``index.json`` and the case's own report tell it.

    The ``client_*`` fields are what the testsuite (the client) sent in its close frame,
    the ``server_*`` fields what wsgate answered; ``None`` where no close frame went.
    Details beyond ``index.json`` are filled only for cases that are not fine.
    """

    case_id: str
    behavior: str
    behavior_close: str
    duration_ms: int
    server_close_code: int | None
    description: str = ""
    expectation: str = ""
    result: str = ""
    result_close: str = ""
    expected_close_codes: tuple[int, ...] = ()
    client_close_code: int | None = None
    client_close_reason: str | None = None
    server_close_reason: str | None = None
    was_clean: bool | None = None
    not_clean_reason: str | None = None
    #: The frames each side sent, from the suite's wire log ("close 2B 0x03ee").
    client_frames: tuple[str, ...] = ()
    server_frames: tuple[str, ...] = ()
    report_file: str = ""

    @property
    def fine(self) -> bool:
        """Conforms: the outcome and the closing handshake are both acceptable."""
        return (
            self.behavior in ACCEPTED_BEHAVIORS and self.behavior_close in ACCEPTED_CLOSE_BEHAVIORS
        )


@dataclass(frozen=True, kw_only=True)
class Summary:
    """What a run found: counts by behavior, and the cases that are not fine."""

    url: str
    cases: tuple[str, ...]
    total: int
    behaviors: dict[str, int]
    close_behaviors: dict[str, int]
    failing: tuple[CaseResult, ...]
    reports_dir: str
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.total > 0 and not self.failing

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON-ready data (``--json``)."""
        data = asdict(self)
        data["passed"] = self.passed
        return data

    def format_failures(self) -> str:
        """The cases that are not fine, several lines each; empty when there are none."""
        lines: list[str] = []
        for case in self.failing:
            expected = " or ".join(map(str, case.expected_close_codes)) or "-"
            lines += [
                f"{case.case_id}: {case.behavior} (close: {case.behavior_close})",
                f"  sent:     {case.description}",
                f"  expected: {case.expectation} [close code {expected}]",
                f"  client close: {_close(case.client_close_code, case.client_close_reason)}",
                f"  wsgate close: {_close(case.server_close_code, case.server_close_reason)}"
                + ("" if case.was_clean else f" (not clean: {case.not_clean_reason})"),
                f"  result:   {case.result} / {case.result_close}",
                f"  client frames: {'; '.join(case.client_frames) or 'none'}",
                f"  wsgate frames: {'; '.join(case.server_frames) or 'none'}",
            ]
        return "\n".join(lines)

    def format_text(self) -> str:
        """The human summary that ``scripts/autobahn`` prints."""
        lines = [
            f"Autobahn|Testsuite fuzzingclient -> wsgate dev {self.url}",
            f"cases {' '.join(self.cases)}: {self.total} run in {self.duration_s:.1f} s",
            "behavior:       " + _counts(self.behaviors),
            "close behavior: " + _counts(self.close_behaviors),
        ]
        if self.failing:
            lines += [f"cases not OK, NON-STRICT or INFORMATIONAL ({len(self.failing)}):"]
            lines += ["  " + line for line in self.format_failures().splitlines()]
        else:
            lines += ["every case OK, NON-STRICT or INFORMATIONAL"]
        lines += [f"reports: {self.reports_dir}/index.html"]
        return "\n".join(lines)


def _close(code: int | None, reason: str | None) -> str:
    if code is None:
        return "none"
    return f"{code} {reason!r}" if reason else str(code)


def _counts(counts: Mapping[str, int]) -> str:
    return "  ".join(f"{name} {n}" for name, n in counts.items())


def case_sort_key(case_id: str) -> tuple[int, ...]:
    """``'7.9.10'`` after ``'7.9.9'``: numeric, not lexical."""
    return tuple(int(part) for part in case_id.split("."))


def fuzzingclient_spec(url: str, cases: Sequence[str], outdir: Path) -> dict[str, Any]:
    """The ``-s`` spec of ``wstest -m fuzzingclient`` for one server under test."""
    return {
        "outdir": str(outdir),
        "servers": [{"agent": AGENT, "url": url}],
        "cases": list(cases),
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }


def summarize(
    index: Mapping[str, Any],
    load_report: Callable[[str], Mapping[str, Any]],
    *,
    url: str,
    cases: Sequence[str],
    reports_dir: str,
    duration_s: float = 0.0,
) -> Summary:
    """Build the summary from ``index.json``'s content; ``load_report(file name)`` gives a
    case's own report, asked only for the cases that are not fine. Raises
    :class:`WstestFailed` when the index has no entry for our agent."""
    if AGENT not in index:
        raise WstestFailed(f"index.json has no results for agent {AGENT!r}")
    entries = index[AGENT]
    behaviors = Counter(e["behavior"] for e in entries.values())
    close_behaviors = Counter(e["behaviorClose"] for e in entries.values())
    failing: list[CaseResult] = []
    for case_id in sorted(entries, key=case_sort_key):
        entry = entries[case_id]
        case = CaseResult(
            case_id=case_id,
            behavior=entry["behavior"],
            behavior_close=entry["behaviorClose"],
            duration_ms=int(entry.get("duration") or 0),
            server_close_code=entry.get("remoteCloseCode"),
            report_file=entry.get("reportfile", ""),
        )
        if not case.fine:
            failing.append(_with_details(case, load_report(case.report_file)))
    return Summary(
        url=url,
        cases=tuple(cases),
        total=len(entries),
        behaviors=_ordered(behaviors, COUNTED_BEHAVIORS),
        close_behaviors=_ordered(close_behaviors, COUNTED_CLOSE_BEHAVIORS),
        failing=tuple(failing),
        reports_dir=reports_dir,
        duration_s=round(duration_s, 1),
    )


def _ordered(counts: Counter[str], always: Sequence[str]) -> dict[str, int]:
    named = {name: counts.get(name, 0) for name in always}
    return named | {name: n for name, n in sorted(counts.items()) if name not in named}


def _with_details(case: CaseResult, report: Mapping[str, Any]) -> CaseResult:
    expected_close = report.get("expectedClose") or {}
    return CaseResult(
        case_id=case.case_id,
        behavior=case.behavior,
        behavior_close=case.behavior_close,
        duration_ms=case.duration_ms,
        server_close_code=report.get("remoteCloseCode", case.server_close_code),
        description=_plain(report.get("description", "")),
        expectation=_plain(report.get("expectation", "")),
        result=report.get("result", ""),
        result_close=report.get("resultClose", ""),
        expected_close_codes=tuple(expected_close.get("closeCode") or ()),
        client_close_code=report.get("localCloseCode"),
        client_close_reason=report.get("localCloseReason"),
        server_close_reason=report.get("remoteCloseReason"),
        was_clean=report.get("wasClean"),
        not_clean_reason=report.get("wasNotCleanReason"),
        client_frames=_frames(report.get("wirelog") or [], "TF"),
        server_frames=_frames(report.get("wirelog") or [], "RF"),
        report_file=case.report_file,
    )


def _frames(wirelog: Sequence[Any], kind: str) -> tuple[str, ...]:
    """Frames of one direction from the suite's wire log: ``TF`` sent by the client, ``RF``
    received from wsgate. An entry is ``[kind, [length, payload], opcode, fin, rsv, ...]``;
    the suite already shortens long payloads."""
    shown: list[str] = []
    entries = [e for e in wirelog if isinstance(e, list) and len(e) >= 5 and e[0] == kind]
    for entry in entries[:MAX_FRAMES_SHOWN]:
        (length, payload), opcode, fin, rsv = entry[1], entry[2], entry[3], entry[4]
        text = f"{_OPCODES.get(opcode, f'opcode {opcode}')} {length}B"
        text += "" if fin else " fin=0"
        text += f" rsv={rsv}" if rsv else ""
        payload = str(payload)
        text += f" {payload[:40]}{'...' if len(payload) > 40 else ''}" if payload else ""
        shown.append(text)
    if len(entries) > MAX_FRAMES_SHOWN:
        shown.append(f"... {len(entries) - MAX_FRAMES_SHOWN} more")
    return tuple(shown)


def _plain(text: str) -> str:
    """The suite's descriptions are HTML fragments on one line."""
    return re.sub(r"<[^>]+>", "", text).strip()


def read_summary(
    reports_dir: Path, *, url: str, cases: Sequence[str], duration_s: float = 0.0
) -> Summary:
    """:func:`summarize` over the files ``wstest`` wrote in ``reports_dir``."""
    index_path = reports_dir / "index.json"
    if not index_path.exists():
        raise WstestFailed(f"wstest wrote no {index_path}")

    def load_report(name: str) -> Mapping[str, Any]:
        path = reports_dir / name
        return json.loads(path.read_text()) if name and path.exists() else {}

    return summarize(
        json.loads(index_path.read_text()),
        load_report,
        url=url,
        cases=cases,
        reports_dir=str(reports_dir),
        duration_s=duration_s,
    )


def _copy_output(stream: IO[bytes], log: IO[bytes], urls: queue.Queue[str]) -> None:
    """Copy dev's output to its log (dev blocks when its pipe fills), announcing the URL."""
    with contextlib.suppress(OSError, ValueError):
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            if m := _URL_LINE.search(line.decode(errors="replace")):
                urls.put(m.group(1))


@contextlib.contextmanager
def running_dev(config: RunConfig, data_dir: Path, log_path: Path) -> Iterator[str]:
    """``wsgate dev --port 0`` in its own process group; yields ``host:port`` once dev has
    printed its URL. On exit: SIGINT to the group (as Ctrl-C in a terminal), then SIGKILL
    after ``dev_stop_timeout_s``. Raises :class:`DevStartFailed`."""
    argv = [config.python, "-m", "wsgate", "dev", "--port", "0", "--data-dir", str(data_dir)]
    env = os.environ | {"PYTHONUNBUFFERED": "1", "WSGATE_LOG_LEVEL": "INFO"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        assert proc.stdout is not None
        urls: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(
            target=_copy_output, args=(proc.stdout, log, urls), name="dev-output", daemon=True
        )
        reader.start()
        try:
            yield _wait_for_url(proc, urls, config.dev_start_timeout_s, log_path)
        finally:
            status = _stop_group(proc, config.dev_stop_timeout_s)
            reader.join(timeout=10)
            proc.stdout.close()
            if status != 0:
                print(f"autobahn: wsgate dev exited with {status}; see {log_path}", file=sys.stderr)


def _wait_for_url(
    proc: subprocess.Popen[bytes], urls: queue.Queue[str], timeout_s: float, log_path: Path
) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return urls.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                raise DevStartFailed(
                    f"wsgate dev exited with {proc.returncode} before serving:\n" + _tail(log_path)
                ) from None
    raise DevStartFailed(f"wsgate dev printed no URL in {timeout_s:.0f} s:\n" + _tail(log_path))


def _stop_group(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGINT to dev's process group, then SIGKILL to it. Returns dev's exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_wstest(config: RunConfig, spec_path: Path, log_path: Path) -> None:
    """``wstest -m fuzzingclient -s spec_path``, output to ``log_path``. Raises
    :class:`WstestFailed` or :class:`WstestTimeout`."""
    argv = [str(config.wstest), "-m", "fuzzingclient", "-s", str(spec_path)]
    with open(log_path, "wb") as log:
        try:
            done = subprocess.run(
                argv,
                cwd=config.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=config.wstest_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise WstestTimeout(
                f"wstest ran past {config.wstest_timeout_s:.0f} s; see {log_path}"
            ) from None
    if done.returncode != 0:
        raise WstestFailed(f"wstest exited with {done.returncode}:\n" + _tail(log_path))


def run(config: RunConfig) -> Summary:
    """One whole run (see the module docstring). Raises :class:`AutobahnError` when the run
    itself fails; failing cases are in the returned summary."""
    if not config.wstest.exists():
        raise WstestFailed(f"no wstest at {config.wstest}: run scripts/autobahn --setup-only")
    config.work_dir.mkdir(parents=True, exist_ok=True)
    reports_dir = config.reports_dir
    # Old case reports would otherwise sit beside the new index.json.
    if reports_dir.exists():
        for old in reports_dir.iterdir():
            old.unlink()
    reports_dir.mkdir(exist_ok=True)
    spec_path = config.work_dir / "spec.json"
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="wsgate-autobahn-") as data_dir,
        running_dev(config, Path(data_dir), config.work_dir / "dev.log") as address,
    ):
        url = f"ws://{address}{ROUTE}"
        spec = fuzzingclient_spec(url, config.cases, reports_dir)
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        print(f"autobahn: wstest fuzzingclient -> {url}", file=sys.stderr)
        run_wstest(config, spec_path, config.work_dir / "wstest.log")
    return read_summary(
        reports_dir, url=url, cases=config.cases, duration_s=time.monotonic() - started
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``scripts/autobahn`` (after it has made the virtualenv)."""
    parser = argparse.ArgumentParser(
        prog="scripts/autobahn", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--wstest", type=Path, default=DEFAULT_WSTEST, help="wstest to run")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--cases", nargs="+", default=list(DEFAULT_CASES), metavar="PATTERN",
        help="case ids or patterns (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR,
        help="spec, logs and reports/ go here (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--wstest-timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    config = RunConfig(
        wstest=args.wstest,
        work_dir=args.work_dir.resolve(),
        cases=tuple(args.cases),
        wstest_timeout_s=args.wstest_timeout_s,
    )
    try:
        summary = run(config)
    except AutobahnError as exc:
        print(f"autobahn: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(summary.format_text())
    return EXIT_OK if summary.passed else EXIT_CASES_FAILED


if __name__ == "__main__":
    sys.exit(main())
