"""The playground in real Chromium (Debian's, driven by Playwright; no browser download)."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import ROOT, call, start_server
from tools.make_model import build
from tools.shapes import centre, in_corner

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it", allow_module_level=True)

# `make screenshot` sets this to docs/playground.png to redraw the README's picture; the tests alone
# never write into the tree.
SCREENSHOT = os.environ.get("IMAGEGEN_SCREENSHOT")
# A bound on each generation a page waits for, not a pace: on a busy 2-core machine one took over 60 s.
WAIT_MS = 180_000
RESULT = "#results img:not(#preview)"  # a result, not the image forming before it


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
        MODELS=str(folder / "models.toml"),
        MAX_STEPS="400",
        RATE_LIMIT_DEFAULT="100000/minute",
    )
    yield base
    process.terminate()
    process.wait(30)


@pytest.fixture
def page(server, request):
    """A fresh page at a phone's width (or the width a test asks for) that records every request
    leaving the server and every JS error."""
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
        width = getattr(request, "param", 390)  # a phone-width screen unless asked
        context = browser.new_context(viewport={"width": width, "height": 900})
        page = context.new_page()
        page.outside, page.errors = [], []
        own = (server, f"blob:{server}")  # blob: URLs are the page's own images (one the user picked)
        page.on("request", lambda r: None if r.url.startswith(own) else page.outside.append(r.url))
        page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(f"{server}/ui")
        page.wait_for_selector("body[data-ready]", state="attached")  # the defaults are in: a fill now stays
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
    image = page.locator(RESULT)  # the result, not the image forming
    playwright.expect(image).to_have_js_property("naturalWidth", 128, timeout=WAIT_MS)  # fetched, not only shown
    playwright.expect(image).to_have_js_property("naturalHeight", 64)
    assert "Done in" in page.text_content("#message")
    assert page.locator("#gallery img").count() == 1
    # the README's screenshot: the demo model at its native size
    page.select_option("#width", "64")
    page.fill("#steps", "20")
    page.click("#generate")
    playwright.expect(page.locator("#gallery img")).to_have_count(2, timeout=WAIT_MS)
    shot = ROOT / SCREENSHOT if SCREENSHOT else tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert page.errors == []


def test_the_image_forms_in_place_while_the_job_runs(page):
    page.fill("#steps", "400")  # previews at steps 100, 200 and 300
    page.click("#generate")
    forming = page.locator("#results #preview")
    playwright.expect(forming).to_be_visible(timeout=WAIT_MS)
    playwright.expect(forming).to_have_js_property("naturalWidth", 64)  # the demo model's VAE decodes it whole
    assert "forming — step" in page.text_content("#results figcaption")
    playwright.expect(page.locator(RESULT)).to_have_count(1, timeout=WAIT_MS)
    assert page.locator("#preview").count() == 0, "the result takes its place"
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
    page.wait_for_selector(RESULT, timeout=WAIT_MS)
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


# ----- editing -----

BLUE, RED = (40, 80, 220), (220, 40, 40)


def circle_file(tmp_path: Path, fmt: str = "PNG") -> Path:
    """A red circle on blue, as the demo model draws them."""
    image = Image.new("RGB", (64, 64), BLUE)
    ImageDraw.Draw(image).ellipse((20, 20, 44, 44), fill=RED)
    path = tmp_path / f"circle.{fmt.lower()}"
    image.save(path, format=fmt)
    return path


def painted(page: Any) -> int:
    """Mask pixels painted (alpha at least half)."""
    return page.evaluate(
        """() => { const c = document.getElementById('mask');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] >= 128) n++; return n; }"""
    )


def stroke(page: Any, points: list[tuple[int, int]], brush: int = 12) -> None:
    """Drags the mouse over the mask through these image pixels, with that brush size."""
    page.eval_on_selector("#brush", f"el => {{ el.value = {brush}; el.dispatchEvent(new Event('input')); }}")
    page.locator("#mask").scroll_into_view_if_needed()
    box = page.locator("#mask").bounding_box()
    at = lambda x, y: (box["x"] + box["width"] * x / 64, box["y"] + box["height"] * y / 64)  # noqa: E731
    page.mouse.move(*at(*points[0]))
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*at(*point), steps=4)
    page.mouse.up()


def result_pixels(page: Any) -> np.ndarray:
    status, _headers, png = call(page.get_attribute(RESULT, "src"))
    assert status == 200
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_inpaint_a_picked_image_with_the_brush(page, tmp_path):
    page.set_input_files("#image_file", str(circle_file(tmp_path)))
    page.wait_for_selector("#input_pane:not([hidden])")
    assert page.eval_on_selector("#source", "img => img.naturalWidth") == 64
    assert page.input_value("#strength") == "0.75"
    stroke(page, [(24, 32), (40, 32), (40, 24), (24, 40)], brush=16)
    assert painted(page) > 200
    assert page.input_value("#strength") == "1", "a mask repaints from noise unless the user chose"
    page.fill("#prompt", "a yellow square on a blue background")
    page.click("#generate")
    page.wait_for_selector(RESULT, timeout=WAIT_MS)
    assert page.text_content("#results figcaption").startswith("inpaint: a yellow square")
    made = result_pixels(page)
    assert (made[:8] == BLUE).all() and (made[:, :8] == BLUE).all(), "what the brush left is the original's"
    # on a phone the controls, the input and the result stack
    form, stage = page.locator("#form").bounding_box(), page.locator("#stage").bounding_box()
    assert stage["y"] >= form["y"] + form["height"]
    assert page.errors == []


def test_brush_tools_and_editing_a_result_with_outpaint_margins(page):
    page.fill("#steps", "10")
    page.click("#generate")
    page.wait_for_selector("#results .edit", timeout=WAIT_MS)
    page.click("#results .edit")
    page.wait_for_selector("#input_pane:not([hidden])")
    playwright.expect(page.locator("#mask")).to_have_js_property("width", 64)  # no eval under the page's CSP
    page.click("#invert_mask")
    assert painted(page) == 64 * 64
    page.click("#clear_mask")
    assert painted(page) == 0
    stroke(page, [(10, 10), (50, 10)], brush=8)
    before = painted(page)
    page.check("#erase")
    stroke(page, [(10, 10), (30, 10)], brush=8)
    assert 0 < painted(page) < before
    page.fill("#outpaint_left", "16")
    page.click("#generate")
    assert page.text_content("#message") == "Paint a mask or set outpaint margins, not both."
    page.click("#clear_mask")
    page.click("#generate")
    page.wait_for_selector("#results figcaption >> text=outpaint:", timeout=WAIT_MS)
    # the caption shows before the browser has fetched the image: wait for the image itself
    playwright.expect(page.locator(RESULT)).to_have_js_property("naturalWidth", 80, timeout=WAIT_MS)
    page.click("#remove_image")
    assert page.is_hidden("#input_pane") and page.is_hidden("#edit_tools")
    assert page.errors == []


def test_an_upload_the_server_refuses_shows_its_reason(page, tmp_path):
    page.set_input_files("#image_file", str(circle_file(tmp_path, "GIF")))  # a browser shows it; the server will not
    page.wait_for_selector("#input_pane:not([hidden])")
    page.click("#generate")
    page.wait_for_selector("#message.error")
    assert "PNG, JPEG or WebP" in page.text_content("#message")
    page.set_input_files("#image_file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"})
    page.click("#generate")
    playwright.expect(page.locator("#message")).to_contain_text("PNG, JPEG or WebP")


@pytest.mark.parametrize("page", [1280], indirect=True)
def test_on_a_desktop_the_controls_sit_beside_a_large_crisp_view(page, tmp_path):
    page.set_input_files("#image_file", str(circle_file(tmp_path)))
    page.wait_for_selector("#input_pane:not([hidden])")
    stroke(
        page,
        [(14, 14), (50, 14), (50, 24), (14, 24), (14, 34), (50, 34), (50, 44), (14, 44), (14, 50), (50, 50)],
        brush=14,
    )
    page.fill("#prompt", "a yellow square on a blue background")
    page.fill("#steps", "20")
    page.click("#generate")
    page.wait_for_selector(RESULT, timeout=WAIT_MS)
    playwright.expect(page.locator(RESULT)).to_have_js_property("complete", True)
    form, stage = page.locator("#form").bounding_box(), page.locator("#stage").bounding_box()
    assert form["x"] + form["width"] <= stage["x"], "the controls beside the view"
    source, result = page.locator("#source").bounding_box(), page.locator(RESULT).bounding_box()
    assert source["x"] + source["width"] <= result["x"], "the input beside the result"
    assert result["width"] >= 4 * 64, "a 64-pixel result is shown large"
    assert page.eval_on_selector(RESULT, "img => getComputedStyle(img).imageRendering") == "pixelated"
    page.evaluate("window.scrollTo(0, 0)")
    shot = ROOT / SCREENSHOT.replace(".png", "-desktop.png") if SCREENSHOT else tmp_path / "desktop.png"
    page.screenshot(path=str(shot), full_page=True)
    assert page.errors == []


def test_a_lora_adapter_from_the_picker(page):
    playwright.expect(page.locator("#loras_field")).to_be_visible()
    page.select_option("#lora", "corner")
    page.click("#add_lora")
    assert page.text_content("#lora_list").startswith("corner × 1")
    page.fill("#prompt", "a green square on a white background")
    page.fill("#steps", "20")
    page.click("#generate")
    page.wait_for_selector(RESULT, timeout=WAIT_MS)
    assert "<corner:1>" in page.text_content("#results figcaption")
    assert in_corner(result_pixels(page)), "the adapter's style: the shape in the corner"
    page.select_option("#model", "schnell")  # a FLUX.1 model: the demo adapter does not fit it
    assert page.is_hidden("#loras_field")
    assert page.errors == []


def test_hires_fix_then_an_upscale_of_the_result(page):
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "4")
    page.check("#hires_on")
    page.select_option("#hires_upscaler", "demo-shapes-x2")
    page.click("#generate")
    playwright.expect(page.locator("#results figcaption")).to_contain_text("128×128", timeout=WAIT_MS)
    page.click("#results .upscale")
    playwright.expect(page.locator("#results figcaption")).to_contain_text("256×256", timeout=WAIT_MS)
    assert page.text_content("#results figcaption").startswith("upscaled by demo-shapes-x2 — 256×256")
    assert page.errors == []


def test_the_step_cache_offers_the_models_levels_and_is_sent(page):
    assert page.eval_on_selector_all("#step_cache option", "os => os.map(o => o.value)") == ["none", "fast", "faster"]
    assert page.input_value("#step_cache") == "none", "the model's default"
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "12")
    page.select_option("#step_cache", "faster")
    page.click("#generate")
    page.wait_for_selector(RESULT, timeout=WAIT_MS)
    status, _headers, png = call(page.get_attribute(RESULT, "src"))
    assert status == 200 and "Step cache: faster" in Image.open(io.BytesIO(png)).text["parameters"]
    assert page.errors == []


# Every control a user works: none may be cut off or need a sideways scroll.
CONTROLS = "#form input:visible, #form select:visible, #form button:visible, #form label:visible"


@pytest.mark.parametrize("page", [390, 1440], indirect=True)
def test_the_page_fits_the_screen_with_every_control_reachable(page):
    """At a phone's 390 px the page scrolled sideways (a grid whose <select> would not shrink); on
    a 1440x900 desktop the result area, kept in sight, covered the gallery, and Generate sat below
    the fold."""
    width = page.viewport_size["width"]
    page.set_viewport_size({"width": width, "height": 844 if width < 400 else 900})
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for box in (page.locator(CONTROLS).nth(i).bounding_box() for i in range(page.locator(CONTROLS).count())):
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, box
    playwright.expect(page.locator("#results .empty")).to_have_text("No image yet: type a prompt and press Generate.")
    generate = page.locator("#generate").bounding_box()
    assert generate["y"] + generate["height"] <= page.viewport_size["height"], "Generate in sight at the start"
    page.fill("#steps", "2")
    page.click("#generate")
    playwright.expect(page.locator("#gallery img")).to_have_count(1, timeout=WAIT_MS)
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    stage, gallery = page.locator("#stage").bounding_box(), page.locator("#gallery").bounding_box()
    assert stage["y"] + stage["height"] <= gallery["y"] or stage["x"] + stage["width"] <= gallery["x"], "no overlap"
    assert page.errors == []


def test_a_server_that_needs_a_key_says_so_and_loads_its_models_once_given(tmp_path):
    """With API_KEYS on, the page read /models and /loras without the key (401s), kept the adapter
    picker hidden until a reload and said nothing until Generate failed."""
    key = "ui-key-0123456789abcdef"
    process, base = start_server(tmp_path, MODEL_ID="models/demo-shapes", API_KEYS=key)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
            page.goto(f"{base}/ui")
            playwright.expect(page.locator("#message")).to_have_text(
                "This server needs an API key: enter it in the API key field."
            )
            assert page.evaluate("document.activeElement.id") == "api_key"
            page.fill("#api_key", key)
            page.dispatch_event("#api_key", "change")
            playwright.expect(page.locator("#loras_field")).to_be_visible()  # the demo adapter, read with the key
            playwright.expect(page.locator("#message")).to_have_text("")
            page.fill("#steps", "2")
            page.click("#generate")
            page.wait_for_selector(RESULT, timeout=WAIT_MS)
            browser.close()
    finally:
        process.terminate()
        process.wait(30)


def test_a_scribble_on_the_control_pad_steers_the_demo_model(page):
    """An outline drawn in the pad's top left, seen as the map the ControlNet reads, puts the demo
    model's shape there."""
    playwright.expect(page.locator("#control_field")).to_be_visible()
    page.locator("#control_canvas").scroll_into_view_if_needed()
    pad = page.locator("#control_canvas").bounding_box()
    centre_x, centre_y, radius = pad["x"] + pad["width"] / 4, pad["y"] + pad["height"] / 4, pad["width"] * 0.15
    points = [(centre_x + radius * np.cos(a), centre_y + radius * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 40)]
    page.mouse.move(*points[0])
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*point)
    page.mouse.up()
    assert page.is_checked("#control_on"), "drawing turns control on"
    page.click("#control_detect")
    playwright.expect(page.locator("#control_map")).to_be_visible()
    page.fill("#control_end", "0.7")
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "20")
    page.click("#generate")
    page.wait_for_selector(RESULT, timeout=WAIT_MS)
    assert "ControlNet demo-shapes-scribble × 1" in page.text_content("#results figcaption")
    found = centre(result_pixels(page))
    assert found is not None and max(abs(found[0] - 16), abs(found[1] - 16)) <= 8, found
    page.select_option("#model", "schnell")  # a FLUX.1 model: no ControlNet here fits it
    assert page.is_hidden("#control_field")
    assert page.errors == []
