"""The state service's tables, on SQLite and on PostgreSQL, created and migrated by version.

Each :class:`Migration` is one step of the schema, written once for each dialect; the
database records the steps applied in ``schema_version``. :func:`migrate` applies the
missing ones in one transaction (on PostgreSQL under an advisory lock, so replicas that
start together migrate once); :func:`check` refuses a database that is behind
(:class:`~wsgate.errors.SchemaOutdated`: run ``wsgate state migrate``) or ahead of this
code (:class:`~wsgate.errors.SchemaTooNew`: an older wsgate must not write a newer schema).

The dialects differ only where they must:

- SQLite keeps small tables ``WITHOUT ROWID``; ``members`` is a rowid table on purpose (its
  rows carry attachments of up to 16 KiB, see :mod:`wsgate.stateservice.membership`), and
  PostgreSQL gives it an identity column named ``rowid`` so that the same statements work.
- PostgreSQL has BYTEA for BLOB and BIGINT for SQLite's 64-bit INTEGER (milliseconds since
  1970 do not fit 32 bits), and every text column that is ordered or compared is
  ``COLLATE "C"``: byte order, as SQLite compares, so listing and paging are the same on
  both (and faster than a locale's collation).
- Keys are bytes on both (UTF-8 of the key): BLOB and BYTEA compare bytewise, which is
  Cloudflare's key order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from wsgate.errors import SchemaOutdated, SchemaTooNew


class SqlRunner(Protocol):
    """What migrations need of a connection (sqlite3's and :class:`PgConnection` have it)."""

    def execute(self, sql: str, params: tuple[object, ...] = ...) -> object: ...


@dataclass(frozen=True)
class Migration:
    """One version of the schema: what turns the previous version into it."""

    version: int
    description: str
    sqlite: str
    postgres: str

    def statements(self, dialect: str) -> list[str]:
        """The statements for ``dialect`` ("sqlite" or "postgres"), in order (split at
        semicolons, so comments in the DDL must not hold one)."""
        script = self.sqlite if dialect == "sqlite" else self.postgres
        return [s.strip() for s in script.split(";") if s.strip()]


_V1_SQLITE = """
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    key       BLOB NOT NULL,  -- UTF-8 bytes: BLOBs compare bytewise, giving UTF-8 order
    value     BLOB NOT NULL,  -- a serialized wsgate.v1.Value, stored as received
    PRIMARY KEY (namespace, name, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied (
    key    TEXT PRIMARY KEY,
    count  INTEGER NOT NULL,  -- what the write returned (entries written, keys deleted)
    result BLOB,              -- a transaction's serialized result, if it returned one
    at_ms  INTEGER NOT NULL   -- when it was applied, for pruning
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS applied_at ON applied (at_ms);
CREATE TABLE IF NOT EXISTS members (
    namespace     TEXT NOT NULL,
    name          TEXT NOT NULL,
    connection_id TEXT NOT NULL,
    gateway_id    TEXT NOT NULL,  -- the gateway the connection id names (lease sweeps)
    tags          TEXT NOT NULL,  -- JSON array of the member's tags, in the order given
    attachment    BLOB NOT NULL   -- a serialized wsgate.v1.Value, empty for null
);
CREATE UNIQUE INDEX IF NOT EXISTS members_key ON members (namespace, name, connection_id);
CREATE INDEX IF NOT EXISTS members_by_connection ON members (connection_id);
CREATE INDEX IF NOT EXISTS members_by_gateway ON members (gateway_id);
CREATE TABLE IF NOT EXISTS member_tags (
    namespace     TEXT NOT NULL,
    name          TEXT NOT NULL,
    tag           TEXT NOT NULL,
    connection_id TEXT NOT NULL,
    PRIMARY KEY (namespace, name, tag, connection_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS departed (
    connection_id TEXT PRIMARY KEY,
    at_ms         INTEGER NOT NULL  -- when it left everything, for pruning
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS departed_at ON departed (at_ms);
CREATE TABLE IF NOT EXISTS alarms (
    namespace    TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    scheduled_ms INTEGER NOT NULL,  -- the time SetAlarm asked for (what GetAlarm reports)
    at_ms        INTEGER NOT NULL,  -- the next try: scheduled_ms, later a retry's time
    retry_count  INTEGER NOT NULL,  -- failed runs of the handler in this firing
    backoff_step INTEGER NOT NULL,  -- tries that did not succeed (failed or undelivered)
    firing_id    TEXT    NOT NULL,  -- drawn by each SetAlarm, kept across retries
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alarms_at ON alarms (at_ms);
CREATE TABLE IF NOT EXISTS leases (
    namespace TEXT    NOT NULL,
    name      TEXT    NOT NULL,
    epoch     INTEGER NOT NULL,  -- the last epoch granted (or revoked), only grows
    holder    TEXT    NOT NULL,  -- the worker holding the lease, empty when none does
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS turns (
    key      TEXT    PRIMARY KEY,  -- a connection id, or alarm:<firing id>
    sequence INTEGER NOT NULL,     -- the last sequence committed under the key
    epoch    INTEGER NOT NULL,     -- the epoch of the activation that committed it
    outcome  BLOB    NOT NULL,     -- its serialized wsgate.v1.TurnOutcome
    at_ms    INTEGER NOT NULL      -- when, for pruning
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS turns_at ON turns (at_ms)
"""

_V1_POSTGRES = """
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT COLLATE "C" NOT NULL,
    name      TEXT COLLATE "C" NOT NULL,
    key       BYTEA NOT NULL,
    value     BYTEA NOT NULL,
    PRIMARY KEY (namespace, name, key)
);
CREATE TABLE IF NOT EXISTS applied (
    key    TEXT COLLATE "C" PRIMARY KEY,
    count  BIGINT NOT NULL,
    result BYTEA,
    at_ms  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS applied_at ON applied (at_ms);
CREATE TABLE IF NOT EXISTS members (
    rowid         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace     TEXT COLLATE "C" NOT NULL,
    name          TEXT COLLATE "C" NOT NULL,
    connection_id TEXT COLLATE "C" NOT NULL,
    gateway_id    TEXT COLLATE "C" NOT NULL,
    tags          TEXT NOT NULL,
    attachment    BYTEA NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS members_key ON members (namespace, name, connection_id);
CREATE INDEX IF NOT EXISTS members_by_connection ON members (connection_id);
CREATE INDEX IF NOT EXISTS members_by_gateway ON members (gateway_id);
CREATE TABLE IF NOT EXISTS member_tags (
    namespace     TEXT COLLATE "C" NOT NULL,
    name          TEXT COLLATE "C" NOT NULL,
    tag           TEXT COLLATE "C" NOT NULL,
    connection_id TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (namespace, name, tag, connection_id)
);
CREATE TABLE IF NOT EXISTS departed (
    connection_id TEXT COLLATE "C" PRIMARY KEY,
    at_ms         BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS departed_at ON departed (at_ms);
CREATE TABLE IF NOT EXISTS alarms (
    namespace    TEXT COLLATE "C" NOT NULL,
    name         TEXT COLLATE "C" NOT NULL,
    scheduled_ms BIGINT NOT NULL,
    at_ms        BIGINT NOT NULL,
    retry_count  BIGINT NOT NULL,
    backoff_step BIGINT NOT NULL,
    firing_id    TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE INDEX IF NOT EXISTS alarms_at ON alarms (at_ms, namespace, name);
CREATE TABLE IF NOT EXISTS leases (
    namespace TEXT COLLATE "C" NOT NULL,
    name      TEXT COLLATE "C" NOT NULL,
    epoch     BIGINT NOT NULL,
    holder    TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS turns (
    key      TEXT COLLATE "C" PRIMARY KEY,
    sequence BIGINT NOT NULL,
    epoch    BIGINT NOT NULL,
    outcome  BYTEA NOT NULL,
    at_ms    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_at ON turns (at_ms)
"""

# Version 2: what each object holds, kept up to date by every write in the write's own
# transaction, so a quota is checked without scanning the object (stateservice/quotas.py).
# An object without a row holds nothing; a row that drops to nothing is deleted. Usage of
# the objects already stored is computed here, once.
_V2_SQLITE = """
CREATE TABLE IF NOT EXISTS object_usage (
    namespace TEXT    NOT NULL,
    name      TEXT    NOT NULL,
    keys      INTEGER NOT NULL,  -- rows in kv
    bytes     INTEGER NOT NULL,  -- their keys' and values' lengths, summed
    members   INTEGER NOT NULL,  -- rows in members
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
INSERT INTO object_usage (namespace, name, keys, bytes, members)
    SELECT namespace, name, COUNT(*), SUM(length(key) + length(value)), 0
    FROM kv WHERE true GROUP BY namespace, name;
INSERT INTO object_usage (namespace, name, keys, bytes, members)
    SELECT namespace, name, 0, 0, COUNT(*) FROM members WHERE true GROUP BY namespace, name
    ON CONFLICT (namespace, name) DO UPDATE SET members = excluded.members
"""

_V2_POSTGRES = """
CREATE TABLE IF NOT EXISTS object_usage (
    namespace TEXT COLLATE "C" NOT NULL,
    name      TEXT COLLATE "C" NOT NULL,
    keys      BIGINT NOT NULL,
    bytes     BIGINT NOT NULL,
    members   BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);
INSERT INTO object_usage (namespace, name, keys, bytes, members)
    SELECT namespace, name, COUNT(*), SUM(octet_length(key) + octet_length(value)), 0
    FROM kv GROUP BY namespace, name;
INSERT INTO object_usage (namespace, name, keys, bytes, members)
    SELECT namespace, name, 0, 0, COUNT(*) FROM members GROUP BY namespace, name
    ON CONFLICT (namespace, name) DO UPDATE SET members = excluded.members
"""

#: Every version of the schema, oldest first. Append; never edit a released one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "objects' keys, idempotency keys, members, alarms, leases and turn records",
        _V1_SQLITE,
        _V1_POSTGRES,
    ),
    Migration(
        2,
        "each object's usage (keys, bytes, members) for quotas",
        _V2_SQLITE,
        _V2_POSTGRES,
    ),
)

