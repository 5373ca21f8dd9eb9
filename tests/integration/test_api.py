"""The HTTP API against a launched app (``--nowebui``, tiny SD1.5 models, 64x64, 2 steps).

Every ``/sdapi/v1`` endpoint of the issue, A1111 field defaults and response shapes, error codes,
infotext in returned PNGs, model switching through options, progress/interrupt during a running job,
and the ``/webui/v1`` job API (submit, status, SSE events, cancel, queue, files).
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from webui.settings import Settings
from tests.fixtures.net import free_port, place

SMALL = {"prompt": "a tiny cat", "steps": 2, "width": 64, "height": 64}


def write_models(settings: Settings, fixture_cache) -> None:
    """Two SD1.5 checkpoints (different weights), a VAE, a LoRA and an embedding."""
    import torch
    from safetensors.torch import save_file

    from tests.fixtures.factory import write_sd15_checkpoint, write_vae
    from tests.fixtures.lora_factory import make_lora, tiny_sd1, write_lora

    place(fixture_cache.get(write_sd15_checkpoint), settings.ckpt_dir / "tiny_sd15.safetensors")
    place(fixture_cache.get(write_sd15_checkpoint, seed=1), settings.ckpt_dir / "tiny_b.safetensors")
    place(fixture_cache.get(write_vae), settings.vae_dir / "tiny_vae.safetensors")
    settings.lora_dir.mkdir(parents=True, exist_ok=True)
    write_lora(settings.lora_dir / "tiny_style.safetensors", make_lora(tiny_sd1(), components=("unet",)))
    settings.embeddings_dir.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.randn(2, 768)}, str(settings.embeddings_dir / "tiny_emb.safetensors"))
    # a model preview image next to the checkpoint, served by /webui/v1/files
    Image.new("RGB", (8, 8), "green").save(settings.ckpt_dir / "tiny_sd15.preview.png")


@pytest.fixture(scope="module")
def server(fixture_cache, tmp_path_factory):
    from webui.app import start

    data = tmp_path_factory.mktemp("api_data")
    settings = Settings.for_data_dir(data, port=free_port(), api=True, nowebui=True)
    write_models(settings, fixture_cache)
    settings.config_file.write_text(json.dumps({"some_extension_option": 5, "sd_model_checkpoint": "tiny_sd15"}))
    running = start(settings)
    client = httpx.Client(base_url=running.url.rstrip("/"), timeout=180)
    try:
        yield SimpleNamespace(running=running, client=client, settings=settings, ctx=running.ctx)
    finally:
        client.close()
        running.close()


def b64_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "PNG"
    return image


def txt2img(server, **fields) -> dict:
    response = server.client.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------------------------------- txt2img
def test_txt2img_response_shape_defaults_and_infotext(server):
    body = txt2img(server)
    assert set(body) == {"images", "parameters", "info"}
    assert len(body["images"]) == 1
    image = b64_png(body["images"][0])
    assert image.size == (64, 64)
    infotext = image.info["parameters"]
    assert infotext.startswith("a tiny cat\n") and "Steps: 2" in infotext and "Sampler: Euler" in infotext
    params = body["parameters"]
    assert params["steps"] == 2 and params["sampler_index"] == "Euler" and params["cfg_scale"] == 7.0
    assert params["seed"] == -1 and params["batch_size"] == 1 and params["n_iter"] == 1
    assert params["send_images"] is True and params["save_images"] is False
    info = json.loads(body["info"])
    assert info["infotexts"] == [infotext]
    assert info["sampler_name"] == "Euler" and info["steps"] == 2 and info["cfg_scale"] == 7.0
    assert info["seed"] == info["all_seeds"][0] and 0 <= info["seed"] < 2**32
    assert info["sd_model_name"] == "tiny_sd15"
    assert not any(server.settings.outdir.rglob("*.png")), "save_images defaults to false in A1111's API"


def test_txt2img_batch_seeds_and_send_images(server):
    info = json.loads(txt2img(server, seed=1234, batch_size=2, n_iter=2)["info"])
    assert info["all_seeds"] == [1234, 1235, 1236, 1237]
    assert len(info["infotexts"]) == 4 and "Seed: 1236" in info["infotexts"][2]
    quiet = txt2img(server, seed=5, send_images=False)
    assert quiet["images"] == [] and json.loads(quiet["info"])["all_seeds"] == [5]


def test_same_seed_same_image_and_sampler_schedule_fields(server):
    one = txt2img(server, seed=77, sampler_name="DPM++ 2M", scheduler="karras")
    two = txt2img(server, seed=77, sampler_name="DPM++ 2M Karras")
    assert one["images"][0] == two["images"][0]
    info = json.loads(one["info"])
    assert "Sampler: DPM++ 2M" in info["infotexts"][0] and "Schedule type: Karras" in info["infotexts"][0]


def test_save_images_writes_outputs_with_infotext(server):
    before = set(server.settings.outdir.rglob("*.png"))
    body = txt2img(server, seed=9, save_images=True)
    saved = set(server.settings.outdir.rglob("*.png")) - before
    assert len(saved) == 1
    assert Image.open(saved.pop()).info["parameters"] == json.loads(body["info"])["infotexts"][0]


def test_unknown_fields_and_nulls_are_accepted(server):
    body = txt2img(server, seed=3, some_new_field=[1, 2], eta=None, styles=["no such style"], sampler_name=None,
                   override_settings={"eta_noise_seed_delta": 31337}, restore_faces=False)
    assert "override_settings not applied per job: eta_noise_seed_delta" in json.loads(body["info"])["warnings"]


@pytest.mark.parametrize("fields, status, fragment", [
    ({"width": 65}, 422, "width 65 is not a multiple of 8"),
    ({"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ({"steps": 0}, 422, "steps must be between 1"),
    ({"sampler_name": "Nope"}, 422, "sampler_name 'Nope' is unknown"),
    ({"override_settings": {"sd_model_checkpoint": "missing_model"}}, 422, "missing_model"),
    ({"override_settings": {"sd_vae": "missing_vae"}}, 422, "missing_vae"),
    ({"alwayson_scripts": {"adetailer": {"args": []}}}, 422, "always on script 'adetailer' not found"),
    ({"enable_hr": True, "hr_scale": 9}, 422, "hr_scale must be between"),
])
def test_txt2img_invalid_values(server, fields, status, fragment):
    response = server.client.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    assert response.status_code == status, response.text
    body = response.json()
    assert fragment in (body["errors"] or "") and body["error"]


def test_invalid_json_is_422(server):
    response = server.client.post("/sdapi/v1/txt2img", content=b"{not json",
                                  headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["errors"]


def test_img2img_without_an_image_says_so(server):
    response = server.client.post("/sdapi/v1/img2img", json={"init_images": []})
    assert response.status_code == 422 and "init_images" in response.json()["errors"]


def test_override_settings_switch_model_for_one_job_only(server):
    base = json.loads(txt2img(server, seed=11)["info"])
    other = json.loads(txt2img(server, seed=11, override_settings={
        "sd_model_checkpoint": "tiny_b.safetensors", "sd_vae": "tiny_vae.safetensors", "CLIP_stop_at_last_layers": 2,
    })["info"])
    assert other["sd_model_name"] == "tiny_b" and base["sd_model_name"] == "tiny_sd15"
    assert "Clip skip: 2" in other["infotexts"][0] and "VAE: tiny_vae" in other["infotexts"][0]
    assert server.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny_sd15")
    again = json.loads(txt2img(server, seed=11)["info"])
    assert again["sd_model_name"] == "tiny_sd15"


# ---------------------------------------------------------------------------------------- png-info
def test_png_info_reads_back_generated_infotext(server):
    body = txt2img(server, seed=21, negative_prompt="blurry")
    response = server.client.post("/sdapi/v1/png-info", json={"image": body["images"][0]})
    assert response.status_code == 200
    data = response.json()
    assert data["info"] == json.loads(body["info"])["infotexts"][0]
    params = data["parameters"]
    assert params["Prompt"] == "a tiny cat" and params["Negative prompt"] == "blurry"
    assert params["Seed"] == "21" and params["Steps"] == "2" and params["Size-1"] == "64"
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    empty = server.client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(plain.getvalue()).decode()})
    assert empty.status_code == 200 and empty.json()["info"] == ""
    bad = server.client.post("/sdapi/v1/png-info", json={"image": "definitely not base64!"})
    assert bad.status_code == 422 and "base64" in bad.json()["detail"]


# ---------------------------------------------------------------------------------------- listings
def test_model_and_sampler_listings(server):
    c = server.client
    models = c.get("/sdapi/v1/sd-models").json()
    assert {m["model_name"] for m in models} == {"tiny_sd15", "tiny_b"}
    for item in models:
        assert set(item) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert item["title"].startswith(item["model_name"] + ".safetensors") and Path(item["filename"]).is_file()
    assert c.get("/sdapi/v1/sd-vae").json() == [
        {"model_name": "tiny_vae.safetensors", "filename": str(server.settings.vae_dir / "tiny_vae.safetensors")}]
    samplers = {s["name"]: s for s in c.get("/sdapi/v1/samplers").json()}
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]["aliases"] and isinstance(samplers["DPM++ 2M"]["options"], dict)
    schedulers = {s["name"]: s for s in c.get("/sdapi/v1/schedulers").json()}
    assert schedulers["karras"]["label"] == "Karras" and schedulers["karras"]["default_rho"] == 7.0
    assert set(schedulers["automatic"]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    upscalers = [u["name"] for u in c.get("/sdapi/v1/upscalers").json()]
    assert upscalers[:3] == ["None", "Lanczos", "Nearest"]
    loras = c.get("/sdapi/v1/loras").json()
    assert loras == [{"name": "tiny_style", "alias": "tiny_style", "metadata": {},
                      "path": str(server.settings.lora_dir / "tiny_style.safetensors")}]
    embeddings = c.get("/sdapi/v1/embeddings").json()
    assert set(embeddings) == {"loaded", "skipped"}
    emb = {**embeddings["loaded"], **embeddings["skipped"]}["tiny_emb"]
    assert emb["vectors"] == 2 and emb["shape"] == 768


def test_cmd_flags_memory_refresh_and_empty_lists(server):
    c = server.client
    flags = c.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["nowebui"] is True and flags["port"] == server.settings.port
    assert flags["api_auth"] is None and flags["gradio_auth"] is None
    assert flags["ckpt_dir"] == str(server.settings.ckpt_dir)
    memory = c.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    for path in ("refresh-checkpoints", "refresh-vae", "refresh-loras"):
        assert c.post(f"/sdapi/v1/{path}").status_code == 200, path
    assert len(c.get("/sdapi/v1/sd-models").json()) == 2
    assert c.get("/sdapi/v1/prompt-styles").json() == []
    assert c.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


# ---------------------------------------------------------------------------------------- options
def test_options_read_write_and_model_switch(server):
    c = server.client
    options = c.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith("tiny_sd15.safetensors")
    assert options["CLIP_stop_at_last_layers"] == 1 and options["some_extension_option"] == 5
    title_b = next(m["title"] for m in c.get("/sdapi/v1/sd-models").json() if m["model_name"] == "tiny_b")
    try:
        response = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": title_b, "a_new_key": "kept"})
        assert response.status_code == 200, response.text
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny_b.safetensors")
        assert json.loads(txt2img(server, seed=1)["info"])["sd_model_name"] == "tiny_b"
        saved = json.loads(server.settings.config_file.read_text())
        assert saved["sd_model_checkpoint"] == "tiny_b" and saved["a_new_key"] == "kept"
        assert saved["some_extension_option"] == 5
        bad = c.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 99, "samples_save": False})
        assert bad.status_code == 422 and "CLIP_stop_at_last_layers" in bad.json()["detail"]
        assert json.loads(server.settings.config_file.read_text()) == saved, "nothing saved on a rejected change"
        missing = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "no_such_model"})
        assert missing.status_code == 422 and "no_such_model" in missing.json()["detail"]
        assert c.post("/sdapi/v1/options", json=["not", "an", "object"]).status_code == 422
    finally:
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny_sd15"}).status_code == 200


def test_typed_options_api(server):
    c = server.client
    data = c.get("/webui/v1/options").json()
    specs = {spec["key"]: spec for spec in data["specs"]}
    assert specs["CLIP_stop_at_last_layers"]["type"] == "int" and specs["CLIP_stop_at_last_layers"]["maximum"] == 12
    assert data["values"]["some_extension_option"] == 5
    applied = c.post("/webui/v1/options", json={"show_progress_every_n_steps": "2"})
    assert applied.status_code == 200 and applied.json()["applied"] == {"show_progress_every_n_steps": 2}
    assert c.get("/sdapi/v1/options").json()["show_progress_every_n_steps"] == 2
    bad = c.post("/webui/v1/options", json={"samples_save": "perhaps"})
    assert bad.status_code == 422 and "samples_save" in bad.json()["detail"]
    assert c.post("/webui/v1/options", json={"show_progress_every_n_steps": 1}).status_code == 200


# ---------------------------------------------------------------------------------------- progress, interrupt
def test_progress_during_a_running_job_and_interrupt(server):
    c = server.client
    idle = c.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(
        response=httpx.post(f"{server.running.url.rstrip('/')}/sdapi/v1/txt2img", timeout=300,
                            json={**SMALL, "steps": 400, "seed": 3})))
    worker.start()
    seen = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        data = c.get("/sdapi/v1/progress").json()
        if data["state"]["sampling_step"] >= 2 and data["current_image"]:
            seen = data
            break
        time.sleep(0.05)
    assert seen is not None, "no progress seen while the job ran"
    assert 0 < seen["progress"] <= 1 and seen["eta_relative"] >= 0 and seen["state"]["sampling_steps"] == 400
    assert seen["state"]["job_count"] == 1 and seen["current_task"]
    assert b64_png(seen["current_image"]).size[0] > 0
    skip_img = c.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
    assert skip_img["current_image"] is None
    assert c.post("/sdapi/v1/interrupt").status_code == 200
    worker.join(120)
    response = outcome["response"]
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and info["job_id"] == seen["current_task"]
    assert c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
    assert c.post("/sdapi/v1/skip").status_code == 200  # nothing running: harmless


# ---------------------------------------------------------------------------------------- job API
def _events(client, job_id, **params):
    events = []
    with client.stream("GET", f"/webui/v1/jobs/{job_id}/events", params=params) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    return events


def test_job_api_submit_status_events_result(server):
    c = server.client
    response = c.post("/webui/v1/jobs", json={**SMALL, "steps": 6, "seed": 42, "save_images": True},
                      headers={"X-Client-Id": "tester"})
    assert response.status_code == 202
    job = response.json()
    assert job["state"] in ("queued", "running") and job["client"] == "api:tester"
    assert job["links"]["events"] == f"/webui/v1/jobs/{job['id']}/events"
    events = _events(c, job["id"], preview_interval_ms=0)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "end" and kinds.count("end") == 1 and "progress" in kinds
    steps = [data["step"] for kind, data in events if kind == "progress"]
    assert steps == sorted(steps) or len({d["batch_index"] for _, d in events}) > 1
    assert any("preview" in data for _, data in events), "previews are streamed"
    end = events[-1][1]
    assert end["state"] == "done" and end["result"]["images"][0]["seed"] == 42
    full = c.get(f"/webui/v1/jobs/{job['id']}").json()
    assert full["state"] == "done" and full["progress"] == 1.0 and full["position"] is None
    image = full["result"]["images"][0]
    assert "Seed: 42" in b64_png(image["png_base64"]).info["parameters"]
    png = c.get(image["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert image["file_url"] and image["file_url"].startswith("/webui/v1/files/outputs/")
    saved = c.get(image["file_url"])
    assert saved.status_code == 200 and Image.open(io.BytesIO(saved.content)).info["parameters"] == image["infotext"]
    assert c.get(f"/webui/v1/jobs/{job['id']}", params={"images": "none"}).json()["result"]["images"] == []
    assert c.get(f"/webui/v1/jobs/{job['id']}/images/5").status_code == 404


def test_job_api_cancel_queue_and_errors(server):
    c = server.client
    long = c.post("/webui/v1/jobs", json={**SMALL, "steps": 400}).json()
    queued = c.post("/webui/v1/jobs", json={**SMALL, "seed": 1}).json()
    try:
        queue = c.get("/webui/v1/queue").json()
        ids = [j["id"] for j in queue["queued"]]
        assert queued["id"] in ids
        running_or_first = ([queue["running"]["id"]] if queue["running"] else []) + ids
        assert running_or_first.index(long["id"]) < running_or_first.index(queued["id"]), "FIFO"
        cancelled = c.delete(f"/webui/v1/jobs/{queued['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert queued["id"] not in [j["id"] for j in c.get("/webui/v1/queue").json()["queued"]]
        assert c.delete(f"/webui/v1/jobs/{queued['id']}").status_code == 409
    finally:
        c.delete(f"/webui/v1/jobs/{long['id']}")
    kind, final = _events(c, long["id"])[-1]
    assert kind == "end" and final["state"] in ("interrupted", "cancelled"), final
    assert c.get(f"/webui/v1/jobs/{queued['id']}").json()["started_at"] is None
    assert c.get("/webui/v1/jobs/doesnotexist").status_code == 404
    assert c.delete("/webui/v1/jobs/doesnotexist").status_code == 404
    history = c.get("/webui/v1/queue", params={"history": 5}).json()["history"]
    assert queued["id"] in [j["id"] for j in history]
    listed = c.get("/webui/v1/jobs", params={"state": "cancelled"}).json()
    assert queued["id"] in [j["id"] for j in listed]
    bad = c.post("/webui/v1/jobs", json={**SMALL, "width": 65})
    assert bad.status_code == 422 and "multiple of 8" in bad.json()["detail"]


def test_model_preview_files_and_docs(server):
    c = server.client
    preview = c.get("/webui/v1/files/models/checkpoint/tiny_sd15.preview.png")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    assert c.get("/webui/v1/files/models/checkpoint/tiny_sd15.safetensors").status_code == 404
    docs = c.get("/docs")
    assert docs.status_code == 200 and "/sdapi/v1/txt2img" in docs.text
    paths = c.get("/openapi.json").json()["paths"]
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/options", "/sdapi/v1/progress", "/webui/v1/jobs", "/webui/v1/options",
                 "/webui/v1/jobs/{job_id}/events", "/webui/v1/queue", "/webui/v1/files/{path}"):
        assert path in paths, path
