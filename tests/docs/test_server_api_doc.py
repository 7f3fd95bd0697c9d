"""docs/server-api.md, run: every fenced block of it (``sh api`` with bash, ``python api``
with this Python), in the page's order, against the example app with the API open, with
WSGATE_API, WSGATE_API_KEY and CONNECTION_ID (a chat member named ann) set as the page
says. Each must exit 0 (curl with -f fails on an error status; the Python blocks assert
what they show), and the member sees what they sent it, then the close."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Stack, stack_context
from wsgate.client import ClientClosed, connect

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "server-api.md"
KEY = "doc-key-0123456789abcdef"
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def page_blocks() -> list[tuple[str, str, int]]:
    """(kind, code, line) of every fenced block; AssertionError for one no test runs."""
    found = []
    text = PAGE.read_text()
    for match in _FENCE.finditer(text):
        info, code = match.group(1).strip(), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        assert info in ("sh api", "python api"), f"line {line}: a block no test runs: {info!r}"
        found.append((info.split()[0], code, line))
    return found


def test_every_call_has_a_curl_and_a_python_example() -> None:
    text = PAGE.read_text()
    kinds = [kind for kind, _, _ in page_blocks()]
    assert len(kinds) == text.count("\n```") // 2
    # Each of the six calls both ways, and gRPC's example before the close.
    assert kinds == ["sh", "python"] * 5 + ["python"] + ["sh", "python"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_context(
        tmp_path_factory.mktemp("server-api-doc"),
        app="wsgate.examples.app:app",
        worker_args=("--api-port", "0", "--api-grpc-port", "0", "--api-keys", KEY),
    )


async def test_the_page_runs_as_written(stack: Stack, tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{stack.workers[0].info['api_port']}"
    async with connect(stack.ws_url("/chat/lobby?name=ann")) as ann:
        presence = await ann.receive()  # joined once the room answered
        assert "presence" in str(presence)
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{api}/v1/objects/chat/lobby/connections?tag=ann",
                headers={"Authorization": f"Bearer {KEY}"},
            ) as resp,
        ):
            (member,) = (await resp.json())["connections"]
        env = os.environ | {
            "WSGATE_API": api,
            "WSGATE_API_KEY": KEY,
            "CONNECTION_ID": member["id"],
            "WSGATE_API_GRPC": f"127.0.0.1:{stack.workers[0].info['api_grpc_port']}",
        }
        for kind, code, line in page_blocks():
            script = tmp_path / f"block{line}.{'sh' if kind == 'sh' else 'py'}"
            script.write_text(code)
            command = (
                ["bash", "-euo", "pipefail", str(script)]
                if kind == "sh"
                else [sys.executable, str(script)]
            )
            process = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=60)
            assert process.returncode == 0, f"line {line}:\n{out.decode()}\n{err.decode()}"
        # What the examples sent ann, in order, then their close.
        assert await ann.receive() == "hello from the backend"
        assert await ann.receive() == b"\x00\x01\x02"
        assert "maintenance at noon" in str(await ann.receive())
        with pytest.raises(ClientClosed) as closed:
            await ann.receive()
        assert (closed.value.code, closed.value.reason) == (4000, "closed by the backend")
