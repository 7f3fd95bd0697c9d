"""The two storage backends the state tier runs on, for tests that must hold on both.

A test takes the ``backend`` fixture (parametrized: ``sqlite`` and ``postgres``) and gets
a :class:`Backend`: a fresh, empty database of that kind, reopened as often as the test
likes (:meth:`Backend.storage`), and the flags or settings that point a state service at
it. PostgreSQL is a real server from Debian's packages (:mod:`wsgate.pgserver`), one per
test session; each test gets a schema of its own in it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsgate.pgserver import PostgresServer
from wsgate.stateservice.storage import PostgresStorage, SqliteStorage, Storage

BACKENDS = ("sqlite", "postgres")

_schemas = itertools.count(1)


@dataclass
class Backend:
    """One fresh database: SQLite (a file in ``tmp_path``) or PostgreSQL (a new schema)."""

    name: str
    tmp_path: Path
    pg: PostgresServer | None = None
    _dsn: str = field(default="", repr=False)

    @property
    def postgres(self) -> bool:
        return self.name == "postgres"

    @property
    def db_path(self) -> Path:
        """The SQLite file (SQLite only)."""
        return self.tmp_path / "state.sqlite3"

    @property
    def dsn(self) -> str:
        """The PostgreSQL DSN of this test's schema (PostgreSQL only); made on first use."""
        assert self.pg is not None, "dsn of a SQLite backend"
        if not self._dsn:
            self._dsn = self.pg.new_database_schema(f"t{next(_schemas)}")
        return self._dsn

    def storage(self, **kwargs: Any) -> Storage:
        """A new (unopened) storage on this test's database; every call reaches the same
        data, so closing one and opening the next is a restart."""
        if self.postgres:
            kwargs.setdefault("migrate", True)
            return PostgresStorage(self.dsn, **kwargs)
        return SqliteStorage(self.db_path, **kwargs)

    def state_args(self) -> list[str]:
        """Flags of ``wsgate state`` for this database (schema migrated at start)."""
        if self.postgres:
            return ["--dsn", self.dsn, "--migrate", "yes"]
        return ["--db-path", str(self.db_path)]

    def state_settings(self) -> dict[str, Any]:
        """StateConfig fields for this database (schema migrated at start)."""
        if self.postgres:
            return {"dsn": self.dsn, "migrate": "yes"}
        return {"db_path": self.db_path}
