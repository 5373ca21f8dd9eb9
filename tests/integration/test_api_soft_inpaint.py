"""Soft inpainting over HTTP: A1111's ``alwayson_scripts["Soft Inpainting"]`` on ``/sdapi/v1/img2img``
against a launched ``--nowebui`` app (tiny SD1.5, 128x128, 2 steps)."""
from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.fixtures.net import free_port, place
from webui.settings import Settings

SIZE = 128
SMALL = {"prompt": "a tiny cat", "steps": 2, "width": SIZE, "height": SIZE, "seed": 5, "denoising_strength": 0.9,
         "inpaint_full_res": False, "inpainting_fill": 1, "mask_blur": 4}
BOX = (8, 8, 31, 31)
SCRIPT = "Soft Inpainting"  # A1111's title; matched in any case


@pytest.fixture(scope="module")
def server(fixture_cache, tmp_path_factory):
    from tests.fixtures.factory import write_sd15_checkpoint
    from webui.app import start

    data = tmp_path_factory.mktemp("api_soft_inpaint")
    settings = Settings.for_data_dir(data, port=free_port(), api=True, nowebui=True)
    place(fixture_cache.get(write_sd15_checkpoint), settings.ckpt_dir / "tiny_sd15.safetensors")
    running = start(settings)
    client = httpx.Client(base_url=running.url.rstrip("/"), timeout=300)
    try:
        yield SimpleNamespace(running=running, client=client)
    finally:
        client.close()
        running.close()


def b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def source() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (30, 60, 90))
    draw = ImageDraw.Draw(image)
    draw.rectangle((12, 12, 40, 40), fill="white")
    draw.ellipse((70, 60, 110, 100), fill=(200, 40, 40))
    return image


def mask() -> Image.Image:
    image = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(image).rectangle(BOX, fill=255)
    return image


def post(server, **fields) -> httpx.Response:
    return server.client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64(source())],
                                                         "mask": b64(mask()), **fields})


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.int16)


def test_soft_inpainting_script_runs_writes_infotext_and_keeps_far_pixels(server):
    response = post(server, alwayson_scripts={SCRIPT: {"args": [True, 1.5, 0.75, 8, 0.25, 1, 3]}})
    assert response.status_code == 200, response.text
    body = response.json()
    infotext = json.loads(body["info"])["infotexts"][0]
    assert ("Soft inpainting enabled: True, Soft inpainting schedule bias: 1.5, Soft inpainting preservation "
            "strength: 0.75, Soft inpainting transition contrast boost: 8, Soft inpainting mask influence: 0.25, "
            "Soft inpainting difference threshold: 1, Soft inpainting difference contrast: 3") in infotext
    result, original = pixels(body["images"][0]), np.asarray(source(), dtype=np.int16)
    assert np.array_equal(result[96:, :], original[96:, :])  # more than 64 px below the mask: untouched
    assert np.array_equal(result[:, 96:], original[:, 96:])
    plain = post(server)
    assert plain.status_code == 200, plain.text
    assert "Soft inpainting" not in json.loads(plain.json()["info"])["infotexts"][0]
    assert not np.array_equal(pixels(plain.json()["images"][0]), result)  # the script changed the image


def test_disabled_script_is_plain_inpainting(server):
    off = post(server, alwayson_scripts={"soft inpainting": {"args": [False, 1, 0.5, 4, 0, 0.5, 2]}})
    plain = post(server)
    assert off.status_code == 200 and plain.status_code == 200
    assert off.json()["images"][0] == plain.json()["images"][0]


def test_infotext_field_enables_it_too(server):
    response = post(server, infotext="a tiny cat\nSteps: 2, Soft inpainting enabled: True, "
                                     "Soft inpainting difference threshold: 2")
    assert response.status_code == 200, response.text
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert "Soft inpainting enabled: True" in infotext and "Soft inpainting difference threshold: 2" in infotext


@pytest.mark.parametrize("args, fragment", [
    ([True, 1, 0.5, "lots"], 'alwayson_scripts["soft inpainting"].args[3] (Transition contrast boost) must be a '
                             "number between 1 and 32"),
    ([True, 1, 0.5, 4, 3], "soft inpainting mask influence must be between 0 and 1, got 3"),
    ([True, 1, 0.5, 4, 0, 0.5, 2, 9], "takes at most 7 values"),
])
def test_bad_script_args_are_422_naming_the_value(server, args, fragment):
    response = post(server, alwayson_scripts={SCRIPT: {"args": args}})
    assert response.status_code == 422, response.text
    assert fragment in response.json()["errors"]
