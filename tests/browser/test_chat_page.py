"""The chat page (examples/static) in a real browser: Debian's chromium, headless, driven
by Playwright, against a real stack with two gateways serving the page. One page on each
gateway; what is typed in one shows in the other; a reload replays the history; a page
whose gateway goes away reconnects when it is back.

Playwright only drives the chromium that scripts/bootstrap installs with apt-get; it never
downloads a browser (no ``playwright install``). Every wait is Playwright's own (``expect``,
with the bounded timeout set below), never a sleep.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.harness import Stack, stack_context

#: Debian's chromium (WSGATE_CHROMIUM names another binary).
CHROMIUM = os.environ.get("WSGATE_CHROMIUM") or shutil.which("chromium")
STATIC = Path(__file__).resolve().parents[2] / "examples" / "static"
APP = "wsgate.examples.app:app"
#: What a backend shows to post an announcement (the workers' WSGATE_ANNOUNCE_TOKEN).
ANNOUNCE_TOKEN = "announce-" + uuid.uuid4().hex
#: The name a page without ?name= picks.
GUEST = re.compile(r"^guest-\d+$")

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium is not installed (scripts/bootstrap test installs Debian's package)",
    ),
    pytest.mark.timeout(120),
]

# Each expectation waits at most this long: generous for a loaded CI machine, bounded.
expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def chat_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two workers and two gateways, both serving the page: a room spans them."""
    static = ("--static-dir", str(STATIC))
    for stack in stack_context(
        tmp_path_factory.mktemp("chat"),
        app=APP,
        workers=2,
        gateway_args=static,
        worker_env={"WSGATE_ANNOUNCE_TOKEN": ANNOUNCE_TOKEN},
    ):
        stack.start_gateway(*static)
        yield stack


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def room() -> str:
    """A room of the test's own: the module's tests share one state service."""
    return f"room-{uuid.uuid4().hex[:8]}"


OpenChat = Callable[[str, str, str], Awaitable[Page]]


@pytest.fixture
async def open_chat(browser: Browser) -> AsyncIterator[OpenChat]:
    """Opens a page, in a browser context of its own (one user), at a gateway's base URL
    in a room under a name, and waits until it is connected. An error thrown in any of
    these pages fails the test."""
    errors: list[str] = []

    async def open_page(base_url: str, room: str, name: str) -> Page:
        page = await browser.new_page()
        page.on("pageerror", lambda error: errors.append(f"{page.url}: {error}"))
        await page.goto(f"{base_url}/?room={room}&name={name}")
        await expect(page.locator("#status")).to_have_attribute("data-state", "open")
        return page

    yield open_page
    assert errors == [], "errors thrown in the page"


async def send(page: Page, text: str) -> None:
    await page.locator("#input").fill(text)
    await page.locator("#send").click()


async def test_a_message_crosses_gateways_and_a_reload_replays_the_history(
    chat_stack: Stack, open_chat: OpenChat, room: str
) -> None:
    alice = await open_chat(chat_stack.gateways[0].info["url"], room, "alice")
    bob = await open_chat(chat_stack.gateways[1].info["url"], room, "bob")
    await expect(alice.locator("#messages li.join")).to_have_text(["bob joined"])
    await expect(bob.locator("#people")).to_have_text("Here: alice, bob")

    await send(alice, "hello from gateway 0")
    for page in (alice, bob):  # the sender hears its own message, as everyone does
        await expect(page.locator("#messages li.message .text")).to_have_text(
            ["hello from gateway 0"]
        )
        await expect(page.locator("#messages li.message .name")).to_have_text(["alice"])
    await expect(alice.locator("#input")).to_have_value("")
    # Enter in the input sends as the button does.
    await bob.locator("#input").fill("hi from gateway 1")
    await bob.locator("#input").press("Enter")
    await expect(alice.locator("#messages li.message .text")).to_have_text(
        ["hello from gateway 0", "hi from gateway 1"]
    )

    await bob.reload()
    await expect(bob.locator("#status")).to_have_attribute("data-state", "open")
    await expect(bob.locator("#messages li.message.replay .text")).to_have_text(
        ["hello from gateway 0", "hi from gateway 1"]
    )
    await expect(bob.locator("#messages li.message .name")).to_have_text(["alice", "bob"])
    await expect(alice.locator("#messages li.leave")).to_have_text(["bob left"])
    await expect(alice.locator("#messages li.join")).to_have_text(["bob joined", "bob joined"])

    # After the reload, live messages still flow both ways.
    await send(bob, "back again")
    await expect(alice.locator("#messages li.message .text").last).to_have_text("back again")
    await expect(bob.locator("#messages li.message:not(.replay) .text")).to_have_text(
        ["back again"]
    )


