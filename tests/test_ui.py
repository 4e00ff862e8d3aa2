"""The playground in real Chromium (Debian's, driven by Playwright; no browser download)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it", allow_module_level=True)

# `make screenshot` sets this to docs/playground.png to redraw the README's picture; the tests alone
# never write into the tree.
SCREENSHOT = os.environ.get("IMAGEGEN_SCREENSHOT")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    process, base = start_server(
        tmp_path_factory.mktemp("ui"),
        MODEL_ID="models/demo-shapes",
        MAX_STEPS="400",
        RATE_LIMIT_DEFAULT="100000/minute",
    )
    yield base
    process.terminate()
    process.wait(30)


@pytest.fixture
def page(server):
    """A fresh page that records every request leaving the server and every JS error."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        context = browser.new_context(viewport={"width": 390, "height": 900})  # a phone-width screen
        page = context.new_page()
        page.outside, page.errors = [], []
        page.on("request", lambda r: None if r.url.startswith(server) else page.outside.append(r.url))
        page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(f"{server}/ui")
        page.wait_for_selector("#model option", state="attached")
        yield page
        assert page.outside == [], f"the page reached outside the server: {page.outside}"
        context.close()
        browser.close()


def test_generate_shows_progress_then_the_image_at_its_size(page, tmp_path):
    page.fill("#prompt", "a yellow triangle on a purple background")
    page.select_option("#width", "128")
    page.fill("#steps", "80")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#progress:not([hidden])", timeout=30_000)
    assert "step" in page.text_content("#message") or "Queued" in page.text_content("#message")
    page.wait_for_selector("#results img", timeout=60_000)
    size = page.eval_on_selector("#results img", "img => img.complete && [img.naturalWidth, img.naturalHeight]")
    assert size == [128, 64]
    assert "Done in" in page.text_content("#message")
    assert page.locator("#gallery img").count() == 1
    # the README's screenshot: the demo model at its native size
    page.select_option("#width", "64")
    page.fill("#steps", "20")
    page.click("#generate")
    playwright.expect(page.locator("#gallery img")).to_have_count(2, timeout=60_000)
    shot = ROOT / SCREENSHOT if SCREENSHOT else tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert page.errors == []


def test_cancel_a_running_job(page):
    page.fill("#steps", "400")
    page.click("#generate")
    page.wait_for_selector("#progress:not([hidden])", timeout=30_000)
    page.click("#cancel")
    playwright.expect(page.locator("#message")).to_have_text("Cancelled.", timeout=30_000)
    assert page.locator("#results img").count() == 0
    assert page.errors == []


def test_validation_errors_are_shown_and_escaped(page):
    page.fill("#negative_prompt", "<img src=x onerror=alert(1)>")
    page.click("#generate")
    page.wait_for_selector("#message.error")
    message = page.text_content("#message")
    assert "negative_prompt" in message and "markup" in message
    assert page.locator("#message img").count() == 0
    page.fill("#negative_prompt", "")
    page.fill("#prompt", "  ")
    page.keyboard.press("Enter")
    assert page.text_content("#message") == "Enter a prompt first."


def test_keyboard_and_labels(page):
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
                 .filter(el => !(el.labels && el.labels.length) && !el.closest('label'))
                 .map(el => el.id)"""
    )
    assert unlabeled == []
    page.focus("#prompt")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "negative_prompt"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "focus must be visible"
