"""img2img, inpaint and ControlNet over HTTP against a launched ``--nowebui`` app (tiny SD1.5, 64x64, 2 steps).

``/sdapi/v1/img2img`` (A1111 v1.10 shapes), img2img jobs in ``/webui/v1/jobs``, ControlNet units in
``alwayson_scripts`` and the sd-webui-controlnet routes (``/controlnet/*``).
"""
from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.fixtures.controlnet_factory import LAYOUT as CONTROLNETS, VERSION as CONTROLNET_FIXTURES
from webui.settings import Settings
from tests.fixtures.net import free_port, place

SMALL = {"prompt": "a tiny cat", "steps": 2, "width": 64, "height": 64}


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode("ascii")


def b64_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "PNG"
    return image


def shapes(size=(64, 64)) -> Image.Image:
    """A picture with hard edges: a white square and a grey disc on black."""
    image = Image.new("RGB", size, "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 30, 30), fill="white")
    draw.ellipse((34, 30, 58, 54), fill=(128, 128, 128))
    return image


def write_controlnet(folder: Path, fixture_cache) -> Path:
    """The tiny SD1.5 ControlNet (ldm single file) under the name ``tiny_canny.safetensors``."""
    writer, kwargs = CONTROLNETS["tiny_control_sd15_canny.safetensors"]
    return place(fixture_cache.get(writer, version=CONTROLNET_FIXTURES, **kwargs), folder / "tiny_canny.safetensors")


@pytest.fixture(scope="module")
def server(fixture_cache, tmp_path_factory):
    from tests.fixtures.factory import write_sd15_checkpoint
    from webui.app import start

    data = tmp_path_factory.mktemp("api_img2img")
    settings = Settings.for_data_dir(data, port=free_port(), api=True, nowebui=True)
    place(fixture_cache.get(write_sd15_checkpoint), settings.ckpt_dir / "tiny_sd15.safetensors")
    controlnet = write_controlnet(settings.controlnet_dir, fixture_cache)
    running = start(settings)
    client = httpx.Client(base_url=running.url.rstrip("/"), timeout=300)
    try:
        yield SimpleNamespace(running=running, client=client, settings=settings, controlnet=controlnet)
    finally:
        client.close()
        running.close()


def img2img(server, **fields) -> dict:
    response = server.client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64(shapes())], **fields})
    assert response.status_code == 200, response.text
    return response.json()


def pixels(data: str) -> np.ndarray:
    return np.asarray(b64_png(data).convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------------------------------- /sdapi/v1/img2img
def test_img2img_returns_an_image_of_the_requested_size_with_infotext(server):
    body = img2img(server, width=64, height=96, seed=3, denoising_strength=0.6,
                   init_images=["data:image/png;base64," + b64(shapes((80, 60)))])
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 1
    image = b64_png(body["images"][0])
    assert image.size == (64, 96)
    infotext = image.info["parameters"]
    assert infotext.startswith("a tiny cat\n") and "Denoising strength: 0.6" in infotext and "Seed: 3" in infotext
    info = json.loads(body["info"])
    assert info["infotexts"] == [infotext] and info["denoising_strength"] == 0.6 and info["all_seeds"] == [3]
    params = body["parameters"]
    assert params["init_images"] is None and params["mask"] is None, "A1111 echoes no input images by default"
    assert params["denoising_strength"] == 0.6 and params["inpaint_full_res"] is True
    with_inputs = img2img(server, seed=3, include_init_images=True, send_images=False)
    assert with_inputs["images"] == [] and with_inputs["parameters"]["init_images"] == [b64(shapes())]


def test_same_seed_same_image_and_denoising_changes_it(server):
    one = img2img(server, seed=11, denoising_strength=0.5)
    two = img2img(server, seed=11, denoising_strength=0.5)
    assert one["images"][0] == two["images"][0]
    other = img2img(server, seed=12, denoising_strength=0.5)
    assert other["images"][0] != one["images"][0]
    # a low strength keeps more of the input than a full one
    source = np.asarray(shapes(), dtype=np.int16)
    weak = np.abs(pixels(img2img(server, seed=11, steps=4, denoising_strength=0.25)["images"][0]) - source).mean()
    full = np.abs(pixels(img2img(server, seed=11, steps=4, denoising_strength=1.0)["images"][0]) - source).mean()
    assert weak < full


def test_inpaint_with_a_mask_keeps_the_unmasked_area(server):
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((32, 0, 63, 63), fill=255)  # right half: change
    body = img2img(server, seed=5, mask=b64(mask), mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
                   denoising_strength=1.0)
    result = pixels(body["images"][0])
    source = np.asarray(shapes(), dtype=np.int16)
    kept = np.abs(result[:, :24] - source[:, :24]).max()
    changed = np.abs(result[:, 40:] - source[:, 40:]).mean()
    assert kept <= 2, "pixels outside the mask come back unchanged"
    assert changed > 5, "the masked half was regenerated"


@pytest.mark.parametrize("fields, fragment", [
    ({"init_images": ["not base64 !!"]}, "init_images[0] is not valid base64"),
    ({"init_images": [base64.b64encode(b"hello, not an image").decode()]}, "init_images[0] is not a PNG, JPEG"),
    ({"init_images": []}, "init_images is empty"),
    ({"mask": "%%%"}, "mask is not valid base64"),
    ({"denoising_strength": 2}, "denoising_strength must be between"),
    ({"alwayson_scripts": {"controlnet": {"args": [{"image": "??", "model": "x"}]}}},
     "alwayson_scripts.controlnet.args[0].image is not valid base64"),
])
def test_bad_img2img_requests_are_422_with_the_field_named(server, fields, fragment):
    response = server.client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64(shapes())], **fields})
    assert response.status_code == 422, response.text
    assert fragment in response.json()["errors"]


