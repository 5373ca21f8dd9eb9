"""The ControlNet section in Chromium: upload a control image into unit 0 (which enables it), pick the canny
preprocessor, press Preview and get the edge map of that image; the model list offers the ControlNets of the
checkpoint's architecture, and Generate records the unit in the infotext."""
from __future__ import annotations

import io
import re

import pytest
from PIL import Image, ImageDraw

from tests.browser.conftest import start_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def app(tiny_models, fixture_cache, tmp_path_factory):
    from tests.fixtures.controlnet_factory import place_controlnets
    from tests.fixtures.net import place

    data = tmp_path_factory.mktemp("ui_controlnet")
    place(tiny_models.sd15, data / "models" / "Stable-diffusion" / "tiny_sd15.safetensors")
    place_controlnets(data / "models" / "ControlNet", fixture_cache,
                      ("tiny_control_sd15_canny.safetensors", "tiny_cn_sdxl.safetensors"))
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


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def test_preview_shows_the_canny_map_and_generate_uses_the_unit(page, app, square, screenshots):
    page.goto(app.url)
    page.locator("#txt2img_generate").wait_for()
    page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
    page.locator("#txt2img_ipadapter").get_by_text("Reference images (IP-Adapter)").first.click()
    page.locator("#txt2img_ipadapter_hint").get_by_text(re.compile("No IP-Adapter models found")).wait_for()
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
    edges = Image.open(io.BytesIO(data)).convert("L")
    scale = edges.width / 64  # the map comes at the preprocessor resolution (512): back to input pixels
    white = {(x / scale, y / scale) for y in range(edges.height) for x in range(edges.width)
             if edges.getpixel((x, y)) > 127}
    assert white, "the canny map of a white square has edges"
    assert len(white) < edges.width * edges.height // 4, "only the outline is white, not the square"
    assert all(12 <= x <= 52 and 12 <= y <= 52 for x, y in white), "edges lie on the square's outline"
    assert not any(22 <= x <= 41 and 22 <= y <= 41 for x, y in white), "the inside of the square is flat"
    page.locator("#txt2img_cn0_model input").click()
    offered = page.get_by_role("option").all_inner_texts()
    assert "tiny_control_sd15_canny" in offered and "tiny_cn_sdxl" not in offered, offered  # SD1.5 checkpoint
    page.get_by_role("option", name="tiny_control_sd15_canny").click()
    page.locator("#txt2img_controlnet").screenshot(path=str(screenshots / "txt2img_controlnet_preview.png"))
    page.locator("#txt2img_prompt textarea").fill("a square")
    for elem_id, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 2)):
        set_number(page, elem_id, value)
    page.locator("#txt2img_generate").click()
    page.wait_for_function("() => (document.querySelector('#txt2img_infotext textarea')?.value || '')"
                           ".includes('ControlNet 0')", timeout=240_000)
    info = page.locator("#txt2img_infotext textarea").input_value()
    assert "Module: canny" in info and "tiny_control_sd15_canny" in info, info
