"""The LoRA browser tab in Chromium: search by trigger word, filters, bookmark persistence, "Use this LoRA"."""
from __future__ import annotations

import re

import pytest

from tests.browser.conftest import start_app
from tests.fixtures.lora_library_factory import lora_tensors, write_library, write_safetensors

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lora_app(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("lora_browser")
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "tiny_sd15.safetensors").write_bytes(tiny_models.sd15.read_bytes())
    lora_dir = data / "models" / "Lora"
    write_library(lora_dir, 40)  # SD 1.5, SDXL, Pony, Illustrious, NoobAI, SD 2.x in several folders
    write_safetensors(lora_dir / "styles" / "inkwash_style.safetensors", lora_tensors("sd1"),
                      {"modelspec.trigger_phrase": "inkwash brushwork", "ss_base_model_version": "sd_v1"})
    (lora_dir / "broken_lora.safetensors").write_bytes(b"\x00" * 12)
    running = start_app(data)
    yield running
    running.close()


def open_lora_tab(page, app):
    page.goto(app.url)
    page.get_by_role("tab", name="LoRA", exact=True).click()
    page.locator("#lora_grid .lora-card").first.wait_for()
    return page


def card_names(page) -> list[str]:
    return page.locator("#lora_grid .lora-card").evaluate_all("els => els.map(e => e.dataset.name)")


def wait_cards(page, predicate_js: str, timeout: float = 30_000) -> None:
    page.wait_for_function(
        f"() => {{ const c = [...document.querySelectorAll('#lora_grid .lora-card')]; return ({predicate_js}); }}",
        timeout=timeout)


def test_search_finds_a_lora_by_trigger_word(page, lora_app, screenshots):
    open_lora_tab(page, lora_app)
    assert len(card_names(page)) > 1
    page.locator("#lora_search textarea, #lora_search input").first.fill("inkwash brush")
    wait_cards(page, "c.length === 1 && c[0].dataset.name === 'styles/inkwash_style'")
    page.locator("#lora_search textarea, #lora_search input").first.fill("")
    wait_cards(page, "c.length > 1")
    # broken files are listed with a problem badge (unknown arch passes the compatibility filter)
    page.locator("#lora_search textarea, #lora_search input").first.fill("broken_lora")
    wait_cards(page, "c.length === 1 && c[0].querySelector('.lora-badge-problem') !== null")
    page.screenshot(path=str(screenshots / "lora_search.png"), full_page=True)


def test_filters_narrow_the_grid(page, lora_app):
    open_lora_tab(page, lora_app)
    compatible_only = card_names(page)
    # the loaded checkpoint is SD 1.5: only SD 1.5 (and unknown) LoRAs by default
    families = page.locator("#lora_grid .lora-card").evaluate_all("els => els.map(e => e.dataset.family)")
    assert set(families) <= {"SD 1.5", "Unknown"}
    page.locator("#lora_compatible input").uncheck()
    wait_cards(page, f"c.length > {len(compatible_only)}")
    page.locator("#lora_category input").click()
    page.get_by_role("option", name=re.compile("^Style$")).click()
    wait_cards(page, "c.length > 0 && c.every(e => e.dataset.category === 'Style')")
    page.locator("#lora_family input").click()
    page.get_by_role("option", name=re.compile("^SDXL$")).click()
    wait_cards(page, "c.length > 0 && c.every(e => e.dataset.category === 'Style' && e.dataset.family === 'SDXL')")


def test_bookmark_persists_after_reload(page, lora_app):
    open_lora_tab(page, lora_app)
    name = card_names(page)[0]
    page.locator("#lora_card_0 .lora-star").click()
    wait_cards(page, f"c.some(e => e.dataset.name === {name!r} && e.dataset.bookmarked === '1')")
    assert name in lora_app.ctx.lora_library.bookmarks()
    page.reload()
    page.get_by_role("tab", name="LoRA", exact=True).click()
    page.locator("#lora_grid .lora-card").first.wait_for()
    wait_cards(page, f"c.some(e => e.dataset.name === {name!r} && e.dataset.bookmarked === '1')")
    page.locator("#lora_bookmarked_only input").check()
    wait_cards(page, f"c.length === 1 && c[0].dataset.name === {name!r}")


def test_use_this_lora_fills_a_txt2img_slot(page, lora_app, screenshots):
    open_lora_tab(page, lora_app)
    page.locator("#lora_search textarea, #lora_search input").first.fill("inkwash")
    wait_cards(page, "c.length === 1")
    page.locator("#lora_card_0").click()
    page.wait_for_function("() => document.querySelector('#lora_selected textarea, #lora_selected input')"
                           "?.value === 'styles/inkwash_style'")
    page.locator("#lora_detail_info").get_by_text("inkwash brushwork").first.wait_for()
    page.screenshot(path=str(screenshots / "lora_detail.png"), full_page=True)
    page.locator("#lora_use").click()
    page.locator("#txt2img_generate").wait_for(state="visible")
    stack = page.locator("#txt2img_lora_stack")
    if stack.count():  # the txt2img LoRA stack (an accordion, closed by default)
        stack.get_by_role("button").first.click()
        page.locator("#txt2img_lora_0_name input").wait_for()
        page.wait_for_function("() => document.querySelector('#txt2img_lora_0_name input')?.value "
                               "=== 'styles/inkwash_style'")
    else:  # no LoRA stack in this build: the prompt gets the tag
        page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value"
                               ".includes('<lora:styles/inkwash_style:')")
    prompt = page.locator("#txt2img_prompt textarea").input_value()
    assert "inkwash brushwork" in prompt
    page.screenshot(path=str(screenshots / "lora_used.png"), full_page=True)
