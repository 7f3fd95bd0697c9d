"""Fixtures shared by the test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import Stack, stack_context


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
