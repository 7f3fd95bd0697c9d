"""Fixtures shared by the test suite."""

from __future__ import annotations

import os

# Before anything imports grpc: the tests make gRPC calls in this process and then fork
# children (nats-server, with a pre-exec hook). gRPC's fork handlers then run in a child
# while other threads are inside gRPC, and may abort it before it execs (seen as
# nats-server exiting with SIGABRT); nothing here needs gRPC after a fork.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import BACKENDS, Backend
from tests.certs import Pki
from tests.harness import Stack, stack_context
from tests.tokens import JWT_ENV
from wsgate.pgserver import PostgresServer, running_postgres

_language_databases = itertools.count(1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A full stack as separate processes: nats-server, state, one worker, one gateway.
    The worker's app verifies tokens of tests/tokens.py (the example's /jwt/echo)."""
    yield from stack_context(tmp_path_factory.mktemp("stack"), worker_env=JWT_ENV)


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
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates made at test time: a trusted CA that issues server and client
    certificates, and an untrusted one for refusals (tests/certs.py)."""
    return Pki(tmp_path_factory.mktemp("pki"))


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


@pytest.fixture(scope="module", params=BACKENDS)
def module_backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Backend:
    """``backend`` for a module's shared fixtures (a stack of processes, say): one fresh
    database on each backend in turn, shared by the module's tests on that backend."""
    tmp_path = tmp_path_factory.mktemp(f"db-{request.param}")
    if request.param == "postgres":
        return Backend("postgres", tmp_path, request.getfixturevalue("postgres_server"))
    return Backend("sqlite", tmp_path)


@pytest.fixture
def language_collated_dsn(postgres_server: PostgresServer) -> str:
    """A DSN of a new, empty database whose default collation is a language's (ICU en-US,
    where "-" and "_" barely count and "B" sorts after "a"), as on most managed PostgreSQL
    servers; the test server's own databases collate bytewise (C), which would hide a text
    column that the schema forgot to make ``COLLATE "C"``."""
    import psycopg

    name = f"lang_{next(_language_databases)}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(
            f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE 'C' "
            "LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        )
    return (
        f"postgresql://{postgres_server.user}@{postgres_server.host}:{postgres_server.port}/{name}"
    )
