"""Extensions end to end: a third-party plugin installed as a distribution (entry point group
``webui.extensions`` on a sys.path entry) is discovered and runs in a real generation; extensions raising in
every hook are disabled and the generation still finishes; the shipped examples work; ``/ext/<name>`` routes
sit behind the API credentials and answer 404 while their extension is disabled; samplers and schedule
types from an extension (API 1.1) are listed in the UI and ``/sdapi/v1`` and drive real pipelines."""
from __future__ import annotations

import base64
import importlib
import io
import sys
import textwrap

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.factory import TinyModels
from webui.context import AppContext
from webui.io.metadata import parse_infotext, read_infotext
from webui.settings import Settings
from webui.types import GenerationRequest, JobState
from tests.fixtures.net import free_port

SMALL = dict(width=64, height=64, steps=2, negative_prompt="blurry")
MAGENTA = (255, 0, 255)

PROBE = '''
from webui.plugins.api import hookimpl
WEBUI_API = ">=1.0,<2"
STEPS = []
REQUESTS = []

@hookimpl
def webui_modify_request(request):
    REQUESTS.append(request.prompt)

@hookimpl
def webui_on_step(progress, request):
    STEPS.append((progress.step, progress.total_steps))

@hookimpl(trylast=True)
def webui_postprocess_image(image):
    out = image.copy()
    out.paste((255, 0, 255), (0, 0, 4, 4))
    return out
'''

HOOK_CODE = {
    "settings": "def webui_settings():\n    raise RuntimeError('raise_settings broke')\n",
    "ui": "def webui_ui():\n    raise RuntimeError('raise_ui broke')\n",
    "routes": "def webui_api_routes(router):\n    raise RuntimeError('raise_routes broke')\n",
    "modify": "def webui_modify_request(request):\n    raise RuntimeError('raise_modify broke')\n",
    "prompt": "def webui_prompt_syntax(prompt):\n    raise RuntimeError('raise_prompt broke')\n",
    "step": "def webui_on_step(progress):\n    raise RuntimeError('raise_step broke')\n",
    "postprocess": "def webui_postprocess_image(image):\n    raise RuntimeError('raise_postprocess broke')\n",
}


def install_entry_point_dist(site) -> None:
    """A distribution as pip would leave it: dist-info with entry_points.txt + the module, on sys.path."""
    dist = site / "webui_ep_probe-0.3.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: webui-ep-probe\nVersion: 0.3.0\n")
    (dist / "entry_points.txt").write_text("[webui.extensions]\nprobe = webui_ep_probe\n")
    (site / "webui_ep_probe.py").write_text(textwrap.dedent(PROBE))


def write_raisers(ext_dir) -> None:
    for hook, code in HOOK_CODE.items():
        folder = ext_dir / f"raise_{hook}"
        folder.mkdir(parents=True)
        (folder / "extension.toml").write_text(
            f'name = "raise_{hook}"\nversion = "0.0.1"\napi = ">=1.0,<2"\nentry = "main"\n')
        (folder / "main.py").write_text("from webui.plugins.api import hookimpl\n@hookimpl\n" + code)


SAMPLER_EXT = '''
import diffusers
from webui.plugins.api import NamedEntry, hookimpl

def trailing(scheduler_config):
    return diffusers.EulerDiscreteScheduler.from_config(scheduler_config, timestep_spacing="trailing")

def linear(n_steps, sigma_min, sigma_max):
    return [sigma_max + (sigma_min - sigma_max) * i / max(n_steps - 1, 1) for i in range(n_steps)]

@hookimpl
def webui_samplers():
    return [NamedEntry(name="Euler Trailing", factory=trailing, description="Euler with trailing spacing")]

@hookimpl
def webui_schedulers():
    return [NamedEntry(name="Linear Sigmas", factory=linear)]
'''


def write_sampler_ext(ext_dir) -> None:
    folder = ext_dir / "more_samplers"
    folder.mkdir(parents=True)
    (folder / "extension.toml").write_text('name = "more_samplers"\nversion = "0.1.0"\napi = ">=1.1,<2"\n'
                                           'entry = "main"\n')
    (folder / "main.py").write_text(SAMPLER_EXT)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    install_entry_point_dist(root)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("webui_ep_probe", None)


