"""The LoRA stack in Chromium: a wrong-arch LoRA is warned about, a LoRA in a slot gets its metadata weight,
its trigger words go into the prompt, and the generated image's infotext records the stack."""
from __future__ import annotations

import re

import pytest

from tests.browser.conftest import start_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lora_app(tiny_models, tmp_path_factory):
    from tests.fixtures.lora_factory import make_lora, tiny_sdxl, write_lora
    from webui.models.tiny import build_components

    data = tmp_path_factory.mktemp("ui_lora")
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "tiny_sd15.safetensors").write_bytes(tiny_models.sd15.read_bytes())
    lora_dir = data / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    comps = build_components("sd15", dtype=__import__("torch").float32)
    write_lora(lora_dir / "tiny_style.safetensors",
               make_lora({"unet": comps["unet"], "te1": comps["text_encoder"]}, rank=4, alpha=4.0, amp=0.5),
               metadata={"ss_network_weight": "0.75", "modelspec.trigger_phrase": "zyx style"})
    write_lora(lora_dir / "xl_only.safetensors", make_lora(tiny_sdxl(), rank=2))
    running = start_app(data)
    yield running
    running.close()


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=re.compile(option)).click()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def test_lora_slot_generate_and_infotext(page, lora_app, screenshots):
    page.goto(lora_app.url)
    page.locator("#txt2img_generate").wait_for()
    page.locator("#txt2img_lora_stack").get_by_text("LoRA", exact=True).first.click()
    choose(page, "txt2img_lora_0_name", r"^xl_only$")
    page.locator("#txt2img_lora_warning").get_by_text(
        re.compile("made for SDXL, current model is SD 1.5: it would do nothing")).wait_for()
    choose(page, "txt2img_lora_0_name", r"^tiny_style$")
    page.locator("#txt2img_lora_warning").get_by_text(re.compile("zyx style")).wait_for()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_lora_0_weight input[type=number]').value === '0.75'")
    page.locator("#txt2img_prompt textarea").fill("a red fox")
    page.locator("#txt2img_lora_0_insert").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value === 'a red fox, zyx style'")
    set_number(page, "txt2img_width", 64)
    set_number(page, "txt2img_height", 64)
    set_number(page, "txt2img_steps", 2)
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_gallery img").first.wait_for(timeout=240_000)
    page.wait_for_function("() => (document.querySelector('#txt2img_infotext textarea')?.value || '')"
                           ".includes('Lora hashes')", timeout=240_000)
    info = page.locator("#txt2img_infotext textarea").input_value()
    assert info.startswith("a red fox, zyx style <lora:tiny_style:0.75>\n")
    assert 'Lora hashes: "tiny_style: ' in info
    page.locator("#txt2img_action_status").get_by_text(re.compile("tiny_style.safetensors: \\d+ of \\d+ layers")).wait_for()
    page.screenshot(path=str(screenshots / "txt2img_lora_stack.png"), full_page=True)
