"""Upscaling through the one path (AppContext -> worker -> handler) and the A1111 extras/upscalers API."""
from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.upscaler_factory import write_bad_files, write_upscalers
from webui.context import AppContext
from webui.io.metadata import read_infotext
from webui.settings import Settings
from webui.types import JobState, UpscaleRequest
from tests.fixtures.net import free_port


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def noise(w, h, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, channels), dtype=np.uint8), mode)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("upscale_ctx")
    settings = Settings.for_data_dir(root)
    write_upscalers(settings.esrgan_dir)
    write_bad_files(settings.esrgan_dir)
    context = AppContext.create(settings)
    context.options.update({"ESRGAN_tile": 32, "ESRGAN_tile_overlap": 8})
    yield context
    context.close()


def test_upscale_job_through_worker_saves_png_and_reports_tiles(ctx):
    job = ctx.submit(UpscaleRequest(images=(noise(48, 40),), upscaler_1="realesr-general-x4v3-tiny",
                                    upscaling_resize=4))
    texts = []
    version = 0
    while not job.state.finished:
        version = job.wait_for_change(version, timeout=5)
        texts.append(job.progress.text)
    assert job.state is JobState.DONE, job.error
    image = job.result.images[0]
    assert image.image.size == (192, 160)
    assert read_infotext(image.path) == "Postprocess upscale by: 4, Postprocess upscaler: realesr-general-x4v3-tiny"
    assert image.path.endswith(".png") and "extras" in image.path
    assert any("tile" in t and "/4" in t for t in texts)  # tile i/N progress


@pytest.mark.parametrize("bad, fragment", [("evil", "refused to load"), ("not_upscaler", "not an upscaler"),
                                           ("corrupt", "corrupt")])
def test_bad_model_fails_its_job_and_the_worker_keeps_serving(ctx, bad, fragment):
    job = ctx.run(UpscaleRequest(images=(noise(8, 8),), upscaler_1=bad, save_images=False), timeout=60)
    assert job.state is JobState.FAILED and fragment in job.error and bad in job.error
    ok = ctx.run(UpscaleRequest(images=(noise(8, 8),), upscaler_1="Lanczos", save_images=False), timeout=60)
    assert ok.state is JobState.DONE and ok.result.images[0].image.size == (16, 16)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from webui.app import start

    data = tmp_path_factory.mktemp("upscale_api")
    settings = Settings.for_data_dir(data, port=free_port(), api=True, nowebui=True)
    write_upscalers(settings.esrgan_dir)
    write_bad_files(settings.esrgan_dir)
    running = start(settings)
    client = httpx.Client(base_url=running.url.rstrip("/"), timeout=120)
    try:
        yield SimpleNamespace(client=client, settings=settings)
    finally:
        client.close()
        running.close()


def test_api_upscalers_list_a1111_shape(server):
    items = server.client.get("/sdapi/v1/upscalers").json()
    assert [i["name"] for i in items[:3]] == ["None", "Lanczos", "Nearest"]
    compact = next(i for i in items if i["name"] == "2x-TinyCompact")
    assert set(compact) == {"name", "model_name", "model_path", "model_url", "scale"} and compact["scale"] == 2
    modes = [m["name"] for m in server.client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert "Latent (nearest-exact)" in modes


def test_api_extra_single_image(server):
    body = {"image": png_b64(noise(30, 20, "RGBA")), "upscaler_1": "2x-TinyCompact", "upscaling_resize": 2,
            "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.3}
    response = server.client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(data["image"])))
    assert image.size == (60, 40) and image.mode == "RGBA"
    assert "Postprocess upscaler: 2x-TinyCompact" in data["html_info"]
    assert "Postprocess upscaler 2: Nearest" in image.info["parameters"]


def test_api_extra_batch_images_resize_to_with_crop(server):
    body = {"imageList": [{"data": png_b64(noise(30, 20)), "name": "a.png"},
                          {"data": png_b64(noise(16, 16)), "name": "b.png"}],
            "resize_mode": 1, "upscaling_resize_w": 50, "upscaling_resize_h": 40, "upscaling_crop": True,
            "upscaler_1": "4x-TinyESRGAN-st"}
    response = server.client.post("/sdapi/v1/extra-batch-images", json=body)
    assert response.status_code == 200, response.text
    sizes = [Image.open(io.BytesIO(base64.b64decode(d))).size for d in response.json()["images"]]
    assert sizes == [(50, 40), (50, 40)]


@pytest.mark.parametrize("body, status, fragment", [
    ({"upscaler_1": "NoSuchModel"}, 422, "NoSuchModel"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 100}, 422, "upscaling_resize"),
    ({"upscaler_1": "evil"}, 500, "refused to load"),
])
def test_api_extras_errors_are_clear(server, body, status, fragment):
    response = server.client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(noise(8, 8)), **body})
    assert response.status_code == status, response.text
    assert fragment in json.dumps(response.json())
    ok = server.client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(noise(8, 8)), "upscaler_1": "Lanczos"})
    assert ok.status_code == 200


def test_api_huge_image_is_refused(server):
    import struct
    import zlib

    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    raw = bytearray(out.getvalue())  # forge a 20000x20000 IHDR (a decompression bomb costs nothing to send)
    ihdr = bytes(raw[12:16]) + struct.pack(">II", 20000, 20000) + bytes(raw[24:29])
    raw[16:24] = struct.pack(">II", 20000, 20000)
    raw[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    response = server.client.post("/sdapi/v1/extra-single-image",
                                  json={"image": base64.b64encode(bytes(raw)).decode(), "upscaler_1": "Lanczos"})
    assert response.status_code == 422 and "8192" in response.text
    ok = server.client.post("/sdapi/v1/extra-single-image",
                            json={"image": png_b64(Image.new("RGB", (1, 1))), "upscaler_1": "4x-TinyUltraSharp",
                                  "upscaling_resize": 4})
    assert ok.status_code == 200 and Image.open(io.BytesIO(base64.b64decode(ok.json()["image"]))).size == (4, 4)
