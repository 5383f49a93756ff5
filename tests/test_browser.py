"""A real browser on the real page: upload, preview the map, generate, see the image.

Drives Debian's Chromium (never a browser downloaded by a test tool) with Playwright's
Python package. Skipped where that Chromium is not installed; CI installs it.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import ROOT
from PIL import Image

from pipelines.engine import size_like
from pipelines.families import FAMILIES

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / ".cache" / "screenshots" / "stencil-page.png"
HOUSE = ROOT / "examples" / "house.png"
# The pixel size of the picture an <img> shows, once it has loaded.
NATURAL_SIZE = "img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(running_app):
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(running_app)
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def test_upload_preview_generate_and_see_the_image(page):
    assert "tiny model" in page.locator("#status").inner_text()

    page.locator("#prompt textarea").fill("a white square on a blue background")
    page.locator("#control_image input[type=file]").set_input_files(str(HOUSE))
    page.locator("#control_type input").click()
    page.get_by_role("option", name="Canny edges").click()

    page.locator("#preview").click()
    page.wait_for_selector("#control_map img")

    page.locator("#generate").click()
    result = page.locator("#results img").first
    result.wait_for()
    # The generated picture itself (not its thumbnail box): the size the engine picks for
    # an upload with no width or height, the upload's aspect at the family's size.
    shown = result.evaluate(NATURAL_SIZE)
    with Image.open(HOUSE) as house:
        expected = size_like(*house.size, long_side=FAMILIES["tiny"].default_size)
    assert tuple(shown) == expected
    assert expected[0] != expected[1]  # the aspect was followed, not the family's square

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


# How an <img> draws its picture: with object-fit "contain" (or "scale-down") all of it, at
# its own aspect, inside the box; with "cover" or "fill" the box's aspect, cropped or bent.
SHOWN_ASPECT = """img => img.decode().then(() => {
  const box = img.getBoundingClientRect();
  const fit = getComputedStyle(img).objectFit;
  const whole = fit === "contain" || fit === "scale-down";
  return [whole ? img.naturalWidth / img.naturalHeight : box.width / box.height,
          img.naturalWidth / img.naturalHeight];
})"""


def test_a_landscape_result_is_shown_whole(page):
    result = page.locator("#results img").first
    result.wait_for()
    shown, picture = result.evaluate(SHOWN_ASPECT)
    assert picture > 1.2  # the house photo's landscape shape (64 x 40)
    assert shown == pytest.approx(picture, rel=0.01)
    # Its caption says the seed and the size it was made at.
    caption = page.locator("#results").inner_text()
    assert "seed " in caption and "64×40" in caption


def _set_steps(page, steps: int) -> None:
    if not page.locator("#steps").is_visible():
        page.get_by_text("Advanced", exact=True).click()
    box = page.locator("#steps input[type=number]")
    box.fill(str(steps))
    box.press("Enter")


BUTTON_READS = "label => document.querySelector('#generate').innerText.trim() === label"


def test_generate_says_it_is_running_shows_a_live_preview_and_comes_back(page):
    from ui import BUSY_LABEL, RUN_LABEL

    _set_steps(page, 100)
    try:
        before = page.locator("#results img").first.get_attribute("src")
        page.locator("#generate").click()
        page.wait_for_function(BUTTON_READS, arg=BUSY_LABEL)
        # The image as it is, every few steps (the app under test previews every 5).
        page.locator("#live_preview img").first.wait_for()
        assert "step" in page.locator("#live_preview").inner_text()
        page.wait_for_function(NEW_RESULT, arg=before)
        page.wait_for_function(BUTTON_READS, arg=RUN_LABEL)
        page.locator("#live_preview").wait_for(state="hidden")

        # Stopped, it comes back too.
        page.locator("#generate").click()
        page.wait_for_function(BUTTON_READS, arg=BUSY_LABEL)
        page.locator("#stop").click()
        page.wait_for_function(BUTTON_READS, arg=RUN_LABEL)
    finally:
        _set_steps(page, 20)


def test_dropping_a_stencil_png_restores_its_settings(page, client):
    gallery, *_ = client.predict(
        prompt="a lighthouse at dusk",
        seed=1234,
        steps=7,
        loras="tiny-ink:0.5",
        api_name="/generate",
    )
    png_path = gallery[0]["image"] if isinstance(gallery[0], dict) else gallery[0]
    page.locator("#recipe_drop input[type=file]").set_input_files(png_path)
    prompt = page.locator("#prompt textarea")
    page.wait_for_function(
        "() => document.querySelector('#prompt textarea').value === 'a lighthouse at dusk'"
    )
    assert prompt.input_value() == "a lighthouse at dusk"
    page.get_by_text("Advanced", exact=True).click()
    assert page.locator("#seed input").input_value() == "1234"
    page.get_by_role("tab", name="LoRAs").click()
    assert page.locator("#loras textarea, #loras input").first.input_value() == "tiny-ink:0.5"


NEW_RESULT = """before => {
  const img = document.querySelector('#results img');
  return img !== null && img.getAttribute('src') !== before;
}"""


def test_ctrl_enter_in_the_prompt_generates(page):
    shown = page.locator("#results img")
    before = shown.first.get_attribute("src") if shown.count() else None
    prompt = page.locator("#prompt textarea")
    prompt.fill("a brick tower, ink")
    prompt.press("Control+Enter")
    page.wait_for_function(NEW_RESULT, arg=before)
    assert prompt.input_value() == "a brick tower, ink"  # no new line typed into it


def _slider_value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input[type=number]").input_value()


def test_size_presets_and_the_swap_button(page):
    if not page.locator("#width").is_visible():
        page.get_by_text("Advanced", exact=True).click()
    size = FAMILIES["tiny"].default_size  # the tiny family's presets, at its own size
    tall = (size, size * 3 // 2)
    page.locator("#size_preset input").click()
    page.get_by_role("option", name=f"{tall[0]} × {tall[1]} (portrait)").click()
    page.wait_for_function(
        "([w, h]) => document.querySelector('#width input[type=number]').value == w"
        " && document.querySelector('#height input[type=number]').value == h",
        arg=list(tall),
    )
    page.locator("#swap_size").click()
    page.wait_for_function(
        "([w, h]) => document.querySelector('#width input[type=number]').value == w"
        " && document.querySelector('#height input[type=number]').value == h",
        arg=[tall[1], tall[0]],
    )
    assert (_slider_value(page, "width"), _slider_value(page, "height")) == (
        str(tall[1]),
        str(tall[0]),
    )


def test_picking_a_lora_sets_its_weight_and_shows_its_tag(page):
    page.get_by_role("tab", name="LoRAs").click()
    page.locator("#lora_1 input").click()
    page.get_by_role("option", name="Tiny neon (rank 8, UNet + text encoder)").click()
    info = page.locator("#lora_1_info")
    info.get_by_text("<lora:tiny-neon:0.8>").wait_for()  # the catalogue's default weight
    assert "CC0-1.0" in info.inner_text()
    assert _slider_value(page, "lora_1_weight") == "0.8"
    # Its thumbnail, drawn with it (loras/previews/tiny-neon.png).
    thumbnail = page.locator("#lora_1_preview img").first
    thumbnail.wait_for()
    assert tuple(thumbnail.evaluate(NATURAL_SIZE)) == (64, 64)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#loras textarea, #loras input')]"
        ".some(box => box.value === 'tiny-neon:0.8')"
    )


def test_a_map_sent_to_control_2_steers_the_next_image(page):
    page.get_by_role("tab", name="Control 1").click()
    if not page.locator("#control_image img").count():
        page.locator("#control_image input[type=file]").set_input_files(str(HOUSE))
        page.locator("#control_image img").first.wait_for()
    page.locator("#control_type input").click()
    page.get_by_role("option", name="Canny edges").click()
    shown = page.locator("#results img")
    before = shown.first.get_attribute("src") if shown.count() else None
    page.locator("#generate").click()
    page.wait_for_function(NEW_RESULT, arg=before)
    page.locator("#maps img").first.wait_for()
    assert page.locator("#maps img").count() == 1

    page.locator("#map_to_2").click()
    page.get_by_role("tab", name="Control 2").click()
    page.locator("#control_image_2 img").first.wait_for()
    page.wait_for_function(
        "() => document.querySelector('#control_type_2 input').value === 'Use my image as the map'"
    )
    before = page.locator("#results img").first.get_attribute("src")
    page.locator("#generate").click()
    page.wait_for_function(NEW_RESULT, arg=before)
    # Both units steered it: the map from unit 1, and the same map, sent, in unit 2.
    page.wait_for_function("() => document.querySelectorAll('#maps img').length === 2")


def test_an_error_stays_beside_the_kept_results_until_the_next_run(page):
    page.locator("#results img").first.wait_for()
    kept = page.locator("#results img").first.get_attribute("src")
    page.get_by_role("tab", name="LoRAs").click()
    loras = page.locator("#loras textarea, #loras input").first
    loras.fill("nope:1")
    page.locator("#generate").click()
    box = page.locator("#run_error")
    box.get_by_text("unknown LoRA 'nope'").wait_for()
    page.wait_for_timeout(11_000)  # past the 10 s a toast stays
    assert box.is_visible() and "Not generated" in box.inner_text()
    assert page.locator("#results img").first.get_attribute("src") == kept

    loras.fill("")
    page.locator("#generate").click()
    page.wait_for_function(NEW_RESULT, arg=kept)
    box.wait_for(state="hidden")


def test_a_history_item_restores_its_settings(page):
    prompt = page.locator("#prompt textarea")
    for text in ("a copper kettle, ink", "a paper boat, ink"):
        before = page.locator("#results img").first.get_attribute("src")
        prompt.fill(text)
        page.locator("#generate").click()
        page.wait_for_function(NEW_RESULT, arg=before)
    page.get_by_text("This session's results", exact=True).click()
    items = page.locator("#history img")
    items.nth(1).wait_for()  # newest first: the kettle is second
    items.nth(1).click()
    page.wait_for_function(
        "() => document.querySelector('#prompt textarea').value === 'a copper kettle, ink'"
    )


def test_the_preview_follows_a_threshold_change(page):
    page.get_by_role("tab", name="Control 1").click()
    if not page.locator("#control_image img").count():
        page.locator("#control_image input[type=file]").set_input_files(str(HOUSE))
    page.locator("#control_type input").click()
    page.get_by_role("option", name="Canny edges").click()
    page.locator("#control_map img").first.wait_for()  # made on its own, no button pressed
    before = page.locator("#control_map img").first.get_attribute("src")
    # Thresholds far below the defaults: many more edges, so a map of other bytes.
    for name, value in (("low", "5"), ("high", "20")):
        box = page.locator(f"#canny_{name}_threshold input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.wait_for_function(
        "before => { const img = document.querySelector('#control_map img');"
        " return img && img.getAttribute('src') !== before; }",
        arg=before,
    )


def test_on_a_phone_tapping_generate_brings_the_results_into_view(page):
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        page.locator("#generate").scroll_into_view_if_needed()
        before = page.locator("#results img").first.get_attribute("src")
        page.locator("#generate").click()
        in_view = (
            "() => { const box = document.querySelector('#results').getBoundingClientRect();"
            " return box.top > -1 && box.top < window.innerHeight; }"
        )
        page.wait_for_function(in_view)
        page.wait_for_function(NEW_RESULT, arg=before)
        assert page.evaluate(in_view)  # and it stays there while the result arrives
        page.screenshot(path=str(SCREENSHOT.with_name("stencil-phone.png")))
    finally:
        page.set_viewport_size({"width": 1400, "height": 1100})
