"""T2I-Adapter units in txt2img through the one generation path (AppContext -> worker -> runner), on the tiny
SD1.5 and SDXL checkpoints (64x64, 4 steps, CPU): the unit changes the image, weight 0 is the plain image,
our job equals diffusers' ``StableDiffusionAdapterPipeline`` on the same components and noise, the guidance
window matters, infotext carries the unit, and the refusals say what to do."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.fixtures.controlnet_factory import place_controlnets
from tests.fixtures.factory import TinyModels
from tests.fixtures.t2i_adapter_factory import place_t2i_adapters
from webui.context import AppContext
from webui.image_requests import ControlUnit, Img2ImgRequest
from webui.io.metadata import parse_infotext
from webui.settings import Settings
from webui.types import Arch, GenerationRequest, JobState

SMALL = dict(width=64, height=64, steps=4, prompt="a red fox", negative_prompt="blurry", seed=3)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("t2i_adapter")
    models = TinyModels(root, fixture_cache)
    models.path("sd15")
    models.path("sdxl")
    place_t2i_adapters(root / "models" / "ControlNet", fixture_cache)
    place_controlnets(root / "models" / "ControlNet", fixture_cache, ("tiny_control_sd15_canny.safetensors",))
    context = AppContext.create(Settings.for_data_dir(root))
    context.options.update({"sd_model_checkpoint": "tiny_sd15"})
    yield context
    context.close()


def circle() -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill="black")
    return image


def unit(**changes) -> ControlUnit:
    fields = dict(image=circle(), module="none", model="t2iadapter_tiny_sd15v2", weight=1.0, processor_res=64)
    return ControlUnit(**{**fields, **changes})


def done(job):
    assert job.state is JobState.DONE, job.error
    return job.result


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image.convert("RGB"), dtype=np.int16)


def test_unit_changes_the_image_weight_zero_is_plain_and_infotext_has_the_unit(ctx):
    plain = done(ctx.run(GenerationRequest(**SMALL), timeout=300))
    one = done(ctx.run(GenerationRequest(**SMALL, controlnet=[unit()]), timeout=300))
    zero = done(ctx.run(GenerationRequest(**SMALL, controlnet=[unit(weight=0.0)]), timeout=300))
    assert np.abs(pixels(one) - pixels(plain)).mean() > 1.0  # mean change in 0..255 levels
    assert np.abs(pixels(zero) - pixels(plain)).max() <= 1  # weight 0: the plain image within 1/255
    fields = parse_infotext(one.images[0].infotext)
    assert fields["ControlNet 0"].startswith("Module: none, Model: t2iadapter_tiny_sd15v2 [")
    assert "Weight: 1.0" in fields["ControlNet 0"] and "Guidance End: 1.0" in fields["ControlNet 0"]
    assert one.extra_images and one.extra_images[0].size == (64, 64)


def test_job_equals_diffusers_adapter_pipeline(ctx):
    """Same UNet/VAE/text encoder/adapter, prompt embeddings, scheduler and initial noise; deterministic Euler.
    Tolerance: 1/255 per pixel (float32 CPU; only summation order may differ)."""
    from diffusers import StableDiffusionAdapterPipeline

    from webui.generation.runner import initial_noise
    from webui.generation.samplers import make_scheduler

    request = GenerationRequest(**SMALL, sampler="Euler", controlnet=[unit(weight=0.8)])
    ours = done(ctx.run(request, timeout=300))
    model = ctx.manager.current
    adapter = ctx.controlnets.get("t2iadapter_tiny_sd15v2", Arch.SD1)
    base = model.pipe
    reference = StableDiffusionAdapterPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, adapter=adapter,
        scheduler=make_scheduler(model.components.scheduler_config, "Euler", request.schedule,
                                 prediction_type=model.prediction.value if model.prediction else None, seed=3),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    embeds = model.encoder.encode_schedule(request.prompt, request.negative_prompt, request.steps,
                                           request.clip_skip)[0][1]
    noise = initial_noise([3], [ours.info["subseed"]], 0.0, (4, 8, 8))
    with torch.no_grad():
        image = reference(image=circle(), width=64, height=64, num_inference_steps=4, guidance_scale=7.0,
                          latents=noise, adapter_conditioning_scale=0.8, output_type="pil", **embeds).images[0]
    diff = np.abs(np.asarray(image, dtype=np.int16) - pixels(ours))
    assert diff.max() <= 1, diff.max()


def test_guidance_end_and_two_units(ctx):
    full = done(ctx.run(GenerationRequest(**SMALL, controlnet=[unit()]), timeout=300))
    half = done(ctx.run(GenerationRequest(**SMALL, controlnet=[unit(guidance_end=0.5)]), timeout=300))
    two = done(ctx.run(GenerationRequest(**SMALL, controlnet=[unit(), unit(model="tiny_t2i_sd15_diffusers")]),
                       timeout=300))
    assert not np.array_equal(pixels(full), pixels(half))
    assert not np.array_equal(pixels(full), pixels(two))
    assert {"ControlNet 0", "ControlNet 1"} <= set(parse_infotext(two.images[0].infotext))


def test_sdxl_unit_changes_the_image(ctx):
    xl = dict(SMALL, checkpoint="tiny_sdxl")
    plain = done(ctx.run(GenerationRequest(**xl), timeout=300))
    one = done(ctx.run(GenerationRequest(**xl, controlnet=[unit(model="t2i-adapter_tiny_xl")]), timeout=300))
    assert np.abs(pixels(one) - pixels(plain)).mean() > 1.0


def test_refusals_are_clear_and_the_next_job_works(ctx):
    mixed = ctx.run(GenerationRequest(**SMALL, controlnet=[unit(), unit(model="tiny_control_sd15_canny",
                                                                        module="canny")]), timeout=300)
    assert mixed.state is JobState.FAILED
    assert "cannot be combined with ControlNet units (tiny_control_sd15_canny)" in mixed.error
    img = ctx.run(Img2ImgRequest(**SMALL, init_images=[circle()], controlnet=[unit()]), timeout=300)
    assert img.state is JobState.FAILED and "work in txt2img only" in img.error
    wrong = ctx.run(GenerationRequest(**SMALL, controlnet=[unit(model="t2i-adapter_tiny_xl")]), timeout=300)
    assert wrong.state is JobState.FAILED and "is for SDXL but the loaded checkpoint is SD 1.x" in wrong.error
    done(ctx.run(GenerationRequest(**SMALL), timeout=300))


def test_modes_and_hires_are_noted(ctx):
    hires = dict(enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.6)
    result = done(ctx.run(GenerationRequest(**SMALL, **hires, controlnet=[unit(
        control_mode="My prompt is more important")]), timeout=300))
    assert result.images[0].image.size == (128, 128)
    warnings = " ".join(result.info["warnings"])
    assert "ran as Balanced" in warnings and "second pass runs without the T2I-Adapter" in warnings
