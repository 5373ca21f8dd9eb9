"""Hires fix on DiT models (webui.generation.dit_hires) through the app, as users run it: Flux.1 dev from the split
layout, the SD3.5 single file and a Chroma diffusers folder (AppContext -> worker -> manager -> runner), 64x64 ->
128x128, 2 + 2 steps; the second pass checked against diffusers' own pipelines, Interrupt / Skip during the second
pass, the refusals, and the pure helpers."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.fixtures.chroma_fill_factory import ChromaFillModels
from tests.fixtures.dit_pipes import Control, FakeModel, flux_pipe, qwen_pipe
from tests.fixtures.jobs import done, pixels
from webui.context import AppContext
from webui.generation.dit import build_dit_plan, check_request, flow_scheduler, flow_steps_run
from webui.generation.dit_hires import hires_notes, latents_as_image, second_pass_size
from webui.generation.runner import RunOptions, run_generation
from webui.io.metadata import infotext_to_request_fields, parse_infotext
from webui.types import Arch, GenerationRequest, JobState, RequestError, Variant

FLUX, SD3, CHROMA = "flux1-dev-tiny", "sd3.5_medium_incl_clips_tiny", "tiny-chroma"
SMALL = dict(width=64, height=64, steps=2, prompt="a photo of a cat", sampler="Euler", schedule="Simple", seed=4)
HIRES = dict(enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2, denoising_strength=0.5)


@pytest.fixture(scope="module")
def ctx(fixture_cache, tmp_path_factory):
    models = ChromaFillModels(tmp_path_factory.mktemp("dit_hires"), fixture_cache)
    models.flux_unet(), models.text_encoders(), models.vae(), models.sd3_single()
    models.chroma_folder(), models.folder("kontext")
    context = AppContext.create(models.settings())
    yield context
    context.close()


def _hires(checkpoint: str, upscaler: str, **changes) -> GenerationRequest:
    return GenerationRequest(**{**SMALL, **HIRES, "hr_upscaler": upscaler, **changes}, checkpoint=checkpoint)


def _loaded(ctx, checkpoint: str):
    """The app's loaded model for ``checkpoint`` (the worker is idle between jobs)."""
    done(ctx.run(GenerationRequest(**SMALL, checkpoint=checkpoint, save_images=False), timeout=300))
    return ctx.manager.current


def _run_direct(model, request, control):
    options = RunOptions(outdir=Path("unused"), save=False)
    return run_generation(model, request, control, options, build_dit_plan(model, request))


@pytest.mark.parametrize("checkpoint", [FLUX, SD3])
@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_gives_the_larger_image_and_a1111_infotext(ctx, checkpoint, upscaler):
    result = done(ctx.run(_hires(checkpoint, upscaler), timeout=300))
    image = result.images[0]
    assert image.image.size == (128, 128)
    fields = parse_infotext(image.infotext)
    assert fields["Size-1"] == "64" and fields["Size-2"] == "64"  # A1111: Size is the first pass's
    assert float(fields["Hires upscale"]) == 2.0 and fields["Hires upscaler"] == upscaler
    assert fields["Hires steps"] == "2" and float(fields["Denoising strength"]) == 0.5
    assert fields["Sampler"] == "Euler" and fields["Schedule type"] == "Simple"
    again = GenerationRequest(**infotext_to_request_fields(fields))
    assert again.enable_hr and again.hr_upscaler == upscaler and again.hr_second_pass_steps == 2
    first_only = done(ctx.run(GenerationRequest(**SMALL, checkpoint=checkpoint, save_images=False), timeout=300))
    assert first_only.images[0].image.size == (64, 64)


