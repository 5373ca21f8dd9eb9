"""Chroma and Flux.1 Fill end to end through the app (AppContext -> worker -> manager -> runner).

* Chroma from the split layout (BFL single file in models/unet + T5 + 16-ch VAE) and as a diffusers folder:
  txt2img with a negative prompt (real CFG); our job equals diffusers' own ``ChromaPipeline`` called with the
  same loaded components, prompt, negative prompt, seed and steps (max pixel difference <= 1 of 255).
* Flux.1 Fill (single file and folder): an inpaint request keeps the unmasked pixels of the input (A1111
  overlay) and regenerates the masked ones; txt2img on Fill inpaints a blank image; a mask on a normal Flux
  model is refused naming Fill.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.chroma_fill_factory import ChromaFillModels
from tests.fixtures.jobs import done, pixels
from webui.context import AppContext
from webui.image_requests import Img2ImgRequest
from webui.io.metadata import parse_infotext
from webui.types import GenerationRequest, JobState

SMALL = dict(width=64, height=64, steps=2, prompt="a red house on a hill", sampler="Euler", schedule="Simple",
             seed=11)
CHROMA = "chroma-unlocked-v50-tiny"
FILL = "flux1-fill-dev-tiny"


@pytest.fixture(scope="module")
def ctx(fixture_cache, tmp_path_factory):
    models = ChromaFillModels(tmp_path_factory.mktemp("chroma_fill"), fixture_cache)
    models.chroma_unet(), models.fill_unet(), models.text_encoders(), models.vae()
    models.chroma_folder(), models.fill_folder(), models.flux_unet()
    context = AppContext.create(models.settings())
    yield context
    context.close()


def test_chroma_single_file_txt2img_uses_the_negative_prompt(ctx):
    a = done(ctx.run(GenerationRequest(**SMALL, checkpoint=CHROMA, negative_prompt="blurry", cfg_scale=4.0),
                     timeout=300))
    b = done(ctx.run(GenerationRequest(**SMALL, checkpoint=CHROMA, negative_prompt="blurry", cfg_scale=4.0),
                     timeout=300))
    other = done(ctx.run(GenerationRequest(**SMALL, checkpoint=CHROMA, negative_prompt="dark night", cfg_scale=4.0),
                         timeout=300))
    assert a.images[0].image.size == (64, 64)
    assert np.array_equal(pixels(a.images[0].image), pixels(b.images[0].image))
    assert not np.array_equal(pixels(a.images[0].image), pixels(other.images[0].image))  # real CFG
    fields = parse_infotext(a.images[0].infotext)
    assert fields["Negative prompt"] == "blurry" and fields["Sampler"] == "Euler"
    assert not any("negative prompt" in w for w in a.info["warnings"])
    model = ctx.manager.current
    assert type(model.pipe).__name__ == "ChromaPipeline" and model.components.family == "Chroma"
    assert model.components.text_encoder_2 is None
    assert model.components.parts["t5xxl"].endswith("t5xxl_fp16.safetensors")


def test_chroma_job_equals_diffusers_chroma_pipeline(ctx):
    import torch
    from diffusers import ChromaPipeline

    from webui.models.dit.components import make_scheduler

    ours = done(ctx.run(GenerationRequest(**{**SMALL, "steps": 3}, checkpoint=CHROMA, negative_prompt="blurry",
                                          cfg_scale=3.0), timeout=300))
    c = ctx.manager.current.components
    reference = ChromaPipeline(scheduler=make_scheduler(c.scheduler_config), vae=c.vae, text_encoder=c.text_encoder,
                               tokenizer=c.tokenizer, transformer=c.transformer)
    reference.set_progress_bar_config(disable=True)
    image = reference(prompt=SMALL["prompt"], negative_prompt="blurry", guidance_scale=3.0, num_inference_steps=3,
                      width=64, height=64, generator=[torch.Generator("cpu").manual_seed(SMALL["seed"])]).images[0]
    diff = np.abs(pixels(ours.images[0].image) - pixels(image))
    print(f"Chroma vs diffusers ChromaPipeline: max |diff| {diff.max()}, mean {diff.mean():.4f} (of 255)")
    assert diff.max() <= 1, diff.max()


def test_chroma_diffusers_folder_batch_and_img2img(ctx):
    name = next(r.name for r in ctx.checkpoints() if r.name.endswith("tiny-chroma"))
    result = done(ctx.run(GenerationRequest(**SMALL, checkpoint=name, negative_prompt="blurry", cfg_scale=4.0,
                                            batch_size=2), timeout=300))
    assert [im.image.size for im in result.images] == [(64, 64), (64, 64)]
    assert [im.seed for im in result.images] == [SMALL["seed"], SMALL["seed"] + 1]
    assert type(ctx.manager.current.pipe).__name__ == "ChromaPipeline"
    reference = Image.new("RGB", (64, 64), (30, 120, 220))
    edited = done(ctx.run(Img2ImgRequest(**{**SMALL, "steps": 4}, checkpoint=name, init_images=[reference],
                                         denoising_strength=0.5, negative_prompt="blurry"), timeout=300))
    assert edited.info["task"] == "img2img" and edited.images[0].image.size == (64, 64)
    assert ("ChromaImg2ImgPipeline", None) in ctx.manager.current.task_pipes


def _inpaint_case():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # right half: change
    return image, mask


@pytest.mark.parametrize("which", ["file", "folder"])
def test_fill_inpaint_keeps_the_unmasked_area(ctx, which):
    name = FILL if which == "file" else next(r.name for r in ctx.checkpoints() if r.name.endswith("tiny-flux-fill"))
    image, mask = _inpaint_case()
    request = Img2ImgRequest(**SMALL, checkpoint=name, init_images=[image], mask=mask, mask_blur=2,
                             denoising_strength=1.0, cfg_scale=30.0)
    out = pixels(done(ctx.run(request, timeout=300)).images[0].image)
    src = pixels(image)
    assert np.array_equal(out[:, :24], src[:, :24])  # unmasked, left of the blurred edge (2 px blur reaches 5 px)
    assert np.abs(out[:, 36:] - src[:, 36:]).mean() > 10  # masked: generated
    assert type(ctx.manager.current.pipe).__name__ == "FluxFillPipeline"


def test_fill_partial_strength_txt2img_and_refusals(ctx):
    image, mask = _inpaint_case()
    partial = done(ctx.run(Img2ImgRequest(**{**SMALL, "steps": 4}, checkpoint=FILL, init_images=[image], mask=mask,
                                          mask_blur=2, denoising_strength=0.5), timeout=300))
    assert parse_infotext(partial.images[0].infotext)["Denoising strength"] == "0.5"
    assert np.array_equal(pixels(partial.images[0].image)[:, :24], pixels(image)[:, :24])
    blank = done(ctx.run(GenerationRequest(**SMALL, checkpoint=FILL, batch_size=2), timeout=300))
    assert [im.image.size for im in blank.images] == [(64, 64), (64, 64)]
    job = ctx.run(Img2ImgRequest(**SMALL, checkpoint="flux1-dev-tiny", init_images=[image], mask=mask), timeout=300)
    assert job.state is JobState.FAILED and "Flux.1 Fill" in job.error
