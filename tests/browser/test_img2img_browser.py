"""img2img / inpaint tabs in Chromium: upload + generate, draw a mask with the mouse, send-to, phone layout."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.browser.conftest import start_app
from webui.types import GenerationRequest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("ui_img2img_browser")
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "tiny_sd15.safetensors").write_bytes(tiny_models.sd15.read_bytes())
    running = start_app(data)
    yield running
    running.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("img2img_browser_src") / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
    return path


def open_tab(page, app, label: str, ready: str):
    page.goto(app.url)
    page.locator("#txt2img_generate").wait_for()
    tab = page.get_by_role("tab", name=label, exact=True)
    if tab.count() and tab.is_visible():
        tab.click()
    else:  # a narrow screen keeps the other tabs in the "More tabs" menu
        page.get_by_role("button", name="More tabs").click()
        page.locator(".overflow-dropdown button", has_text=label).click()
    page.locator(ready).wait_for()
    return page


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def number(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input[type=number], #{elem_id} input").first.input_value()


def wait_progress(page, section: str, pattern: str, timeout: float = 240_000) -> None:
    page.wait_for_function(
        "([s, p]) => new RegExp(p).test(document.querySelector(`#${s}_progress .webui-progress-text`)?.textContent"
        " || '')", arg=[section, pattern], timeout=timeout)


def last_job(app, prompt: str):
    return [j for j in app.ctx.worker.jobs() if getattr(j.request, "prompt", None) == prompt][-1]


def test_img2img_upload_use_size_and_generate(page, app, source, screenshots):
    open_tab(page, app, "img2img / edit", "#img2img_image")
    page.locator("#img2img_image input[type=file]").set_input_files(str(source))
    page.locator("#img2img_image img").first.wait_for()
    page.locator("#img2img_size_from_image").click()
    page.wait_for_function("() => document.querySelector('#img2img_width input[type=number]').value === '96'")
    assert number(page, "img2img_height") == "64"
    page.locator("#img2img_prompt textarea").fill("img2img in the browser")
    set_number(page, "img2img_steps", 4)
    page.locator("#img2img_seed input").fill("321")
    page.locator("#img2img_generate").click()
    wait_progress(page, "img2img", r"^Done: 1 image")
    page.locator("#img2img_gallery img").first.wait_for()
    info = page.locator("#img2img_infotext textarea").input_value()
    assert info.startswith("img2img in the browser\n")
    assert "Denoising strength: 0.75" in info and "Size: 96x64" in info and "Seed: 321" in info
    request = last_job(app, "img2img in the browser").request
    assert request.init_images[0].size == (96, 64) and request.mask is None
    page.screenshot(path=str(screenshots / "img2img_done.png"), full_page=True)


def test_img2img_without_image_says_so(page, app):
    open_tab(page, app, "img2img / edit", "#img2img_generate")
    page.locator("#img2img_generate").click()
    page.locator("#img2img_action_status").get_by_text("No input image: upload one").wait_for()
    page.wait_for_function("() => !document.querySelector('#img2img_generate').disabled")


def settled_box(page, locator, *, polls: int = 3, every_ms: int = 250, limit_ms: int = 15000) -> dict:
    """The element's bounding box once it has stayed the same for ``polls`` checks in a row (the image editor
    sizes its canvas to the loaded image asynchronously, later on a busy machine)."""
    previous, same, waited = None, 0, 0
    while waited < limit_ms:
        box = locator.bounding_box()
        same = same + 1 if box and box == previous and box["width"] > 0 else 0
        if same >= polls:
            return box
        previous = box
        page.wait_for_timeout(every_ms)
        waited += every_ms
    raise AssertionError(f"the canvas kept changing size for {limit_ms} ms: {previous}")


def draw_stroke(page, editor: str) -> None:
    """Pick the brush and drag across the middle of the editor's canvas, once its size has settled."""
    page.locator(editor).get_by_role("button", name="Brush", exact=True).click()
    canvas = page.locator(f"{editor} canvas").first
    canvas.scroll_into_view_if_needed()
    box = settled_box(page, canvas)
    x, y = box["x"] + box["width"] / 2 - 40, box["y"] + box["height"] / 2 - 10
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 9):
        page.mouse.move(x + 10 * i, y + 3 * i)
    page.mouse.up()