def test_flux_latent_hires_equals_diffusers_own_pipelines_and_is_deterministic(ctx):
    """Reference: FluxPipeline (same seed) -> its latents unpacked and bilinear-upscaled 2x -> FluxImg2ImgPipeline
    with them as ``image``, strength 0.5, the same seed; tolerance 1/255."""
    from diffusers import FluxImg2ImgPipeline

    request = _hires(FLUX, "Latent", save_images=False)
    ours = pixels(done(ctx.run(request, timeout=300)))
    assert np.array_equal(ours, pixels(done(ctx.run(request, timeout=300))))
    assert not np.array_equal(ours, pixels(done(ctx.run(request.with_changes(seed=5), timeout=300))))
    model = ctx.manager.current
    pipe, cfg = model.pipe, request.cfg_scale
    kwargs = model.encoder.encode_schedule(request.prompt, "", 2)[0][1]
    pipe.scheduler = flow_scheduler(model.components.scheduler_config)
    first = pipe(**kwargs, guidance_scale=cfg, width=64, height=64, num_inference_steps=2,
                 generator=torch.Generator("cpu").manual_seed(4), output_type="latent").images
    latents = pipe._unpack_latents(first, 64, 64, pipe.vae_scale_factor)
    upscaled = torch.nn.functional.interpolate(latents, size=(16, 16), mode="bilinear")
    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = flow_scheduler(model.components.scheduler_config)
    theirs = img2img(**kwargs, guidance_scale=cfg, image=upscaled, width=128, height=128, strength=0.5,
                     num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(4)).images[0]
    assert np.abs(ours - pixels(theirs)).max() <= 1


def test_hires_prompt_is_used_and_a_hires_sampler_is_sampled_as_flow_euler(ctx):
    plain = done(ctx.run(_hires(SD3, "Latent", save_images=False), timeout=300))
    styled = done(ctx.run(_hires(SD3, "Latent", save_images=False, hr_prompt="a painting of a dog",
                                 hr_sampler_name="DPM++ 2M"), timeout=300))
    assert not np.array_equal(pixels(plain), pixels(styled))
    fields = parse_infotext(styled.images[0].infotext)
    assert fields["Hires prompt"] == "a painting of a dog"
    assert "Hires sampler" not in fields  # not what ran: the second pass is flow Euler, as the first
    assert any("hires sampler 'DPM++ 2M'" in w and "flow-matching Euler" in w for w in styled.info["warnings"])


def test_chroma_folder_latent_hires_decodes_for_its_img2img_pipeline(ctx):
    result = done(ctx.run(_hires(CHROMA, "Latent", negative_prompt="blurry", cfg_scale=4.0), timeout=300))
    assert result.images[0].image.size == (128, 128)
    assert parse_infotext(result.images[0].infotext)["Hires upscaler"] == "Latent"
    model = ctx.manager.current
    from webui.generation.pipeline_tasks import task_pipeline

    chroma_img2img = task_pipeline(model, "img2img")
    assert type(chroma_img2img).__name__ == "ChromaImg2ImgPipeline" and not latents_as_image(chroma_img2img, 16)


@pytest.mark.parametrize("arch", [Arch.QWEN_IMAGE, Arch.FLUX], ids=lambda a: a.value)
def test_batch_of_two_in_process_and_an_image_keeps_its_seed(arch):
    """Qwen-Image (the pipeline repeats the conditioning) and Flux (we repeat it): batch position does not
    change an image (tolerance 1/255), and the img2img pipeline takes the upscaled latents as they are."""
    from webui.generation.pipeline_tasks import task_pipeline

    model = FakeModel((qwen_pipe if arch is Arch.QWEN_IMAGE else flux_pipe)(), arch)
    request = GenerationRequest(**{**SMALL, **HIRES, "hr_upscaler": "Latent"}, negative_prompt="blurry",
                                cfg_scale=3.0, batch_size=2)
    batch = _run_direct(model, request, Control())
    assert [img.image.size for img in batch.images] == [(128, 128)] * 2
    single = _run_direct(model, request.with_changes(batch_size=1, seed=5), Control())
    assert np.abs(pixels(batch.images[1].image) - pixels(single.images[0].image)).max() <= 1
    assert latents_as_image(task_pipeline(model, "img2img"), 16)


class _HiresControl(Control):
    """Interrupt or Skip at the ``at``-th progress update of a second pass (text "hires step ...")."""

    def __init__(self, action: str, at: int):
        super().__init__()
        self.action, self.at, self.hires_updates, self.skip = action, at, 0, False

    def update(self, **changes) -> None:
        self.updates.append(changes)
        if str(changes.get("text", "")).startswith("hires step"):
            self.hires_updates += 1
            if self.hires_updates == self.at:
                self.interrupted, self.skip = self.action == "interrupt", self.action == "skip"

    def consume_skip(self) -> bool:
        skip, self.skip = self.skip, False
        return skip


