"""The WebUI in Chromium: pick a model, generate, interrupt, PNG info, empty models folder, phone layout."""
from __future__ import annotations

import re

import pytest

from webui.types import GenerationRequest, JobState

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


def open_ui(page, app):
    page.goto(app.url)
    page.locator("#txt2img_generate").wait_for()
    return page


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's/number's input box and commit it (Gradio reads it on blur)."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def progress_text(page) -> str:
    return page.locator("#txt2img_progress .webui-progress-text").inner_text()


def wait_progress(page, pattern: str, timeout: float = 240_000) -> None:
    page.wait_for_function(
        "p => new RegExp(p).test(document.querySelector('#txt2img_progress .webui-progress-text')?.textContent || '')",
        arg=pattern, timeout=timeout)


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=re.compile(option)).click()


def test_pick_model_generate_and_read_infotext(page, ui_app, screenshots):
    open_ui(page, ui_app)
    # a broken file is listed, marked unusable, and choosing it keeps the old choice
    choose(page, "model_checkpoint", r"^broken.*unusable")
    page.locator("#model_status").get_by_text(re.compile("broken.safetensors cannot be used")).wait_for()
    assert page.locator("#model_checkpoint input").input_value().startswith("tiny_sd15")
    choose(page, "model_checkpoint", r"^tiny_sd15")
    page.locator("#model_status").get_by_text("Loaded tiny_sd15.safetensors").wait_for()

    page.locator("#txt2img_prompt textarea").fill("a red fox in the snow")
    set_number(page, "txt2img_width", 64)
    set_number(page, "txt2img_height", 64)
    set_number(page, "txt2img_steps", 2)
    page.locator("#txt2img_seed input").fill("1234")
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_gallery img").first.wait_for()
    wait_progress(page, r"^Done: 1 image")
    info = page.locator("#txt2img_infotext textarea").input_value()
    assert info.startswith("a red fox in the snow\n")
    assert "Steps: 2" in info and "Seed: 1234" in info and "Size: 64x64" in info
    assert page.locator("#txt2img_seed_used").inner_text().strip() == "Seed: 1234"
    page.screenshot(path=str(screenshots / "txt2img_done.png"), full_page=True)

    # dice -> -1, recycle -> the seed of the shown image
    page.locator("#txt2img_random_seed").click()
    page.wait_for_function("() => document.querySelector('#txt2img_seed input').value === '-1'")
    page.locator("#txt2img_reuse_seed").click()
    page.wait_for_function("() => document.querySelector('#txt2img_seed input').value === '1234'")


def test_live_preview_and_interrupt(page, ui_app, screenshots):
    open_ui(page, ui_app)
    set_number(page, "txt2img_width", 64)
    set_number(page, "txt2img_height", 64)
    set_number(page, "txt2img_steps", 150)
    page.locator("#txt2img_prompt textarea").fill("interrupt me")
    page.locator("#txt2img_generate").click()
    wait_progress(page, r"^Step \d+/150 · Batch 1/1")
    page.locator("#txt2img_preview img").wait_for()  # the live preview is showing
    assert page.locator("#txt2img_generate").is_disabled()  # no double submits from this tab
    page.screenshot(path=str(screenshots / "txt2img_running.png"), full_page=True)
    page.locator("#txt2img_interrupt").click()
    wait_progress(page, r"^Interrupted", timeout=120_000)
    page.wait_for_function("() => !document.querySelector('#txt2img_generate').disabled")
    job = [j for j in ui_app.ctx.worker.jobs() if getattr(j.request, "prompt", None) == "interrupt me"][-1]
    assert job.state is JobState.INTERRUPTED
    assert job.progress.step < 150


def test_bad_size_shows_the_request_error(page, ui_app):
    open_ui(page, ui_app)
    set_number(page, "txt2img_width", 100)
    page.locator("#txt2img_generate").click()
    page.get_by_text("width 100 is not a multiple of 8; use 96 or 104").first.wait_for()
    page.wait_for_function("() => !document.querySelector('#txt2img_generate').disabled")


def test_png_info_sends_parameters_to_txt2img(page, ui_app):
    job = ui_app.ctx.run(GenerationRequest(prompt="from png", negative_prompt="ugly", steps=3, width=64, height=72,
                                           seed=77), timeout=240)
    image = job.result.images[0]
    open_ui(page, ui_app)
    page.get_by_role("tab", name="PNG info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(image.path)
    page.wait_for_function("() => (document.querySelector('#pnginfo_text textarea')?.value || '').includes('Steps:')")
    assert page.locator("#pnginfo_text textarea").input_value() == image.infotext
    page.locator("#pnginfo_send_txt2img").click()
    page.locator("#txt2img_prompt textarea").wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value === 'from png'")
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "ugly"
    assert page.locator("#txt2img_seed input").input_value() == "77"
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "3"
    assert page.locator("#txt2img_height input[type=number]").input_value() == "72"


def test_empty_models_folder_explains_what_to_do(page, empty_app, screenshots):
    open_ui(page, empty_app)
    notice = page.locator("#models_empty_message")
    notice.get_by_text(re.compile("No checkpoint found")).wait_for()
    assert str(empty_app.ctx.settings.ckpt_dir) in notice.inner_text()
    assert "--demo" in notice.inner_text()
    panel = page.locator("#starter_download")
    assert panel.is_visible() and "--demo" in panel.inner_text()
    assert page.locator("#starter_model input").input_value().startswith("Stable Diffusion 1.5")
    page.screenshot(path=str(screenshots / "empty_models.png"), full_page=True)
    page.locator("#txt2img_generate").click()
    page.get_by_text(re.compile("No checkpoint found")).nth(1).wait_for()  # the error toast


def test_phone_layout_stacks(phone, ui_app, screenshots):
    open_ui(phone, ui_app)
    width = phone.viewport_size["width"]
    prompt = phone.locator("#txt2img_prompt").bounding_box()
    generate = phone.locator("#txt2img_generate").bounding_box()
    settings = phone.locator("#txt2img_settings").bounding_box()
    results = phone.locator("#txt2img_results").bounding_box()
    assert generate["y"] >= prompt["y"] + prompt["height"] - 1  # the button sits under the prompt
    assert results["y"] >= settings["y"] + settings["height"] - 1  # results under the settings
    for box in (prompt, generate, settings, results):
        assert box["x"] >= 0 and box["x"] + box["width"] <= width + 1
    phone.screenshot(path=str(screenshots / "phone.png"), full_page=True)


def test_starter_download_fills_an_empty_models_folder(page, starter_app):
    open_ui(page, starter_app)
    page.locator("#models_empty_message").wait_for()
    assert page.locator("#starter_model input").input_value() == "Tiny SD 1.5 (test)"
    page.locator("#starter_download_start").click()
    page.locator("#starter_download_status").get_by_text(re.compile("tiny_starter.safetensors is ready")).wait_for()
    page.locator("#models_empty_message").wait_for(state="hidden")
    page.wait_for_function(
        "() => document.querySelector('#model_checkpoint input').value.startsWith('tiny_starter')")
    assert (starter_app.ctx.settings.ckpt_dir / "tiny_starter.safetensors").is_file()