def test_inpaint_draw_a_mask_and_generate(page, app, source, screenshots):
    open_tab(page, app, "Inpaint", "#inpaint_editor")
    page.locator("#inpaint_editor input[type=file]").first.set_input_files(str(source))
    page.locator("#inpaint_editor").get_by_role("button", name="Brush", exact=True).wait_for()
    draw_stroke(page, "#inpaint_editor")
    page.screenshot(path=str(screenshots / "inpaint_mask_drawn.png"))
    page.locator("#inpaint_prompt textarea").fill("inpaint in the browser")
    set_number(page, "inpaint_width", 96)
    set_number(page, "inpaint_height", 64)
    set_number(page, "inpaint_steps", 4)
    set_number(page, "inpaint_mask_blur", 0)
    page.locator("#inpaint_generate").click()
    wait_progress(page, "inpaint", r"^Done: 1 image")
    page.locator("#inpaint_gallery img").first.wait_for()
    info = page.locator("#inpaint_infotext textarea").input_value()
    assert "Mask blur: 0" in info and "Masked content: original" in info and "Size: 96x64" in info
    request = last_job(app, "inpaint in the browser").request
    assert request.init_images[0].size == request.mask.size == (96, 64)
    painted = np.asarray(request.mask) > 127
    assert 0 < painted.mean() < 0.9  # the stroke, not nothing and not everything
    rows, cols = np.nonzero(painted)
    assert 0 < cols.mean() < 96 and 0 < rows.mean() < 64
    page.screenshot(path=str(screenshots / "inpaint_done.png"), full_page=True)


def test_send_a_txt2img_result_to_img2img_and_inpaint(page, app):
    page.goto(app.url)
    page.locator("#txt2img_prompt textarea").fill("send me over")
    set_number(page, "txt2img_width", 64)
    set_number(page, "txt2img_height", 72)
    set_number(page, "txt2img_steps", 2)
    page.locator("#txt2img_seed input").fill("4321")
    page.locator("#txt2img_generate").click()
    wait_progress(page, "txt2img", r"^Done: 1 image")
    page.locator("#txt2img_gallery img").first.wait_for()
    page.locator("#txt2img_send_img2img").click()
    page.locator("#img2img_image img").first.wait_for()
    page.wait_for_function("() => document.querySelector('#img2img_prompt textarea').value === 'send me over'")
    assert page.locator("#img2img_seed input").input_value() == "4321"
    assert (number(page, "img2img_width"), number(page, "img2img_height")) == ("64", "72")
    assert number(page, "img2img_steps") == "2"
    # the image really arrived: generating from it uses a 64x72 input
    page.locator("#img2img_prompt textarea").fill("sent to img2img")
    page.locator("#img2img_generate").click()
    wait_progress(page, "img2img", r"^Done: 1 image")
    assert last_job(app, "sent to img2img").request.init_images[0].size == (64, 72)
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_send_inpaint").click()
    page.locator("#inpaint_editor canvas").first.wait_for()
    page.wait_for_function("() => document.querySelector('#inpaint_prompt textarea').value === 'send me over'")


def test_png_info_sends_image_and_parameters_to_img2img(page, app):
    job = app.ctx.run(GenerationRequest(prompt="from png info", steps=2, width=64, height=64, seed=55), timeout=240)
    open_tab(page, app, "PNG info", "#pnginfo_image")
    page.locator("#pnginfo_image input[type=file]").set_input_files(job.result.images[0].path)
    page.wait_for_function("() => (document.querySelector('#pnginfo_text textarea')?.value || '').includes('Steps:')")
    page.locator("#pnginfo_send_img2img").click()
    page.locator("#img2img_image img").first.wait_for()
    page.wait_for_function("() => document.querySelector('#img2img_prompt textarea').value === 'from png info'")
    assert page.locator("#img2img_seed input").input_value() == "55"


def test_phone_layout_stacks_and_keeps_editor_and_generate_reachable(phone, app, source, screenshots):
    open_tab(phone, app, "Inpaint", "#inpaint_editor")
    width = phone.viewport_size["width"]
    prompt = phone.locator("#inpaint_prompt").bounding_box()
    generate = phone.locator("#inpaint_generate").bounding_box()
    editor = phone.locator("#inpaint_editor").bounding_box()
    settings = phone.locator("#inpaint_settings").bounding_box()
    results = phone.locator("#inpaint_results").bounding_box()
    assert generate["y"] >= prompt["y"] + prompt["height"] - 1  # Generate under the prompt
    assert results["y"] >= settings["y"] + settings["height"] - 1  # results under the settings
    for box in (prompt, generate, editor, settings, results):
        assert box["x"] >= 0 and box["x"] + box["width"] <= width + 1, box
    phone.locator("#inpaint_editor input[type=file]").first.set_input_files(str(source))
    phone.locator("#inpaint_editor").get_by_role("button", name="Brush", exact=True).wait_for()
    canvas = phone.locator("#inpaint_editor canvas").first.bounding_box()
    assert canvas["x"] >= 0 and canvas["x"] + canvas["width"] <= width + 1
    phone.screenshot(path=str(screenshots / "inpaint_phone.png"), full_page=True)
    phone.locator("#inpaint_generate").scroll_into_view_if_needed()
    assert phone.locator("#inpaint_generate").is_visible() and phone.locator("#inpaint_generate").is_enabled()
    open_tab(phone, app, "img2img / edit", "#img2img_image")
    image = phone.locator("#img2img_image").bounding_box()
    assert image["x"] >= 0 and image["x"] + image["width"] <= width + 1
    phone.screenshot(path=str(screenshots / "img2img_phone.png"), full_page=True)