@pytest.fixture(scope="module")
def ctx(site, tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("ext_gen")
    TinyModels(root, fixture_cache).path("sd15")
    write_raisers(root / "extensions")
    write_sampler_ext(root / "extensions")
    context = AppContext.create(Settings.for_data_dir(root))
    context.options.update({"sd_model_checkpoint": "tiny_sd15"})
    yield context
    context.close()


def test_entry_point_plugin_is_discovered_and_runs_in_a_generation(ctx):
    record = ctx.plugins.get("probe")
    assert record.status == "enabled", record.error
    assert record.version == "0.3.0" and "entry point webui-ep-probe" in record.source
    probe = sys.modules["webui_ep_probe"]
    probe.STEPS.clear()
    job = ctx.run(GenerationRequest(prompt="a fox", seed=3, **SMALL), timeout=300)
    assert job.state is JobState.DONE, job.error
    assert probe.STEPS == [(1, 2), (2, 2)]
    assert probe.REQUESTS[-1] == "a fox"
    image = job.result.images[0]
    assert image.image.getpixel((1, 1)) == MAGENTA
    saved = Image.open(image.path).convert("RGB")
    assert saved.getpixel((1, 1)) == MAGENTA and saved.getpixel((10, 10)) != MAGENTA


def test_extensions_raising_in_every_hook_are_disabled_and_the_generation_finishes(ctx):
    job = ctx.run(GenerationRequest(prompt="a cat", seed=4, **SMALL), timeout=300)
    assert job.state is JobState.DONE, job.error
    assert len(job.result.images) == 1 and job.result.images[0].image.size == (64, 64)
    from webui.ui import build_ui

    build_ui(ctx)  # the UI hook runs (and fails) here; the page is still built
    for hook in HOOK_CODE:
        if hook == "routes":
            continue  # only called when routes are installed: see the API test
        record = ctx.plugins.get(f"raise_{hook}")
        assert record.status == "error", hook
        assert f"raise_{hook} broke" in record.error and "Traceback" in record.error
    # the other extensions kept working
    assert ctx.plugins.get("probe").status == "enabled" and ctx.plugins.get("wildcards").status == "enabled"
    again = ctx.run(GenerationRequest(prompt="a cat", seed=4, **SMALL), timeout=300)
    assert np.array_equal(np.asarray(again.result.images[0].image), np.asarray(job.result.images[0].image))


def test_wildcards_and_watermark_examples_in_a_real_generation(ctx):
    job = ctx.run(GenerationRequest(prompt="a __color__ bird", seed=7, **SMALL), timeout=300)
    assert job.state is JobState.DONE, job.error
    prompt = parse_infotext(read_infotext(job.result.images[0].path))["Prompt"]
    assert prompt in {f"a {c} bird" for c in ("red", "green", "blue", "golden")}
    same = ctx.run(GenerationRequest(prompt="a __color__ bird", seed=7, **SMALL), timeout=300)
    assert same.result.info["prompt"] == prompt == job.result.info["prompt"]
    plain = ctx.run(GenerationRequest(prompt="a tree", seed=8, **SMALL), timeout=300)
    ctx.set_options({"contact_sheet_watermark": "WM"})
    try:
        marked = ctx.run(GenerationRequest(prompt="a tree", seed=8, **SMALL), timeout=300)
    finally:
        ctx.set_options({"contact_sheet_watermark": ""})
    a = np.asarray(plain.result.images[0].image, dtype=np.int16)
    b = np.asarray(marked.result.images[0].image, dtype=np.int16)
    assert (a != b).any(axis=2)[40:, 40:].any(), "watermark in the bottom-right corner"
    assert not (a != b).any(axis=2)[:20, :20].any(), "nothing else changed"


def test_extension_sampler_and_schedule_are_offered_in_the_ui(ctx):
    from webui.ui import build_ui

    assert ctx.plugins.get("more_samplers").status == "enabled", ctx.plugins.get("more_samplers").error
    assert ctx.samplers.sampler_names()[-1] == "Euler Trailing"
    components = build_ui(ctx).webui_components

    def choices(suffix):
        return [c[0] for c in next(comp for key, comp in components.items() if key.endswith(suffix)).choices]

    assert "Euler Trailing" in choices("txt2img.sampler") and "Linear Sigmas" in choices("txt2img.schedule")
    assert "Euler Trailing" in choices(".hr_sampler_name") and "Linear Sigmas" in choices(".hr_scheduler")


def test_extension_schedule_drives_txt2img_and_img2img_pipelines(ctx):
    """The registry's schedulers in real diffusers pipelines (what the runner and the hires fix do)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    model = ctx.manager.ensure("tiny_sd15")
    pipe = model.pipe
    config = model.components.scheduler_config
    prompt = dict(prompt="a fox", negative_prompt="", height=64, width=64, output_type="latent")
    pipe.scheduler = ctx.samplers.make_scheduler(config, "Euler Trailing", "Linear Sigmas", seed=1)
    latents = pipe(**prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(1)).images
    sigmas = pipe.scheduler.sigmas.tolist()
    assert torch.isfinite(latents).all() and len(sigmas) == 4 and sigmas[-1] == 0
    assert abs((sigmas[0] - sigmas[1]) - (sigmas[1] - sigmas[2])) < 1e-3 * sigmas[0]  # linear in sigma
    uniform = ctx.samplers.make_scheduler(config, "Euler Trailing", "Uniform")
    pipe.scheduler = uniform
    other = pipe(**prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(1)).images
    assert not torch.allclose(latents, other)  # the schedule type changed the result
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)  # as the hires fix builds it
    img2img.scheduler = ctx.samplers.make_scheduler(config, "DPM++ 2M", "Linear Sigmas")
    image = Image.new("RGB", (64, 64), (120, 80, 40))
    out = img2img(**prompt, image=image, strength=0.5, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(2)).images
    assert torch.isfinite(out).all() and len(img2img.scheduler.timesteps) == 4  # 4 steps, half of them run


def test_a_job_with_an_extension_sampler_runs_end_to_end(ctx):
    job = ctx.run(GenerationRequest(prompt="a fox", seed=5, sampler="Euler Trailing", schedule="Linear Sigmas",
                                    **SMALL), timeout=300)
    assert job.state is JobState.DONE, job.error
    fields = parse_infotext(read_infotext(job.result.images[0].path))
    assert fields["Sampler"] == "Euler Trailing" and fields["Schedule type"] == "Linear Sigmas"
    builtin = ctx.run(GenerationRequest(prompt="a fox", seed=5, sampler="Euler", schedule="Linear Sigmas", **SMALL),
                      timeout=300)
    assert builtin.state is JobState.DONE, builtin.error


def png_b64(color, size=(16, 8)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_extension_routes_are_behind_auth_and_follow_enable(site, tmp_path):
    from webui.api.auth import basic_header
    from webui.app import start

    write_raisers(tmp_path / "extensions")
    write_sampler_ext(tmp_path / "extensions")
    settings = Settings.for_data_dir(tmp_path, port=free_port(), nowebui=True, api_auth=(("user", "pw"),))
    running = start(settings)
    try:
        base = running.url.rstrip("/")
        body = {"images": [png_b64("red"), png_b64("blue")], "columns": 2, "labels": ["r", "b"]}
        with httpx.Client(base_url=base, timeout=60) as client:
            assert client.post("/ext/contact_sheet/grid", json=body).status_code == 401
            auth = {"Authorization": basic_header("user", "pw")}
            answer = client.post("/ext/contact_sheet/grid", json=body, headers=auth)
            assert answer.status_code == 200, answer.text
            data = answer.json()
            sheet = Image.open(io.BytesIO(base64.b64decode(data["image"])))
            assert (data["columns"], data["rows"]) == (2, 1) and sheet.size == (data["width"], data["height"])
            bad = client.post("/ext/contact_sheet/grid", json={"images": ["not base64!"]}, headers=auth)
            assert bad.status_code == 422 and "not a base64" in bad.json()["detail"]
            assert running.ctx.plugins.get("raise_routes").status == "error"
            options = client.get("/webui/v1/options", headers=auth).json()
            spec = next(s for s in options["specs"] if s["key"] == "contact_sheet_watermark")
            assert spec["section"] == "Extension: contact_sheet" and options["values"]["contact_sheet_watermark"] == ""
            bad_option = client.post("/webui/v1/options", json={"wildcards_folder": 5}, headers=auth)
            assert bad_option.status_code == 422 and "wildcards_folder" in bad_option.text
            listed = {s["name"]: s for s in client.get("/sdapi/v1/samplers", headers=auth).json()}
            assert listed["Euler Trailing"]["options"]["extension"] == "more_samplers" and "Euler a" in listed
            assert listed["Euler Trailing"]["aliases"] == ["more_samplers:Euler Trailing"]
            schedules = [s["label"] for s in client.get("/sdapi/v1/schedulers", headers=auth).json()]
            assert schedules[0] == "Automatic" and schedules[-1] == "Linear Sigmas"
            running.ctx.plugins.set_enabled("more_samplers", False)
            listed = [s["name"] for s in client.get("/sdapi/v1/samplers", headers=auth).json()]
            assert "Euler Trailing" not in listed and "Euler a" in listed
            running.ctx.plugins.set_enabled("contact_sheet", False)
            assert client.post("/ext/contact_sheet/grid", json=body, headers=auth).status_code == 404
            running.ctx.plugins.set_enabled("contact_sheet", True)
            assert client.post("/ext/contact_sheet/grid", json=body, headers=auth).status_code == 200
    finally:
        running.close()


def test_install_is_refused_in_the_ui_when_listening_publicly(tmp_path):
    from webui.plugins.install import REFUSED
    from webui.ui import build_ui

    settings = Settings.for_data_dir(tmp_path, host="0.0.0.0", gradio_auth=(("u", "p"),))
    context = AppContext.create(settings, start_worker=False)
    try:
        registry = build_ui(context).webui_components
        assert registry["extensions.install"].interactive is False
        assert registry["extensions.source"].interactive is False
        fn = next(dep.fn for dep in build_ui(context).fns.values() if getattr(dep, "api_name", "") == "extensions_install")
        table, status, _ = fn(str(tmp_path))
        assert REFUSED.split(".")[0] in status
    finally:
        context.close()
