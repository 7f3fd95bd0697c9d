"""``wsgate state migrate``, ``backup`` and ``restore``, run as a user runs them: as
commands, against real databases and a real state service writing under them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.backends import Backend
from tests.harness import Stack, eventually, stack_context
from wsgate.errors import SchemaOutdated
from wsgate.pgserver import PostgresServer
from wsgate.procs import ChildFailed
from wsgate.stateservice import schema
from wsgate.stateservice.schema import LATEST_VERSION
from wsgate.stateservice.storage import ObjectId, Sql, SqliteStorage
from wsgate.values import decode_value, encode_value
from wsgate.worker.state_client import StateClient

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Ran:
    """What a ``wsgate state ...`` command did."""

    code: int
    out: str
    err: str


def _env() -> dict[str, str]:
    # The test names its database by flags; a WSGATE_STATE_* of the caller must not count.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_STATE_")}
    env["WSGATE_LOG_LEVEL"] = "WARNING"
    return env


def wsgate_state(*args: str) -> Ran:
    """Run ``wsgate state ARGS`` to completion."""
    done = subprocess.run(
        [sys.executable, "-m", "wsgate", "state", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


async def wsgate_state_async(*args: str) -> Ran:
    """Run ``wsgate state ARGS`` while the event loop goes on (writes keep flowing)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wsgate",
        "state",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def one_error_line(ran: Ran, action: str) -> str:
    """The error a failed command printed: exactly one line, naming the action."""
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1, ran.err
    assert lines[0].startswith(f"wsgate state {action}: "), ran.err
    return lines[0]


def storage_flags(backend: Backend) -> list[str]:
    return ["--dsn", backend.dsn] if backend.postgres else ["--db-path", str(backend.db_path)]


@dataclass(frozen=True)
class Execute:
    """A storage operation running one statement (a test's own write)."""

    sql: str
    params: tuple[Any, ...] = ()
    writes = True

    def __call__(self, conn: Sql) -> None:
        conn.execute(self.sql, self.params)


def snapshot_entries(path: Path, namespace: str, name: str) -> dict[str, Any]:
    """One object's entries in a SQLite file, read directly, after checking the file."""
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        (version,) = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        assert version == LATEST_VERSION
        rows = conn.execute(
            "SELECT key, value FROM kv WHERE namespace = ? AND name = ? ORDER BY key",
            (namespace, name),
        ).fetchall()
    return {bytes(key).decode(): decode_value(value) for key, value in rows}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(directory: Path, *expected: str) -> set[str]:
    """Files in ``directory`` other than ``expected`` and the stack's logs."""
    return {p.name for p in directory.iterdir() if not p.name.endswith(".log")} - set(expected)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """nats-server only; each test starts the state service itself (its file is
    ``tmp_path / "state.sqlite3"``)."""
    yield from stack_context(tmp_path, worker=False, state=False, gateway=False)


# -- migrate ------------------------------------------------------------------------------


async def test_migrate_gives_a_fresh_database_the_latest_schema_then_says_it_is_there(
    backend: Backend,
) -> None:
    fresh = backend.storage(migrate=False)
    with pytest.raises(SchemaOutdated):
        await fresh.start()

    first = wsgate_state("migrate", *storage_flags(backend))
    assert first.code == 0, first.err
    assert f"migrated from version 0 to {LATEST_VERSION}" in first.out

    migrated = backend.storage(migrate=False)
    await migrated.start()  # checks the schema: exactly this code's version
    await migrated.close()

    second = wsgate_state("migrate", *storage_flags(backend))
    assert second.code == 0, second.err
    assert f"already at version {LATEST_VERSION}" in second.out


async def test_migrate_refuses_a_schema_newer_than_this_code(backend: Backend) -> None:
    storage = backend.storage(migrate=True)
    async with storage:
        await storage.run(
            Execute(
                "INSERT INTO schema_version (version, description, applied_ms) VALUES (?, ?, ?)",
                (LATEST_VERSION + 1, "from the future", 0),
            )
        )
    ran = wsgate_state("migrate", *storage_flags(backend))
    assert ran.code == 1
    assert ran.out == ""
    line = one_error_line(ran, "migrate")
    assert f"schema is version {LATEST_VERSION + 1}" in line
    assert f"knows up to {LATEST_VERSION}" in line


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_migrate_of_an_unreachable_database_fails_with_one_line(kind: str, tmp_path: Path) -> None:
    if kind == "postgres":
        flags = ["--dsn", f"postgresql://wsgate:s3cret@127.0.0.1:{_closed_port()}/nothing"]
    else:
        (tmp_path / "a-file").write_text("not a directory")
        flags = ["--db-path", str(tmp_path / "a-file" / "state.sqlite3")]
    ran = wsgate_state("migrate", *flags)
    assert ran.code == 1
    line = one_error_line(ran, "migrate")
    assert "cannot migrate" in line
    assert "s3cret" not in line