def test_img2img_job_api(server):
    c = server.client
    response = c.post("/webui/v1/jobs", json={**SMALL, "type": "img2img", "seed": 21, "denoising_strength": 0.5,
                                              "init_images": [b64(shapes())]})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "img2img"
    done = None
    for _ in range(1500):
        done = c.get(f"/webui/v1/jobs/{job['id']}").json()
        if done["state"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert done["state"] == "done", done
    (image,) = done["result"]["images"]
    assert image["seed"] == 21 and "Denoising strength: 0.5" in image["infotext"]
    assert b64_png(image["png_base64"]).size == (64, 64)
    assert b64(shapes())[:200] not in json.dumps(done["result"]), "no input pixels in the job result"
    same = img2img(server, seed=21, denoising_strength=0.5)
    assert pixels(same["images"][0]).tolist() == pixels(image["png_base64"]).tolist()
    bad = c.post("/webui/v1/jobs", json={**SMALL, "type": "img2img", "init_images": ["@@"]})
    assert bad.status_code == 422 and "init_images[0]" in bad.json()["errors"]


# ---------------------------------------------------------------------------------------- /controlnet/*
def test_controlnet_version_settings_and_module_list(server):
    c = server.client
    assert c.get("/controlnet/version").json() == {"version": 2}
    assert c.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    try:  # the option the UI reads too (sd-webui-controlnet's name)
        assert c.post("/sdapi/v1/options", json={"control_net_unit_count": 5}).status_code == 200
        assert c.get("/controlnet/settings").json() == {"control_net_unit_count": 5}
        refused = c.post("/sdapi/v1/options", json={"control_net_unit_count": 99})
        assert refused.status_code == 422 and "control_net_unit_count" in refused.text
    finally:
        c.post("/sdapi/v1/options", json={"control_net_unit_count": 3})
    modules = c.get("/controlnet/module_list").json()
    assert "canny" in modules["module_list"] and "none" in modules["module_list"]
    assert set(modules["module_detail"]) == set(modules["module_list"])
    assert isinstance(modules["module_detail"]["canny"]["sliders"], list)


def test_controlnet_detect_canny_returns_an_edge_map(server):
    response = server.client.post("/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [b64(shapes())],
        "controlnet_processor_res": 64, "controlnet_threshold_a": 100, "controlnet_threshold_b": 200})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["info"] == "Success" and len(body["images"]) == 1
    edges = np.asarray(b64_png(body["images"][0]).convert("L"))
    assert edges.shape[0] >= 64 and edges.shape[1] >= 64
    white = edges > 127
    assert 0.01 < white.mean() < 0.5, "an edge map: thin lines, mostly black"
    h, w = edges.shape
    sy, sx = h / 64, w / 64
    assert white[int(4 * sy):int(6 * sy), :].sum() == 0, "no edges in the empty band at the top"
    assert white[int(6 * sy):int(33 * sy), int(6 * sx):int(33 * sx)].any(), "the square's border is found"
    bad = server.client.post("/controlnet/detect", json={"controlnet_module": "no_such_module",
                                                         "controlnet_input_images": [b64(shapes())]})
    assert bad.status_code == 422 and "canny" in bad.json()["errors"]
    empty = server.client.post("/controlnet/detect", json={"controlnet_module": "canny"})
    assert empty.status_code == 422 and "controlnet_input_images is empty" in empty.json()["errors"]


