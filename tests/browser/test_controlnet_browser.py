"""The ControlNet section in Chromium: upload a control image into unit 0 (which enables it), pick the canny
preprocessor, press Preview and get the edge map of that image."""
from __future__ import annotations

import io
import re

import pytest
from PIL import Image, ImageDraw

from tests.browser.conftest import start_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    from tests.fixtures.net import place

    data = tmp_path_factory.mktemp("ui_controlnet")
    place(tiny_models.sd15, data / "models" / "Stable-diffusion" / "tiny_sd15.safetensors")
    running = start_app(data)
    yield running
    running.close()


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """Black 64x64 with a white square: canny finds exactly its outline."""
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(255, 255, 255))
    path = tmp_path_factory.mktemp("cn_input") / "square.png"
    image.save(path)
    return path


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=re.compile(option)).click()


def test_preview_shows_the_canny_map(page, app, square, screenshots):
    page.goto(app.url)
    page.locator("#txt2img_generate").wait_for()
    page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
    page.locator("#txt2img_controlnet_hint").get_by_text(re.compile("No ControlNet models found")).wait_for()
    enabled = page.locator("#txt2img_cn0_enabled input[type=checkbox]")
    assert not enabled.is_checked()
    page.locator("#txt2img_cn0_image input[type=file]").set_input_files(str(square))
    page.locator("#txt2img_cn0_image img").first.wait_for()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_cn0_enabled input[type=checkbox]').checked")  # upload enables
    choose(page, "txt2img_cn0_module", r"^canny$")
    page.locator("#txt2img_cn0_threshold_a").wait_for(state="visible")
    page.locator("#txt2img_cn0_preview_button").click()
    page.locator("#txt2img_cn0_status").get_by_text(re.compile(r"canny: \d+x\d+")).wait_for(timeout=120_000)
    preview = page.locator("#txt2img_cn0_preview img").first
    preview.wait_for(timeout=120_000)
    data = page.request.get(preview.get_attribute("src")).body()
    edges = Image.open(io.BytesIO(data)).convert("L").resize((64, 64), Image.NEAREST)
    pixels = list(edges.getdata())
    white = {(k % 64, k // 64) for k, v in enumerate(pixels) if v > 127}
    assert white, "the canny map of a white square has edges"
    assert len(white) < 64 * 64 // 4, "only the outline is white, not the square"
    assert all(10 <= x <= 53 and 10 <= y <= 53 for x, y in white), "edges lie on the square's outline"
    assert not any(22 <= x <= 41 and 22 <= y <= 41 for x, y in white), "the inside of the square is flat"
    page.locator("#txt2img_controlnet").screenshot(path=str(screenshots / "txt2img_controlnet_preview.png"))