#: The version this code reads and writes.
LATEST_VERSION = MIGRATIONS[-1].version

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_ms BIGINT NOT NULL)"
)

#: The advisory lock PostgreSQL replicas take to migrate one at a time (any constant).
_MIGRATION_LOCK = 0x77736761  # "wsga"


def current_version(conn: SqlRunner) -> int:
    """The highest version applied (0: none, or a database made before versions)."""
    try:
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()  # type: ignore[attr-defined]
    except Exception:  # no schema_version table: a database made before versions
        return 0
    return int(row[0]) if row and row[0] is not None else 0


def migrate(conn: SqlRunner, dialect: str, now_ms: int) -> list[int]:
    """Apply the missing migrations, inside the caller's transaction; returns the versions
    applied. Raises SchemaTooNew if the database is ahead of this code."""
    if dialect == "postgres":
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
    conn.execute(_VERSION_TABLE)
    have = current_version(conn)
    if have > LATEST_VERSION:
        raise SchemaTooNew(
            f"the database's schema is version {have}; this wsgate knows up to {LATEST_VERSION}"
        )
    applied: list[int] = []
    for migration in MIGRATIONS:
        if migration.version <= have:
            continue
        for statement in migration.statements(dialect):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (version, description, applied_ms) VALUES (?, ?, ?)",
            (migration.version, migration.description, now_ms),
        )
        applied.append(migration.version)
    return applied


def check(conn: SqlRunner) -> None:
    """Raise SchemaOutdated (or SchemaTooNew) unless the database is at LATEST_VERSION."""
    have = current_version(conn)
    if have < LATEST_VERSION:
        found = "no wsgate schema" if have <= 0 else f"schema version {have}"
        raise SchemaOutdated(
            f"the database has {found}; this wsgate needs version {LATEST_VERSION}: "
            "run `wsgate state migrate` (or start the state service with --migrate yes)"
        )
    if have > LATEST_VERSION:
        raise SchemaTooNew(
            f"the database's schema is version {have}; this wsgate knows up to {LATEST_VERSION}"
        )