async def test_a_backends_announcement_reaches_the_pages_in_the_room(
    chat_stack: Stack, open_chat: OpenChat, room: str
) -> None:
    """A plain POST to the room (its on_request), with the token: every page in the room
    shows it at once, and a page that joins later gets it in the history."""
    alice = await open_chat(chat_stack.gateways[0].info["url"], room, "alice")
    bob = await open_chat(chat_stack.gateways[1].info["url"], room, "bob")
    url = f"{chat_stack.gateways[1].info['url']}/chat/{room}"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data="no token") as resp:
            assert resp.status == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        async with http.post(url, data="wrong token", headers=wrong) as resp:
            assert resp.status == 401
        headers = {"Authorization": f"Bearer {ANNOUNCE_TOKEN}"}
        async with http.post(url, data="<b>maintenance</b> at noon", headers=headers) as resp:
            assert resp.status == 200
            assert await resp.json() == {"room": room, "recipients": 2}
    for page in (alice, bob):
        await expect(page.locator("#messages li.announcement .text")).to_have_text(
            ["<b>maintenance</b> at noon"]  # as text, never markup
        )
    await expect(alice.locator("#messages b")).to_have_count(0)
    carol = await open_chat(chat_stack.gateways[0].info["url"], room, "carol")
    await expect(carol.locator("#messages li.announcement.replay .text")).to_have_text(
        ["<b>maintenance</b> at noon"]
    )


async def test_names_and_texts_are_shown_as_text_never_as_markup(
    chat_stack: Stack, open_chat: OpenChat, room: str
) -> None:
    base = chat_stack.gateways[0].info["url"]
    mallory = await open_chat(base, room, "%3Cb%3Emallory%3C%2Fb%3E")
    markup = "<img src=x onerror=\"document.title='pwned'\">"
    await send(mallory, markup)
    await expect(mallory.locator("#messages li.message .text")).to_have_text([markup])
    await expect(mallory.locator("#messages li.message .name")).to_have_text(["<b>mallory</b>"])
    await expect(mallory.locator("#messages img")).to_have_count(0)


async def test_the_page_has_defaults_and_the_form_changes_room_and_name(
    chat_stack: Stack, browser: Browser, room: str
) -> None:
    page = await browser.new_page()
    await page.goto(chat_stack.gateways[0].info["url"] + "/")
    await expect(page.locator("#status")).to_have_attribute("data-state", "open")
    await expect(page.locator("#room")).to_have_value("lobby")
    await expect(page.locator("#name")).to_have_value(GUEST)

    await page.locator("#room").fill(room)
    await page.locator("#name").fill("carol")
    await page.locator("#join button").click()
    await expect(page).to_have_url(f"{chat_stack.gateways[0].info['url']}/?room={room}&name=carol")
    await expect(page.locator("#status")).to_have_text(f"carol in {room}")
    await expect(page.locator("#messages li.presence")).to_have_text([f"{room} is empty"])


async def test_a_page_reconnects_when_its_gateway_is_back(
    chat_stack: Stack, open_chat: OpenChat, room: str
) -> None:
    alice = await open_chat(chat_stack.gateways[0].info["url"], room, "alice")
    bob = await open_chat(chat_stack.gateways[1].info["url"], room, "bob")
    await send(bob, "before the outage")
    await expect(alice.locator("#messages li.message .text")).to_have_text(["before the outage"])

    # Bob's gateway drains (closing his socket with 1001) and comes back on the same port.
    gateway = chat_stack.gateways[1]
    port = str(chat_stack.gateway_port(1))
    gateway.stop()
    chat_stack.forget(gateway)
    await expect(bob.locator("#status")).to_have_attribute("data-state", "closed")
    await expect(bob.locator("#input")).to_be_disabled()
    await send(alice, "during the outage")
    chat_stack.start_gateway("--static-dir", str(STATIC), "--port", port)

    # Reconnected (backoff doubling from 0.5 s), bob gets the history again: what he
    # missed is added, what he had is not repeated.
    await expect(bob.locator("#status")).to_have_attribute("data-state", "open")
    await expect(bob.locator("#messages li.message .text")).to_have_text(
        ["before the outage", "during the outage"]
    )
    await send(bob, "after the outage")
    await expect(alice.locator("#messages li.message .text")).to_have_text(
        ["before the outage", "during the outage", "after the outage"]
    )
