"""The inpaint tab's "Soft inpainting" accordion in the real app (tiny SD1.5), through gradio_client: the seven
controls are ``/inpaint`` parameters with A1111's defaults, and ticking the box reaches the job (infotext)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from tests.fixtures.net import free_port  # noqa: E402
from webui.io.metadata import parse_infotext  # noqa: E402
from webui.settings import Settings  # noqa: E402
from webui.ui.send_to import parameter_values  # noqa: E402

PROGRESS, PREVIEW, GALLERY, INFOTEXT = range(4)
SOFT_DEFAULTS = {"soft_inpainting": False, "soft_schedule_bias": 1, "soft_preservation_strength": 0.5,
                 "soft_transition_contrast_boost": 4, "soft_mask_influence": 0, "soft_difference_threshold": 0.5,
                 "soft_difference_contrast": 2}
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    from webui.app import start

    data = tmp_path_factory.mktemp("ui_soft_inpaint")
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "tiny_sd15.safetensors").write_bytes(tiny_models.sd15.read_bytes())
    running = start(Settings.for_data_dir(data, port=free_port()))
    try:
        yield Client(running.url, verbose=False)
    finally:
        running.close()


def test_accordion_controls_are_inpaint_parameters_with_a1111_defaults(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    inpaint = {p["parameter_name"]: p for p in api["/inpaint"]["parameters"]}
    assert set(SOFT_DEFAULTS) <= set(inpaint)
    assert {name: inpaint[name]["parameter_default"] for name in SOFT_DEFAULTS} == SOFT_DEFAULTS
    img2img = {p["parameter_name"] for p in api["/img2img"]["parameters"]}
    assert not img2img & set(SOFT_DEFAULTS)  # A1111 shows it for inpainting only


def test_ticking_soft_inpainting_reaches_the_job(client, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    layer = np.zeros((64, 64, 4), dtype=np.uint8)
    layer[16:40, 16:40] = (255, 255, 255, 204)
    Image.fromarray(layer, mode="RGBA").save(tmp_path / "layer.png")
    editor = {"background": handle_file(str(source)), "layers": [handle_file(str(tmp_path / "layer.png"))],
              "composite": handle_file(str(source))}
    final = client.predict(editor=editor, mask=None, prompt="a hole", steps=2, width=64, height=64,
                           denoising_strength=0.8, mask_blur=8, seed=5, soft_inpainting=True,
                           soft_schedule_bias=2, soft_difference_contrast=3, api_name="/inpaint")
    parsed = parse_infotext(final[INFOTEXT])
    assert parsed["Soft inpainting enabled"] == "True", final[PROGRESS]
    assert parsed["Soft inpainting schedule bias"] == "2" and parsed["Soft inpainting difference contrast"] == "3"
    # "send to inpaint" restores the accordion from that infotext
    values = parameter_values(final[INFOTEXT], None)
    assert values["soft_inpainting"] is True and values["soft_schedule_bias"] == 2
    assert values["soft_difference_contrast"] == 3 and values["soft_preservation_strength"] == 0.5
