"""``wsgate state``'s actions: how the command line parses, and the edges of
:mod:`wsgate.stateservice.admin` that need no running service (tests/integration/test_state_admin.py
runs them as commands, under a real state service)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from wsgate.cli import build_parser
from wsgate.config import StateConfig
from wsgate.stateservice import admin
from wsgate.stateservice.schema import LATEST_VERSION

# -- the command line ---------------------------------------------------------------------


def test_state_without_an_action_serves_as_before() -> None:
    args = build_parser({}).parse_args(["state", "--port", "0", "--ready-fd", "3"])
    assert (args.action, args.port, args.ready_fd) == (None, 0, 3)


def test_serve_takes_every_flag_after_it() -> None:
    args = build_parser({}).parse_args(["state", "serve", "--port", "0", "--ready-fd", "3"])
    assert (args.action, args.port, args.ready_fd) == ("serve", 0, 3)


@pytest.mark.parametrize(
    "argv",
    [
        ["state", "--db-path", "x.db", "backup", "--force", "out.db"],
        ["state", "backup", "out.db", "--db-path", "x.db", "--force"],
        ["state", "backup", "--db-path", "x.db", "--force", "out.db"],
    ],
)
def test_the_database_flags_go_before_or_after_the_action(argv: list[str]) -> None:
    args = build_parser({}).parse_args(argv)
    assert (args.action, args.db_path, args.path, args.force) == (
        "backup",
        Path("x.db"),
        Path("out.db"),
        True,
    )


def test_an_action_keeps_the_environment_s_database_unless_a_flag_names_one() -> None:
    env = {"WSGATE_STATE_DB": "/data/env.db", "WSGATE_STATE_DSN": ""}
    assert build_parser(env).parse_args(["state", "migrate"]).db_path == Path("/data/env.db")
    args = build_parser(env).parse_args(["state", "restore", "s.db", "--db-path", "flag.db"])
    assert args.db_path == Path("flag.db")


@pytest.mark.parametrize("action", ["backup", "restore"])
def test_backup_and_restore_need_a_path(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser({}).parse_args(["state", action])
    assert exited.value.code == 2
    assert "PATH" in capsys.readouterr().err


def test_state_help_lists_the_actions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["state", "--help"])
    out = capsys.readouterr().out
    for action in ("serve", "migrate", "backup", "restore"):
        assert f"    {action} " in out


# -- the actions, on files ----------------------------------------------------------------


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    """A backup of a freshly migrated database."""
    db = tmp_path / "source" / "state.sqlite3"
    report = admin.migrate_sqlite(db)
    assert (report.before, report.after) == (0, LATEST_VERSION)
    target = tmp_path / "snapshot.sqlite3"
    admin.backup(StateConfig(db_path=db), target)
    return target


def test_restore_to_a_missing_file_drops_the_sidecars_left_of_it(
    tmp_path: Path, snapshot: Path
) -> None:
    db = tmp_path / "new" / "state.sqlite3"
    db.parent.mkdir()
    stale_wal = db.with_name(db.name + "-wal")
    stale_wal.write_bytes(b"frames of a file that is gone")

    report = admin.restore(StateConfig(db_path=db), snapshot)
    assert report.version == LATEST_VERSION
    assert sorted(p.name for p in db.parent.iterdir()) == ["state.sqlite3"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_restore_keeps_the_permissions_of_the_file_it_replaces(
    tmp_path: Path, snapshot: Path
) -> None:
    db = tmp_path / "data" / "state.sqlite3"
    admin.migrate_sqlite(db)
    db.chmod(0o640)
    admin.restore(StateConfig(db_path=db), snapshot)
    assert db.stat().st_mode & 0o777 == 0o640


def test_restore_of_the_database_onto_itself_is_refused(snapshot: Path) -> None:
    with pytest.raises(admin.AdminError) as refused:
        admin.restore(StateConfig(db_path=snapshot), snapshot)
    assert refused.value.exit_code == admin.EXIT_REFUSED


def test_a_current_file_that_is_not_sqlite_is_left_for_the_operator(
    tmp_path: Path, snapshot: Path
) -> None:
    db = tmp_path / "state.sqlite3"
    db.write_bytes(b"\x00garbage" * 512)
    with pytest.raises(admin.AdminError) as refused:
        admin.restore(StateConfig(db_path=db), snapshot)
    assert "move it away" in str(refused.value)
    assert db.read_bytes() == b"\x00garbage" * 512


def test_backup_of_a_missing_database_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "missing.sqlite3"
    with pytest.raises(admin.AdminError) as failed:
        admin.backup(StateConfig(db_path=db), tmp_path / "out.sqlite3")
    assert failed.value.exit_code == admin.EXIT_FAILED
    assert list(tmp_path.iterdir()) == []


def test_backup_into_a_missing_directory_is_an_error_on_one_line(
    tmp_path: Path, snapshot: Path
) -> None:
    with pytest.raises(admin.AdminError) as failed:
        admin.backup(StateConfig(db_path=snapshot), tmp_path / "no" / "such" / "dir.sqlite3")
    assert failed.value.exit_code == admin.EXIT_FAILED
    assert "\n" not in str(failed.value)
