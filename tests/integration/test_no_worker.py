"""Without a worker, the gateway cannot answer for the app: the path really goes through one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Stack, stack_context


@pytest.fixture(scope="module")
def bare_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_context(tmp_path_factory.mktemp("bare"), worker=False, state=False)


async def test_upgrade_without_any_worker_is_503(bare_stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(bare_stack.ws_url("/echo"))
    assert refused.value.status == 503


async def test_a_worker_joining_later_serves_the_same_gateway(
    bare_stack: Stack, tmp_path: Path
) -> None:
    bare_stack.start_state(tmp_path / "late.sqlite3")
    bare_stack.start_worker()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(bare_stack.ws_url("/echo")) as ws,
    ):
        await ws.send_str("now there is one")
        assert (await ws.receive(timeout=10)).data == "now there is one"
