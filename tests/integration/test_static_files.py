"""The gateway's static files (``--static-dir``): the page is served next to the
WebSocket routes, which behave exactly as without it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Stack, stack_context, start_dev, wait_for_dev_url
from wsgate.config import DevConfig, GatewayConfig
from wsgate.errors import ConfigError

pytestmark = pytest.mark.timeout(90)

EXAMPLES_STATIC = Path(__file__).resolve().parents[2] / "examples" / "static"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("static")
    site = root / "site"
    (site / "sub").mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html><title>home</title>")
    (site / "app.js").write_text("console.log(1)")
    (site / "style.css").write_text("p {}")
    (site / "sub" / "data.json").write_text("{}")
    (site / ".secret").write_text("top-secret")
    (root / "outside.txt").write_text("outside")
    return site


@pytest.fixture(scope="module")
def static_stack(tmp_path_factory: pytest.TempPathFactory, site: Path) -> Iterator[Stack]:
    yield from stack_context(
        tmp_path_factory.mktemp("stack"), gateway_args=("--static-dir", str(site))
    )


async def test_files_are_served_with_their_content_types(static_stack: Stack) -> None:
    expected = {
        "/": ("text/html", "<!doctype html><title>home</title>"),
        "/index.html": ("text/html", "<!doctype html><title>home</title>"),
        "/app.js": ("javascript", "console.log(1)"),
        "/style.css": ("text/css", "p {}"),
        "/sub/data.json": ("application/json", "{}"),
    }
    async with aiohttp.ClientSession() as session:
        for path, (kind, body) in expected.items():
            async with session.get(static_stack.url + path) as resp:
                assert resp.status == 200, path
                assert kind in resp.headers["Content-Type"], path
                assert await resp.text() == body
                etag = resp.headers["ETag"]
            # A reload revalidates: unchanged, it is a 304 without a body.
            headers = {"If-None-Match": etag}
            async with session.get(static_stack.url + path, headers=headers) as resp:
                assert resp.status == 304, path
        async with session.head(static_stack.url + "/app.js") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len("console.log(1)"))


async def test_websocket_routes_are_unchanged_next_to_the_files(static_stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        for method in ("GET", "POST"):
            async with session.request(method, static_stack.url + "/echo") as resp:
                assert resp.status == 400
                assert await resp.text() == "Expected websocket"
        # A POST is never served a file.
        async with session.post(static_stack.url + "/app.js") as resp:
            assert (resp.status, await resp.text()) == (400, "Expected websocket")
        async with session.ws_connect(static_stack.ws_url("/echo")) as ws:
            await ws.send_str("still echoing")
            assert (await ws.receive(timeout=10)).data == "still echoing"
        # An upgrade goes to the app whatever the path, even one that names a file.
        for path in ("/", "/app.js"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(static_stack.ws_url(path))
            assert refused.value.status == 404, path


@pytest.mark.parametrize(
    "target",
    [
        "/sub",
        "/sub/",
        "/.secret",
        "/../outside.txt",
        "/%2e%2e/outside.txt",
        "/sub/%2e%2e/%2e%2e/outside.txt",
        "/..%2foutside.txt",
        "/nothing-here.html",
    ],
)
async def test_no_listing_no_hidden_files_no_way_out(static_stack: Stack, target: str) -> None:
    # Raw bytes on the socket: an HTTP client would normalise these paths before sending.
    status, body = await _raw_get(static_stack.gateway_port(), target)
    assert b"outside" not in body
    assert b"top-secret" not in body
    assert status in (400, 404), (target, status, body)


def test_static_dir_must_be_a_directory(tmp_path: Path) -> None:
    assert GatewayConfig().static_path is None
    assert GatewayConfig(static_dir=str(tmp_path)).static_path == tmp_path
    for kind in (GatewayConfig, DevConfig):
        with pytest.raises(ConfigError, match="static_dir"):
            kind(static_dir=str(tmp_path / "missing"))


def test_dev_serves_the_example_page_by_default(tmp_path: Path) -> None:
    assert DevConfig().static_dir == str(EXAMPLES_STATIC)
    proc = start_dev(tmp_path / "data")
    try:
        url, _, _ = wait_for_dev_url(proc)
        page = asyncio.run(_get_text(url + "/"))
        assert '<ul id="messages"' in page
        assert "new WebSocket(" in asyncio.run(_get_text(url + "/app.js"))
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


async def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200, url
        return await resp.text()
