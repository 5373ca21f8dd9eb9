"""Extensions in Chromium: the Extensions tab lists the shipped examples and saves enable/disable; the
wildcards accordion appears in txt2img and expands a prompt."""
from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import start_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ext_app(tmp_path_factory):
    running = start_app(tmp_path_factory.mktemp("ext_browser"))
    yield running
    running.close()


def test_wildcards_accordion_expands_a_prompt(page, ext_app, screenshots):
    page.goto(ext_app.url)
    accordion = page.locator("#ext_wildcards_wildcards")
    accordion.wait_for()
    accordion.get_by_text("Wildcards").first.click()
    page.locator("#wildcards_list").get_by_text("__color__").wait_for()
    page.locator("#wildcards_try textarea").fill("a __color__ __animal__")
    page.locator("#wildcards_expand").click()
    page.wait_for_function(
        "() => (document.querySelector('#wildcards_result textarea')?.value || '').startsWith('a ')")
    result = page.locator("#wildcards_result textarea").input_value()
    assert "__" not in result and re.match(r"^a (red|green|blue|golden) ", result), result
    page.screenshot(path=str(screenshots / "extensions_wildcards.png"), full_page=True)


def test_extensions_tab_lists_examples_and_persists_disable(page, ext_app, screenshots):
    try:
        page.goto(ext_app.url)
        page.get_by_role("tab", name="Extensions").click()
        table = page.locator("#extensions_table")
        for name in ("wildcards", "contact_sheet"):
            row = table.locator(f'tr[data-ext="{name}"]')
            row.wait_for()
            assert row.locator(".ext-status").inner_text() == "enabled"
        page.locator("#extensions_warning").get_by_text(re.compile("run Python code")).wait_for()
        page.locator("#extensions_settings").get_by_text("Watermark text").wait_for()
        page.locator("#extensions_enabled").get_by_label("contact_sheet").uncheck()
        page.locator("#extensions_apply").click()
        page.locator("#extensions_status").get_by_text(re.compile("disabled contact_sheet")).wait_for()
        assert table.locator('tr[data-ext="contact_sheet"] .ext-status').inner_text() == "disabled"
        state = ext_app.ctx.settings.data_dir / "extensions.json"
        assert json.loads(state.read_text())["disabled"] == ["contact_sheet"]
        page.screenshot(path=str(screenshots / "extensions_tab.png"), full_page=True)
        page.reload()  # the saved state is what a new page shows (the page's load event fills it in)
        page.get_by_role("tab", name="Extensions").click()
        expect(page.locator("#extensions_enabled").get_by_label("contact_sheet")).not_to_be_checked()
        page.locator("#extensions_enabled").get_by_label("contact_sheet").check()
        page.locator("#extensions_apply").click()
        page.locator("#extensions_status").get_by_text(re.compile("enabled contact_sheet")).wait_for()
        assert json.loads(state.read_text())["disabled"] == []
    finally:
        ext_app.ctx.plugins.set_enabled("contact_sheet", True)  # the next test uses its API route


def test_extension_route_is_mounted_beside_gradio(ext_app):
    import base64
    import io

    import httpx
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    body = {"images": [base64.b64encode(buffer.getvalue()).decode()] * 3}
    answer = httpx.post(ext_app.url.rstrip("/") + "/ext/contact_sheet/grid", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["columns"], answer.json()["rows"]) == (2, 2)
