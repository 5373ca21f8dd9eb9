"""txt2img with a ControlNet unit through gradio_client (the page's own /txt2img endpoint) on the tiny SD1.5
checkpoint and a tiny SD1.5 ControlNet: the job runs, its infotext records the unit, and UI mistakes come
back as messages naming the unit."""
from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from webui.io.metadata import parse_infotext  # noqa: E402
from webui.settings import Settings  # noqa: E402

INFOTEXT = 3
CANNY = "tiny_control_sd15_canny"
XL = "tiny_cn_sdxl"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def app(tiny_models, fixture_cache, tmp_path_factory):
    from tests.fixtures.controlnet_factory import place_controlnets
    from tests.fixtures.net import free_port, place
    from webui.app import start

    data = tmp_path_factory.mktemp("ui_controlnet")
    place(tiny_models.sd15, data / "models" / "Stable-diffusion" / "tiny_sd15.safetensors")
    place_controlnets(data / "models" / "ControlNet", fixture_cache, (f"{CANNY}.safetensors", f"{XL}.safetensors"))
    running = start(Settings.for_data_dir(data, port=free_port()))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def control_image(tmp_path_factory):
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), outline=(255, 255, 255), width=3)
    path = tmp_path_factory.mktemp("cn_image") / "circle.png"
    image.save(path)
    return path


BASE = dict(prompt="a ring", negative_prompt="", steps=2, width=64, height=64, cfg_scale=5.0, seed=123,
            n_iter=1, batch_size=1)


def test_model_dropdown_lists_the_checkpoints_controlnets(app, client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/txt2img"]
    params = {p["parameter_name"] for p in api["parameters"]}
    assert {"cn0_enabled", "cn0_image", "cn0_module", "cn0_model", "cn0_weight", "cn2_threshold_b",
            "ip0_model", "ip0_images", "ip1_weight"} <= params
    from webui.ui import control_section

    names = control_section.control_choices(app.ctx, control_section.checkpoint_arch(app.ctx))
    assert CANNY in names and XL not in names  # an SDXL ControlNet is hidden for an SD1.5 checkpoint


def test_txt2img_with_a_canny_unit(app, client, control_image):
    final = client.predict(**BASE, cn0_enabled=True, cn0_image=handle_file(str(control_image)), cn0_module="canny",
                           cn0_model=CANNY, cn0_weight=0.8, cn0_guidance_end=0.9, cn0_control_mode="Balanced",
                           cn0_resize_mode="Crop and Resize", api_name="/txt2img")
    infotext = final[INFOTEXT]
    assert "ControlNet 0" in infotext, infotext
    fields = parse_infotext(infotext)
    assert fields["Seed"] == "123" and fields["Steps"] == "2"
    unit = fields["ControlNet 0"]
    assert "canny" in unit and CANNY in unit, unit
    job = max((j for j in app.ctx.worker.jobs() if j.result is not None), key=lambda j: j.number)
    (sent,) = job.request.controlnet
    assert (sent.module, sent.model, sent.weight, sent.guidance_end) == ("canny", CANNY, 0.8, 0.9)
    assert sent.image.size == (64, 64)


def test_unit_without_image_or_model_is_refused_with_its_number(client, control_image):
    with pytest.raises(Exception, match="ControlNet unit 1 .*has no control image"):
        client.predict(**BASE, cn1_enabled=True, cn1_module="canny", cn1_model=CANNY, api_name="/txt2img")
    with pytest.raises(Exception, match="ControlNet unit 0: ControlNet unit has no model"):
        client.predict(**BASE, cn0_enabled=True, cn0_image=handle_file(str(control_image)), api_name="/txt2img")

