"""A T2I-Adapter as an sd-webui-controlnet ``alwayson_scripts`` unit over HTTP (``--nowebui``, tiny SD1.5,
64x64, 2 steps): ``/controlnet/model_list`` lists it, ``/sdapi/v1/txt2img`` runs it, img2img refuses it."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.fixtures.net import free_port, place
from tests.fixtures.t2i_adapter_factory import place_t2i_adapters
from webui.settings import Settings

SMALL = {"prompt": "a tiny cat", "steps": 2, "width": 64, "height": 64, "seed": 9}


def b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture(scope="module")
def client(fixture_cache, tmp_path_factory):
    from tests.fixtures.factory import write_sd15_checkpoint
    from webui.app import start

    data = tmp_path_factory.mktemp("api_t2i")
    settings = Settings.for_data_dir(data, port=free_port(), api=True, nowebui=True)
    place(fixture_cache.get(write_sd15_checkpoint), settings.ckpt_dir / "tiny_sd15.safetensors")
    place_t2i_adapters(settings.controlnet_dir, fixture_cache, ("t2iadapter_tiny_sd15v2.safetensors",))
    running = start(settings)
    http = httpx.Client(base_url=running.url.rstrip("/"), timeout=300)
    try:
        yield http
    finally:
        http.close()
        running.close()


def test_txt2img_with_an_alwayson_t2i_adapter_unit(client):
    titles = client.get("/controlnet/model_list", params={"update": "true"}).json()["model_list"]
    (title,) = [t for t in titles if t.startswith("t2iadapter_tiny_sd15v2 [")]
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill="black")
    unit = {"enabled": True, "image": b64(image), "module": "none", "model": title, "weight": 1.0,
            "resize_mode": "Crop and Resize", "control_mode": "Balanced", "guidance_end": 1.0}
    scripts = {"controlnet": {"args": [unit, {"enabled": False, "model": "None"}]}}
    plain = client.post("/sdapi/v1/txt2img", json=SMALL)
    controlled = client.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": scripts})
    assert plain.status_code == 200 and controlled.status_code == 200, controlled.text
    result = decoded(controlled.json()["images"][0])
    diff = np.abs(np.asarray(result.convert("RGB"), np.int16) - np.asarray(decoded(
        plain.json()["images"][0]).convert("RGB"), np.int16))
    assert diff.mean() > 1.0, "the adapter changes the image"
    assert "ControlNet 0: \"Module: none, Model: t2iadapter_tiny_sd15v2 [" in result.info["parameters"]
    refused = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64(image)],
                                                      "alwayson_scripts": scripts})
    assert refused.status_code >= 400 and "txt2img only" in refused.text, refused.text
