"""docs/tutorial.md, run: every fenced code block of it is executed against real processes.

Blocks say what they are in their info string:

- ``python app``: server code; all of them, in order, make the module ``tutorial_app``
  that the worker serves;
- ``python client``: a program run on its own (a subprocess) against the running gateway;
  it must exit 0 (the blocks assert what they show);
- ``js browser expect="..."``: run in a page of headless Chromium; it must log ``expect``
  to the console;
- ``sh dev``: the command that starts everything: run as written (``./scripts/dev`` of
  this repository, in the directory holding ``tutorial_app.py``, on a free port), it must
  serve the app (an echo round trip) and stop cleanly on Ctrl-C.

Any other fenced block fails the test: nothing on the page goes unrun. The address the
page uses, ``127.0.0.1:8080``, is replaced by the test gateway's.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import Stack

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "docs" / "tutorial.md"
PAGE_ADDRESS = "127.0.0.1:8080"

_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
_EXPECT = re.compile(r'expect="([^"]*)"')


@dataclass(frozen=True)
class Block:
    kind: str  # "app", "client", "browser"
    code: str
    expect: str = ""
    line: int = 0


def blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``; raises AssertionError for one of no known kind."""
    found = []
    for match in _FENCE.finditer(text):
        info, code = match.group(1).strip(), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        if info == "python app":
            found.append(Block("app", code, line=line))
        elif info == "python client":
            found.append(Block("client", code, line=line))
        elif info == "sh dev":
            found.append(Block("dev", code, line=line))
        elif info.startswith("js browser"):
            expect = _EXPECT.search(info)
            assert expect, f'line {line}: a browser block needs expect="..."'
            found.append(Block("browser", code, expect.group(1), line=line))
        else:
            raise AssertionError(f"line {line}: a code block that no test runs: {info!r}")
    return found


def test_every_fenced_block_is_of_a_kind_the_test_runs() -> None:
    text = TUTORIAL.read_text()
    parsed = blocks(text)
    assert len(parsed) == text.count("\n```") // 2
    assert {block.kind for block in parsed} == {"app", "client", "browser", "dev"}


def _write_app(directory: Path) -> Path:
    app_code = "\n\n".join(b.code for b in blocks(TUTORIAL.read_text()) if b.kind == "app")
    (directory / "tutorial_app.py").write_text(app_code)
    return directory


@pytest.fixture(scope="module")
def tutorial_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    app_dir = _write_app(tmp_path_factory.mktemp("tutorial_app"))
    stack = Stack(tmp_path_factory.mktemp("tutorial_logs"))
    try:
        stack.start_nats()
        stack.start_state()
        stack.start_worker("tutorial_app:app", "--app-dir", str(app_dir))
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()
        stack.dump_logs()


def _address(stack: Stack) -> str:
    return f"127.0.0.1:{stack.gateway_port()}"


def _client_blocks() -> list[Block]:
    return [b for b in blocks(TUTORIAL.read_text()) if b.kind == "client"]


@pytest.mark.parametrize("block", _client_blocks(), ids=lambda b: f"line{b.line}")
def test_client_block_runs(tutorial_stack: Stack, block: Block, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(block.code.replace(PAGE_ADDRESS, _address(tutorial_stack)))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"line {block.line}:\n{done.stdout}\n{done.stderr}"


def _browser_blocks() -> list[Block]:
    return [b for b in blocks(TUTORIAL.read_text()) if b.kind == "browser"]


@pytest.mark.parametrize("block", _browser_blocks(), ids=lambda b: f"line{b.line}")
async def test_browser_block_runs(tutorial_stack: Stack, block: Block) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/bootstrap installs it)")
    from playwright.async_api import async_playwright

    logged: list[str] = []
    seen = asyncio.Event()

    def on_console(message: object) -> None:
        text = str(getattr(message, "text", ""))
        logged.append(text)
        if text == block.expect:
            seen.set()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = await browser.new_page()
            page.on("console", on_console)
            # A page of the gateway's own origin (whatever it shows): Chromium blocks pages
            # of other origins from opening connections to 127.0.0.1.
            await page.goto(f"http://{_address(tutorial_stack)}/")
            # A script element runs the block as a page's own script would.
            await page.add_script_tag(
                content=block.code.replace(PAGE_ADDRESS, _address(tutorial_stack))
            )
            try:
                await asyncio.wait_for(seen.wait(), timeout=30)
            except TimeoutError:
                raise AssertionError(f"line {block.line}: the page logged {logged}") from None
        finally:
            await browser.close()
    assert block.expect in logged


def _dev_blocks() -> list[Block]:
    return [b for b in blocks(TUTORIAL.read_text()) if b.kind == "dev"]


_SERVING = re.compile(r"serving \S+ at (http://127\.0\.0\.1:\d+)")


@pytest.mark.parametrize("block", _dev_blocks(), ids=lambda b: f"line{b.line}")
async def test_the_dev_command_serves_the_tutorial_app(block: Block, tmp_path: Path) -> None:
    import aiohttp

    app_dir = _write_app(tmp_path)
    command = block.code.strip().replace("./scripts/dev", str(ROOT / "scripts" / "dev"))
    env = dict(os.environ, WSGATE_GATEWAY_PORT="0", WSGATE_DATA_DIR=str(tmp_path / "data"))
    process = await asyncio.create_subprocess_exec(
        *shlex.split(command),
        cwd=app_dir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert process.stdout is not None
    output: list[str] = []
    try:
        url = await asyncio.wait_for(_serving_url(process.stdout, output), timeout=60)
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url.replace("http://", "ws://") + "/echo") as ws,
        ):
            await ws.send_str("ping from the tutorial")
            assert (await ws.receive(timeout=20)).data == "ping from the tutorial"
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert await asyncio.wait_for(process.wait(), timeout=60) == 0, output
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def _serving_url(stream: asyncio.StreamReader, output: list[str]) -> str:
    while line := (await stream.readline()).decode(errors="replace"):
        output.append(line)
        found = _SERVING.search(line)
        if found:
            return found.group(1)
    raise AssertionError("wsgate dev ended before serving:\n" + "".join(output))