def test_interrupt_and_skip_during_the_second_pass(ctx):
    """Each batch's second pass runs 2 steps (4 hires steps x strength 0.5).  Interrupt in the first batch's
    second pass: no image (the interrupted batch is dropped, as in the first pass); in the second batch's: the
    first batch's finished image stays.  Skip in the first batch's: the job goes on with the second batch."""
    model = _loaded(ctx, FLUX)
    request = _hires(FLUX, "Latent", n_iter=2, hr_second_pass_steps=4, save_images=False)
    control = _HiresControl("interrupt", 1)
    result = _run_direct(model, request, control)
    assert result.interrupted and result.images == ()
    steps = [u["step"] for u in control.updates if "step" in u]
    assert max(steps) == 3 and control.updates[-1]["total_steps"] == 4  # progress runs over both passes
    result = _run_direct(model, request, _HiresControl("interrupt", 3))
    assert result.interrupted and [img.seed for img in result.images] == [4]
    assert result.images[0].image.size == (128, 128)
    full = _run_direct(model, request, Control())
    skipped = _run_direct(model, request, _HiresControl("skip", 1))
    assert not skipped.interrupted and [img.seed for img in skipped.images] == [5]
    assert np.array_equal(pixels(skipped.images[0].image), pixels(full.images[1].image))


def test_refusals_name_the_reason_and_the_app_keeps_working(ctx):
    kontext = next(r.name for r in ctx.checkpoints() if "kontext" in r.name.lower())
    job = ctx.run(_hires(kontext, "Latent"), timeout=300)
    assert job.state is JobState.FAILED and "hires fix is not available for edit" in job.error
    fill = SimpleNamespace(arch=Arch.FLUX, components=SimpleNamespace(variant=Variant.INPAINT))
    with pytest.raises(RequestError, match="hires fix is not available for Flux.1 Fill"):
        check_request(fill, _hires(FLUX, "Latent"))
    with pytest.raises(RequestError, match="denoising_strength"):  # strength 0 would leave no second pass
        _hires(FLUX, "Latent", denoising_strength=0.0)
    done(ctx.run(_hires(FLUX, "Lanczos", save_images=False), timeout=300))


# ----------------------------------------------------------------------------- pure helpers
def test_second_pass_size_floors_a1111_targets_to_16():
    assert second_pass_size(GenerationRequest(**{**SMALL, **HIRES})) == (128, 128)
    assert second_pass_size(GenerationRequest(**{**SMALL, **HIRES, "hr_scale": 1.5})) == (96, 96)
    assert second_pass_size(GenerationRequest(**{**SMALL, **HIRES, "hr_resize_x": 200})) == (192, 192)
    assert second_pass_size(GenerationRequest(**{**SMALL, **HIRES, "hr_scale": 1.3})) == (80, 80)  # 83 -> 80


@pytest.mark.parametrize("steps,strength", [(2, 0.5), (3, 0.5), (20, 0.35), (4, 1.0), (10, 0.01), (7, 0.7)])
def test_flow_steps_run_is_what_the_flow_img2img_pipelines_run(steps, strength):
    from diffusers import FluxImg2ImgPipeline

    scheduler = flow_scheduler({"shift": 3.0})
    scheduler.set_timesteps(steps)
    timesteps, count = FluxImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    assert flow_steps_run(steps, strength) == count == len(timesteps) >= 1


def test_hires_notes():
    model = SimpleNamespace(arch=Arch.FLUX, components=SimpleNamespace(pipeline_class="FluxPipeline"))
    assert hires_notes(model, GenerationRequest(**{**SMALL, **HIRES, "hr_sampler_name": "Euler"})) == ()
    notes = hires_notes(model, GenerationRequest(**{**SMALL, **HIRES, "hr_sampler_name": "DPM++ 2M",
                                                    "hr_scheduler": "Karras", "hr_prompt": "a (dog:1.3)"}))
    assert len(notes) == 3 and "'DPM++ 2M'" in notes[0] and "'Karras'" in notes[1]
    assert notes[2].startswith("hires prompt: attention weights")