def test_controlnet_model_list_lists_the_tiny_controlnet(server):
    models = server.client.get("/controlnet/model_list", params={"update": "true"}).json()["model_list"]
    (title,) = [m for m in models if m.startswith("tiny_canny [")]
    assert len(title) == len("tiny_canny [12345678]")


def test_txt2img_and_img2img_with_a_canny_controlnet_unit(server):
    title = next(m for m in server.client.get("/controlnet/model_list").json()["model_list"] if "tiny_canny" in m)
    unit = {"enabled": True, "image": b64(shapes()), "module": "canny", "model": title, "weight": 1.0,
            "processor_res": 64, "threshold_a": 100, "threshold_b": 200, "resize_mode": "Crop and Resize",
            "control_mode": "Balanced", "pixel_perfect": False, "low_vram": False}
    scripts = {"controlnet": {"args": [unit, {"enabled": False, "model": "None"}]}}
    plain = server.client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 9})
    controlled = server.client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 9, "alwayson_scripts": scripts})
    assert controlled.status_code == 200, controlled.text
    image = b64_png(controlled.json()["images"][0])
    assert image.size == (64, 64)
    assert controlled.json()["images"][0] != plain.json()["images"][0], "the ControlNet changes the image"
    assert "ControlNet" in image.info["parameters"]
    again = server.client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 9, "alwayson_scripts": scripts})
    assert again.json()["images"][0] == controlled.json()["images"][0]
    no_image = {"controlnet": {"args": [{**unit, "image": None}]}}
    assert img2img(server, seed=9, alwayson_scripts=no_image)["images"], "img2img units use the init image"
    typo = server.client.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {
        "controlnet": {"args": [{**unit, "model": "tiny_cany [abcdef12]"}]}}})
    message = typo.json()["errors"]
    assert typo.status_code == 422 and "args[0].model" in message and "tiny_canny" in message, message


def test_controlnet_maps_follow_the_images_like_sd_webui_controlnet(server):
    """One map per enabled unit with save_detected_map (default true), after the images; the option
    control_net_no_detectmap turns them off.  The map is the canny edge map: binary, 64x64."""
    title = next(m for m in server.client.get("/controlnet/model_list").json()["model_list"] if "tiny_canny" in m)
    unit = {"image": b64(shapes()), "module": "canny", "model": title, "processor_res": 64,
            "threshold_a": 100, "threshold_b": 200}
    body = {**SMALL, "seed": 3, "batch_size": 2}
    two = server.client.post("/sdapi/v1/txt2img", json={
        **body, "alwayson_scripts": {"controlnet": {"args": [unit, {**unit, "save_detected_map": False}]}}})
    assert two.status_code == 200, two.text
    images = [b64_png(data) for data in two.json()["images"]]
    assert len(images) == 3, "2 images + the first unit's map (the second unit asked for none)"
    edge_map = np.asarray(images[2].convert("L"))
    assert edge_map.shape == (64, 64) and set(np.unique(edge_map)) <= {0, 255} and edge_map.max() == 255
    assert "parameters" not in images[2].info
    try:
        assert server.client.post("/sdapi/v1/options", json={"control_net_no_detectmap": True}).status_code == 200
        off = server.client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert len(off.json()["images"]) == 2
    finally:
        server.client.post("/sdapi/v1/options", json={"control_net_no_detectmap": False})


def test_new_routes_need_credentials_like_sdapi(tmp_path_factory):
    from webui.app import start
    from webui.settings import parse_auth

    settings = Settings.for_data_dir(tmp_path_factory.mktemp("secured_cn"), port=free_port(), api=True,
                                     nowebui=True, api_auth=parse_auth("alice:s3cret"))
    running = start(settings)
    url = running.url.rstrip("/")
    try:
        for method, path in (("GET", "/controlnet/version"), ("GET", "/controlnet/model_list"),
                             ("GET", "/controlnet/module_list"), ("GET", "/controlnet/settings"),
                             ("POST", "/controlnet/detect"), ("POST", "/sdapi/v1/img2img")):
            response = httpx.request(method, url + path, json={}, timeout=30)
            assert response.status_code == 401, (path, response.text)
        login = httpx.BasicAuth("alice", "s3cret")
        assert httpx.get(url + "/controlnet/version", auth=login, timeout=30).json() == {"version": 2}
        no_image = httpx.post(url + "/sdapi/v1/img2img", json={"prompt": "x"}, auth=login, timeout=30)
        assert no_image.status_code == 422 and "init_images is empty" in no_image.json()["errors"]
    finally:
        running.close()
