"""Hires fix through the one generation path (AppContext -> worker -> runner -> hires) on tiny SD1.5.

First pass at 64x64, second pass at 128x128 (latent and image upscalers), infotext fields readable back.
"""
from __future__ import annotations

import pytest

from tests.fixtures.factory import TinyModels
from tests.fixtures.upscaler_factory import write_upscalers
from webui.context import AppContext
from webui.io.metadata import infotext_to_request_fields, parse_infotext, read_infotext
from webui.settings import Settings
from webui.types import GenerationRequest, JobState, RequestError

BASE = dict(width=64, height=64, steps=2, prompt="a red fox", negative_prompt="blurry", seed=3)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("hires")
    TinyModels(root, fixture_cache).path("sd15")
    write_upscalers(root / "models" / "ESRGAN")
    context = AppContext.create(Settings.for_data_dir(root))
    context.options.update({"sd_model_checkpoint": "tiny_sd15"})
    yield context
    context.close()


def _done(job):
    assert job.state is JobState.DONE, job.error
    return job.result


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Latent (bicubic antialiased)",
                                      "Lanczos", "2x-TinyCompact"])
def test_hires_size_and_infotext_round_trip(ctx, upscaler):
    request = GenerationRequest(**BASE, enable_hr=True, hr_scale=2.0, hr_upscaler=upscaler, hr_second_pass_steps=2,
                                denoising_strength=0.5)
    result = _done(ctx.run(request, timeout=300))
    image = result.images[0]
    assert image.image.size == (128, 128)
    parsed = parse_infotext(read_infotext(image.path))
    assert parsed["Size-1"] == "64" and float(parsed["Hires upscale"]) == 2.0
    assert parsed["Hires upscaler"] == upscaler and parsed["Hires steps"] == "2"
    assert float(parsed["Denoising strength"]) == 0.5
    fields = infotext_to_request_fields(parsed)
    again = GenerationRequest(**fields)
    assert again.enable_hr and again.hr_upscaler == upscaler and again.hr_scale == 2.0
    assert again.hr_second_pass_steps == 2 and again.denoising_strength == 0.5


def test_hires_resize_to_size_sampler_and_prompt(ctx):
    request = GenerationRequest(**BASE, enable_hr=True, hr_resize_x=96, hr_resize_y=128, hr_upscaler="Latent",
                                hr_sampler_name="Euler", hr_prompt="a blue fox", denoising_strength=0.6)
    result = _done(ctx.run(request, timeout=300))
    assert result.images[0].image.size == (96, 128)
    parsed = parse_infotext(result.images[0].infotext)
    assert parsed["Hires resize-1"] == "96" and parsed["Hires sampler"] == "Euler"
    assert parsed["Hires prompt"] == "a blue fox"
    fields = infotext_to_request_fields(parsed)
    assert fields["hr_resize_x"] == 96 and fields["hr_resize_y"] == 128 and fields["enable_hr"]


def test_hires_same_seed_same_pixels(ctx):
    import numpy as np

    request = GenerationRequest(**BASE, enable_hr=True, hr_upscaler="Latent", denoising_strength=0.5,
                                save_images=False)
    a = _done(ctx.run(request, timeout=300)).images[0].image
    b = _done(ctx.run(request, timeout=300)).images[0].image
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_hires_validation_messages():
    with pytest.raises(RequestError, match="hr_scale"):
        GenerationRequest(enable_hr=True, hr_scale=9.0)
    with pytest.raises(RequestError, match="denoising_strength"):
        GenerationRequest(enable_hr=True, denoising_strength=0.0)
    GenerationRequest(enable_hr=False, hr_scale=9.0)  # ignored when off, as in A1111


def test_unknown_hires_upscaler_fails_cleanly_and_next_job_works(ctx):
    job = ctx.run(GenerationRequest(**BASE, enable_hr=True, hr_upscaler="NoSuchModel"), timeout=300)
    assert job.state is JobState.FAILED and "NoSuchModel" in job.error
    _done(ctx.run(GenerationRequest(**BASE, save_images=False), timeout=300))


def test_api_txt2img_enable_hr(tmp_path_factory, fixture_cache):
    import base64
    import io
    import json
    import socket

    import httpx
    from PIL import Image

    from webui.app import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path_factory.mktemp("hires_api")
    TinyModels(root, fixture_cache).path("sd15")
    write_upscalers(root / "models" / "ESRGAN")
    running = start(Settings.for_data_dir(root, port=port, api=True, nowebui=True))
    try:
        with httpx.Client(base_url=running.url.rstrip("/"), timeout=300) as client:
            body = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler",
                    "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "realesr-general-x4v3-tiny",
                    "hr_second_pass_steps": 2, "denoising_strength": 0.5, "hr_sampler_name": "Use same sampler"}
            response = client.post("/sdapi/v1/txt2img", json=body)
            assert response.status_code == 200, response.text
            data = response.json()
            image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
            assert image.size == (96, 96)
            info = json.loads(data["info"])
            assert info["denoising_strength"] == 0.5
            assert "Hires upscaler: realesr-general-x4v3-tiny" in image.info["parameters"]
            png = client.post("/sdapi/v1/png-info", json={"image": data["images"][0]}).json()
            assert png["parameters"]["Hires upscale"] == "1.5"
    finally:
        running.close()


def test_skip_during_the_second_pass_drops_the_batch_and_interrupt_stops(ctx):
    """The same second-pass callback as the DiT families (hires.second_pass_callback): progress continues over
    both passes; Skip -> (None, False), the runner moves on; Interrupt -> (None, True)."""
    import time

    import torch

    from webui.generation.hires import run_hires

    _done(ctx.run(GenerationRequest(**BASE), timeout=300))
    model = ctx.manager.current
    request = GenerationRequest(**BASE, enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", hr_second_pass_steps=4,
                                denoising_strength=0.5)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    class Control:
        def __init__(self, skip: bool = False, interrupt: bool = False):
            self.skip, self.interrupted, self.steps = skip, interrupt, []

        def update(self, **changes):
            self.steps.append(changes.get("step"))

        def consume_skip(self):
            return self.skip

    def second(control):
        return run_hires(model=model, request=request, latents=latents.clone(), seeds=[3], control=control,
                         started=time.perf_counter())

    plain = Control()
    out, interrupted = second(plain)
    assert out.shape == (1, 4, 16, 16) and not interrupted
    assert [s for s in plain.steps if s is not None] == [3, 4]  # 2 first-pass steps, then 2 of the 4 hires steps
    assert second(Control(skip=True)) == (None, False)
    assert second(Control(interrupt=True)) == (None, True)
