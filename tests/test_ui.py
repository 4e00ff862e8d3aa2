"""The playground in real Chromium (Debian's, driven by Playwright; no browser download)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_server
from tools.make_model import build

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
    """The demo model, and a tiny FLUX.1 [schnell] that takes other fields."""
    folder = tmp_path_factory.mktemp("ui")
    build("flux-schnell").save_pretrained(folder / "schnell", safe_serialization=True)
    (folder / "models.toml").write_text(
        '[models."models/demo-shapes"]\nsource = "models/demo-shapes"\n'
        f'[models.schnell]\nsource = "{folder / "schnell"}"\ndefault_width = 64\ndefault_height = 64\n'
    )
    process, base = start_server(
        folder,
        MODEL_ID="models/demo-shapes",
        MODELS_FILE=str(folder / "models.toml"),
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


def test_the_form_shows_only_the_fields_the_chosen_model_takes(page):
    visible = lambda: {f: page.is_visible(f"#{f}") for f in ("negative_prompt", "guidance_scale", "prompt_2")}  # noqa: E731
    assert visible() == {"negative_prompt": True, "guidance_scale": True, "prompt_2": False}
    page.select_option("#model", "schnell")
    assert visible() == {"negative_prompt": False, "guidance_scale": False, "prompt_2": True}
    assert page.input_value("#steps") == "4"  # the family's default
    page.fill("#prompt_2", "a red circle, drawn flat")
    page.click("#generate")
    page.wait_for_selector("#results img", timeout=60_000)
    assert "Done in" in page.text_content("#message")
    page.select_option("#model", "models/demo-shapes")
    assert visible() == {"negative_prompt": True, "guidance_scale": True, "prompt_2": False}
    assert page.errors == []


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
