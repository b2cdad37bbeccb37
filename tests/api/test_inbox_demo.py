"""The inbox demo page (``/inbox/demo``) in a real browser: Debian's Chromium driven by
playwright (never a downloaded browser) against a real API server; a message delivered
by the real in-app channel appears without a reload, its text escaped. Without
``NOTIFIER_API_DEMO`` the page does not exist."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.api.server import ROOT, ApiServer
from tests.pipeline.test_inbox import deliver

SECRET = "d" * 32 + "-demo-tests"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "build" / "screenshots" / "inbox-demo.png"
#: Chromium as the tests run it: headless, nothing fetched from the network by itself.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = '<img src=x onerror="document.title=\'pwned\'"> & <b>bold</b>'
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def demo_server(database: str) -> Iterator[ApiServer]:
    server = ApiServer.start(env={"NOTIFIER_API_DEMO": "true",
                                  "NOTIFIER_API_TOKEN_SECRET": SECRET})
    yield server
    server.stop()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A page of a fresh Chromium (its own user-data dir). No test evaluates a string in
    the page: its Content-Security-Policy forbids eval, as it should."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 900, "height": 640})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def has_inbox_routes(server: ApiServer) -> bool:
    paths = httpx.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]
    return "/v1/recipients/{recipient_id}/inbox" in paths


def test_a_delivered_message_appears_live_and_escaped(demo_server: ApiServer, page: Any):
    """The page goes live, the in-app channel delivers a message whose title is HTML,
    and it shows up at the top without a reload, as text; the unread badge counts it."""
    recipient = f"ada-{uuid.uuid4().hex[:6]}"
    page.goto(f"{demo_server.url}/inbox/demo?recipient={recipient}")
    expect(page.locator("#status")).to_have_text("live", timeout=WAIT_MS)
    badge = int(page.text_content("#badge") or "0")
    start = time.perf_counter()
    [sent] = deliver(recipient, 1, HOSTILE)
    page.wait_for_selector(f"li[data-id='{sent}']", timeout=WAIT_MS)
    elapsed = time.perf_counter() - start
    first = page.locator("#messages li").first
    assert first.get_attribute("data-id") == sent
    assert first.locator(".title").text_content() == f"{HOSTILE} 0"
    assert page.locator("#messages img, #messages b").count() == 0
    assert page.title() != "pwned"
    assert int(page.text_content("#badge") or "0") == badge + 1
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    print(f"\nsend to message on the page: {elapsed * 1000:.0f} ms;"
          f" screenshot: {SCREENSHOT}")


def test_the_page_lists_the_inbox_and_marks_a_message_read(demo_server: ApiServer, page: Any):
    """With the inbox routes: the messages already there, their unread count, and the
    Mark read button, which lowers the count."""
    if not has_inbox_routes(demo_server):
        pytest.skip("this API has no GET /v1/recipients/{id}/inbox (the inbox REST routes)")
    recipient = f"bo-{uuid.uuid4().hex[:6]}"
    sent = deliver(recipient, 3, "Earlier")
    page.goto(f"{demo_server.url}/inbox/demo?recipient={recipient}")
    expect(page.locator("#status")).to_have_text("live", timeout=WAIT_MS)
    assert page.locator("#messages li").count() == 3
    assert page.text_content("#badge") == "3"
    page.click(f"li[data-id='{sent[0]}'] button")
    expect(page.locator("#badge")).to_have_text("2", timeout=WAIT_MS)
    assert page.get_attribute(f"li[data-id='{sent[0]}']", "class") == "read"


def test_the_page_and_its_token_route(demo_server: ApiServer):
    """The page holds no token and allows only its own script (CSP by hash); the token
    route mints one for the recipient asked for and refuses a bad recipient with 422."""
    page = httpx.get(f"{demo_server.url}/inbox/demo", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "v1." not in page.text and "token=" not in page.text.split("<script>")[0]
    policy = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "unsafe" not in policy
    token = httpx.get(f"{demo_server.url}/inbox/demo/token", params={"recipient": "ada"},
                      timeout=30)
    assert token.status_code == 200 and token.json()["token"].startswith("v1.")
    assert token.headers["cache-control"] == "no-store"
    stream = httpx.get(f"{demo_server.url}/v1/recipients/bob/inbox/stream",
                       params={"token": token.json()["token"]}, timeout=30)
    assert stream.status_code == 401  # ada's token reads ada's inbox only
    for bad in ({}, {"recipient": ""}, {"recipient": " "}, {"recipient": "x" * 256}):
        answer = httpx.get(f"{demo_server.url}/inbox/demo/token", params=bad, timeout=30)
        assert answer.status_code == 422, (bad, answer.text)
        assert "recipient" in answer.json()["detail"][0]["field"]


def test_without_the_setting_there_is_no_demo(api_server: ApiServer):
    """NOTIFIER_API_DEMO off (the default): both routes are 404, JSON like every error."""
    for path in ("/inbox/demo", "/inbox/demo/token?recipient=ada"):
        answer = httpx.get(f"{api_server.url}{path}", timeout=30)
        assert answer.status_code == 404 and answer.json()["error"] == "not found"