async def test_a_postgres_state_service_with_migrate_no_refuses_until_wsgate_state_migrate(
    stack: Stack, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    dsn = postgres_server.new_database_schema("state_admin_migrate_no")
    with pytest.raises(ChildFailed):
        stack.start_state(None, "--dsn", dsn, "--migrate", "no")
    log = (tmp_path / "state.log").read_text()
    assert "no wsgate schema" in log
    assert "run `wsgate state migrate`" in log

    ran = wsgate_state("migrate", "--dsn", dsn)
    assert ran.code == 0, ran.err

    state = stack.start_state(None, "--dsn", dsn, "--migrate", "no")
    async with StateClient(state.info["address"]) as client:
        await client.storage("room", "lobby").put("k", "served")
        assert await client.storage("room", "lobby").get("k") == "served"


# -- backup and restore -------------------------------------------------------------------


async def test_backup_under_load_holds_every_write_acknowledged_before_it_and_restores(
    stack: Stack, tmp_path: Path
) -> None:
    db = tmp_path / "state.sqlite3"
    snapshot = tmp_path / "backups" / "snapshot.sqlite3"
    snapshot.parent.mkdir()
    state = stack.start_state()
    acked: list[int] = []
    stop = asyncio.Event()

    async with StateClient(state.info["address"]) as client:
        room = client.storage("load", "writer")

        async def write_until_stopped() -> None:
            # One write at a time: the acknowledged writes are k0..kN, in commit order.
            i = 0
            while not stop.is_set():
                await room.put(f"k{i:06d}", i)
                acked.append(i)
                i += 1

        async def acked_at_least(n: int) -> bool:
            assert not writer.done(), writer
            return len(acked) >= n

        writer = asyncio.create_task(write_until_stopped())
        await eventually(lambda: acked_at_least(100), "writes before the backup")
        acked_before = len(acked)
        ran = await wsgate_state_async("backup", str(snapshot), "--db-path", str(db))
        acked_by_its_end = len(acked)
        # A write begun after the backup ended is certainly not in it.
        await eventually(lambda: acked_at_least(acked_by_its_end + 1), "a write after it")
        stop.set()
        await writer

    assert ran.code == 0, ran.err
    assert str(snapshot) in ran.out
    assert acked_by_its_end > acked_before, "no write was acknowledged while the backup ran"
    entries = snapshot_entries(snapshot, "load", "writer")
    # The database as of one commit: a prefix of the writes, holding all acknowledged
    # before the backup began, and not the ones after it.
    assert entries == {f"k{i:06d}": i for i in range(len(entries))}
    assert acked_before <= len(entries) < len(acked)

    assert state.stop() == 0
    stack.forget(state)
    restored = wsgate_state("restore", str(snapshot), "--db-path", str(db))
    assert restored.code == 0, restored.err
    assert leftovers(tmp_path, "state.sqlite3", "backups", "nats") == set()

    again = stack.start_state()
    async with StateClient(again.info["address"]) as client:
        assert await client.storage("load", "writer").list() == entries


async def test_restore_drops_the_wal_of_a_killed_state_service(
    stack: Stack, tmp_path: Path
) -> None:
    db = tmp_path / "state.sqlite3"
    snapshot = tmp_path / "snapshot.sqlite3"
    state = stack.start_state()
    async with StateClient(state.info["address"]) as client:
        room = client.storage("room", "lobby")
        await room.put("before", 1)
        ran = await wsgate_state_async("backup", str(snapshot), "--db-path", str(db))
        assert ran.code == 0, ran.err
        await room.put_many({f"after{i}": i for i in range(100)})
    stack.kill(state)
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size > 0, "the killed service left no WAL: nothing to test"

    restored = wsgate_state("restore", str(snapshot), "--db-path", str(db))
    assert restored.code == 0, restored.err
    assert leftovers(tmp_path, "state.sqlite3", "snapshot.sqlite3", "nats") == set()

    again = stack.start_state()
    async with StateClient(again.info["address"]) as client:
        assert await client.storage("room", "lobby").list() == {"before": 1}


async def test_restore_refuses_while_the_state_service_runs(stack: Stack, tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    snapshot = tmp_path / "snapshot.sqlite3"
    state = stack.start_state()
    async with StateClient(state.info["address"]) as client:
        room = client.storage("room", "lobby")
        await room.put("k", "old")
        ran = await wsgate_state_async("backup", str(snapshot), "--db-path", str(db))
        assert ran.code == 0, ran.err
        await room.put("k", "current")
        inode = db.stat().st_ino

        # The service is idle: it holds the file open, and no lock of a write.
        refused = await wsgate_state_async("restore", str(snapshot), "--db-path", str(db))
        assert refused.code == 1
        assert "in use" in one_error_line(refused, "restore")
        assert db.stat().st_ino == inode
        assert leftovers(tmp_path, "state.sqlite3", "snapshot.sqlite3", "nats") == {
            "state.sqlite3-wal",
            "state.sqlite3-shm",
        }
        assert await room.get("k") == "current"
        await room.put("k", "still written")
        assert await room.get("k") == "still written"


async def _wsgate_database(path: Path, **entries: Any) -> None:
    """A SQLite file with this code's schema and ``entries`` in object room/lobby."""
    storage = SqliteStorage(path)
    async with storage:
        for key, value in entries.items():
            await storage.put(ObjectId("room", "lobby"), key, encode_value(value))


def _not_a_wsgate_database(kind: str, path: Path) -> str:
    """Make ``path`` a bad restore source of ``kind``; returns what the refusal says."""
    if kind == "garbage":
        path.write_bytes(b"this is not SQLite\n" * 100)
        return "not a SQLite database"
    if kind == "missing":
        return "is not a file"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        if kind == "no wsgate schema":
            conn.execute("CREATE TABLE notes (text TEXT)")
            return "without a wsgate schema"
        assert kind == "newer schema"
        conn.execute("BEGIN")
        schema.migrate(conn, "sqlite", 0)
        conn.execute(
            "INSERT INTO schema_version (version, description, applied_ms) VALUES (?, '', 0)",
            (LATEST_VERSION + 1,),
        )
        conn.execute("COMMIT")
    return f"has schema version {LATEST_VERSION + 1}"


@pytest.mark.parametrize("kind", ["garbage", "missing", "no wsgate schema", "newer schema"])
async def test_restore_of_a_file_that_is_not_a_wsgate_database_is_refused(
    kind: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = data / "state.sqlite3"
    await _wsgate_database(db, k="current")
    before = sha256(db)
    source = tmp_path / "source.sqlite3"
    says = _not_a_wsgate_database(kind, source)

    ran = wsgate_state("restore", str(source), "--db-path", str(db))
    assert ran.code == 1
    assert says in one_error_line(ran, "restore")
    assert sha256(db) == before
    assert leftovers(data, "state.sqlite3") == set()


async def test_backup_to_an_existing_path_is_refused_without_force(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    await _wsgate_database(db, k="v")
    target = tmp_path / "backup.sqlite3"
    target.write_bytes(b"an older backup")

    refused = wsgate_state("backup", str(target), "--db-path", str(db))
    assert refused.code == 2
    assert "--force" in one_error_line(refused, "backup")
    assert target.read_bytes() == b"an older backup"
    assert leftovers(tmp_path, "state.sqlite3", "backup.sqlite3") == set()

    forced = wsgate_state("backup", "--force", str(target), "--db-path", str(db))
    assert forced.code == 0, forced.err
    assert snapshot_entries(target, "room", "lobby") == {"k": "v"}


@pytest.mark.parametrize("action", ["backup", "restore"])
def test_backup_and_restore_refuse_postgres_and_name_its_tools(action: str, tmp_path: Path) -> None:
    path = tmp_path / "snapshot.sqlite3"
    if action == "restore":
        path.write_bytes(b"")
    ran = wsgate_state(action, str(path), "--dsn", "postgresql://wsgate@127.0.0.1:1/nothing")
    assert ran.code == 2
    line = one_error_line(ran, action)
    assert "pg_dump" in line
    assert "point-in-time recovery" in line
    assert path.exists() == (action == "restore")
