"""Fixtures shared by the test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import BACKENDS, Backend
from tests.harness import Stack, stack_context
from wsgate.pgserver import PostgresServer, running_postgres


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A full stack as separate processes: nats-server, state, one worker, one gateway."""
    yield from stack_context(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real nats-server for tests that run roles in-process (a StateServer, say)."""
    from wsgate.procs import start_nats_server

    nats = start_nats_server(tmp_path_factory.mktemp("nats"))
    try:
        yield str(nats.info["url"])
    finally:
        nats.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One real PostgreSQL (Debian's package, installed by scripts/bootstrap test) on a
    free loopback port, for the whole session; tests take schemas of their own in it."""
    with running_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh database on each storage backend in turn: SQLite, then PostgreSQL."""
    if request.param == "postgres":
        return Backend("postgres", tmp_path, request.getfixturevalue("postgres_server"))
    return Backend("sqlite", tmp_path)
