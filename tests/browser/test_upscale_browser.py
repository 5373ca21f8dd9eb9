"""Upscale tab in Chromium: upload an image, upscale with a tiny ESRGAN model, download the PNG result."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from tests.browser.conftest import start_app
from tests.fixtures.upscaler_factory import write_upscalers

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def upscale_app(tmp_path_factory):
    data = tmp_path_factory.mktemp("ui_upscale")
    write_upscalers(data / "models" / "ESRGAN")
    running = start_app(data)
    yield running
    running.close()


def test_upload_upscale_download(page, upscale_app, tmp_path, screenshots):
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(source)
    page.goto(upscale_app.url)
    page.get_by_role("tab", name="Upscale").click()
    page.locator("#upscale_image input[type=file]").set_input_files(str(source))
    page.locator("#upscale_image img").first.wait_for()
    page.locator("#upscale_upscaler_1 input").click()
    page.get_by_role("option", name=re.compile(r"^2x-TinyCompact$")).click()
    page.locator("#upscale_run").click()
    page.wait_for_function(
        "() => /^Done: 1 image/.test(document.querySelector('#upscale_progress .webui-progress-text')?.textContent || '')",
        timeout=120_000)
    info = page.locator("#upscale_infotext textarea").input_value()
    assert "Postprocess upscaler: 2x-TinyCompact" in info and "Postprocess upscale by: 2" in info
    page.screenshot(path=str(screenshots / "upscale_done.png"), full_page=True)
    page.locator("#upscale_gallery img").first.wait_for()
    page.locator("#upscale_gallery img").first.click()
    with page.expect_download() as download_info:
        page.locator("#upscale_gallery").get_by_label(re.compile("Download", re.I)).first.click()
    target = tmp_path / "downloaded.png"
    download_info.value.save_as(target)
    with Image.open(target) as result:
        assert result.size == (64, 48)
        assert "Postprocess upscaler: 2x-TinyCompact" in result.info.get("parameters", "")
