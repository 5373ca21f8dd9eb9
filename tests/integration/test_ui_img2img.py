"""img2img / inpaint tabs of the real app (tiny SD1.5 fixture) through gradio_client, like an API user.

Endpoint outputs (States are not part of the API): progress, preview, gallery, infotext, seed, status.
"""
from __future__ import annotations

import html
import re

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from webui.io.metadata import parse_infotext, read_infotext  # noqa: E402
from webui.settings import Settings  # noqa: E402
from tests.fixtures.net import free_port

PROGRESS, PREVIEW, GALLERY, INFOTEXT, SEED, STATUS = range(6)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def text_of(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup or "")).strip()


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    from webui.app import start

    data = tmp_path_factory.mktemp("ui_img2img")
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "tiny_sd15.safetensors").write_bytes(tiny_models.sd15.read_bytes())
    running = start(Settings.for_data_dir(data, port=free_port()))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def noise_png(path, width, height, seed=3):
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 64x64 noisy photo stand-in (PNG): the size the inpaint tests generate at."""
    return noise_png(tmp_path_factory.mktemp("img2img_src") / "source.png", 64, 64)


def stroke(tmp_path, box=(16, 8, 40, 32), size=(64, 64)):
    """An editor layer: transparent with a painted rectangle (what the brush produces)."""
    layer = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    x0, y0, x1, y1 = box
    layer[y0:y1, x0:x1] = (255, 255, 255, 204)
    path = tmp_path / "layer.png"
    Image.fromarray(layer, mode="RGBA").save(path)
    return path


def editor_value(image_path, layer_paths=()):
    return {"background": handle_file(str(image_path)), "layers": [handle_file(str(p)) for p in layer_paths],
            "composite": handle_file(str(image_path))}


def result_image(final) -> Image.Image:
    with Image.open(final[GALLERY][0]["image"]) as image:
        image.load()
        return image.copy()


def test_endpoints_and_parameter_names(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/img2img", "/img2img_interrupt", "/img2img_skip", "/inpaint", "/inpaint_interrupt",
            "/inpaint_skip"} <= set(api)
    img2img = [p["parameter_name"] for p in api["/img2img"]["parameters"]]
    inpaint = [p["parameter_name"] for p in api["/inpaint"]["parameters"]]
    assert img2img[:12] == ["prompt", "negative_prompt", "steps", "sampler", "schedule", "width", "height",
                            "cfg_scale", "seed", "n_iter", "batch_size", "clip_skip"]
    assert {"image", "resize_mode", "denoising_strength", "image_cfg_scale", "lora_0_name"} <= set(img2img)
    assert {"editor", "mask", "mask_blur", "inpainting_fill", "inpainting_mask_invert", "inpaint_full_res",
            "inpaint_full_res_padding", "denoising_strength"} <= set(inpaint)


def test_img2img_generates_at_the_requested_size(client, tmp_path):
    wide = noise_png(tmp_path / "wide.png", 96, 64)
    final = client.predict(image=handle_file(str(wide)), prompt="a painting", steps=4, width=64, height=72,
                           denoising_strength=0.5, resize_mode="Crop and resize", seed=11, api_name="/img2img")
    assert text_of(final[PROGRESS]).startswith("Done: 1 image"), final[PROGRESS]
    image = result_image(final)
    assert image.size == (64, 72)
    parsed = parse_infotext(final[INFOTEXT])
    assert float(parsed["Denoising strength"]) == 0.5 and parsed["Seed"] == "11" and parsed["Steps"] == "4"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "72")
    assert read_infotext(final[GALLERY][0]["image"]) == final[INFOTEXT]
    assert text_of(final[SEED]) == "Seed: 11"


def test_img2img_without_image_is_a_clear_error(client):
    with pytest.raises(Exception, match="No input image: upload one"):
        client.predict(image=None, prompt="x", steps=2, width=64, height=64, api_name="/img2img")


def test_inpaint_with_a_drawn_mask_keeps_the_unmasked_pixels(client, source, tmp_path):
    layer = stroke(tmp_path, box=(16, 8, 40, 32))
    final = client.predict(editor=editor_value(source, [layer]), mask=None, prompt="a hole", steps=4, width=64,
                           height=64, denoising_strength=1.0, mask_blur=0, inpainting_fill="latent noise",
                           seed=5, api_name="/inpaint")
    assert text_of(final[PROGRESS]).startswith("Done: 1 image"), final[PROGRESS]
    result = np.asarray(result_image(final).convert("RGB"), dtype=np.int16)
    original = np.asarray(Image.open(source).convert("RGB"), dtype=np.int16)
    assert result.shape == original.shape == (64, 64, 3)
    keep = np.ones((64, 64), dtype=bool)
    keep[8:32, 16:40] = False
    assert np.array_equal(result[keep], original[keep])  # whole picture, no blur: unmasked pixels untouched
    assert np.abs(result[10:30, 18:38] - original[10:30, 18:38]).mean() > 5  # the masked area changed
    parsed = parse_infotext(final[INFOTEXT])
    assert float(parsed["Denoising strength"]) == 1.0 and int(parsed["Mask blur"]) == 0
    assert parsed["Masked content"] == "latent noise"


def test_inpaint_with_an_uploaded_mask_only_masked(client, source, tmp_path):
    mask_path = tmp_path / "mask.png"
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (20, 16, 32, 32))  # a corner, at half the image size: stretched to it
    mask.save(mask_path)
    final = client.predict(editor=editor_value(source), mask=handle_file(str(mask_path)), prompt="corner", steps=4,
                           width=64, height=64, denoising_strength=0.8, mask_blur=2, inpaint_full_res="Only masked",
                           inpaint_full_res_padding=8, api_name="/inpaint")
    assert text_of(final[PROGRESS]).startswith("Done: 1 image"), final[PROGRESS]
    image = result_image(final)
    assert image.size == (64, 64)
    parsed = parse_infotext(final[INFOTEXT])
    assert parsed["Inpaint area"] == "Only masked" and parsed["Masked area padding"] == "8"
    assert float(parsed["Denoising strength"]) == 0.8


def test_inpaint_errors_are_messages(client, source):
    with pytest.raises(Exception, match="the mask is empty"):
        client.predict(editor=editor_value(source), prompt="x", steps=2, width=64, height=64, api_name="/inpaint")
    with pytest.raises(Exception, match="Inpaint: no image"):
        client.predict(editor=None, prompt="x", steps=2, width=64, height=64, api_name="/inpaint")
