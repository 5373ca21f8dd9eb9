"""DiT generation (SD3, Flux dev/schnell, Flux Kontext, Qwen-Image, Qwen-Image-Edit) through the shared runner.

Tiny random-weight pipelines built in-process (tests/fixtures/dit_pipes.py), 64x64, 2 steps, CPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.dit_pipes import Control, FakeModel, flux_pipe, qwen_pipe, sd3_pipe
from webui.generation.dit import build_dit_plan, fit_area, stitch_references
from webui.generation.runner import RunOptions, run_generation
from webui.image_requests import Img2ImgRequest
from webui.io.metadata import parse_infotext
from webui.types import Arch, GenerationRequest, RequestError, Variant

BASE = dict(prompt="a red fox in the snow", steps=2, width=64, height=64, sampler="Euler", schedule="Automatic",
            cfg_scale=3.0)
BUILDERS = {Arch.FLUX: flux_pipe, Arch.SD3: sd3_pipe, Arch.QWEN_IMAGE: qwen_pipe}


@pytest.fixture(scope="module")
def models():
    return {arch: FakeModel(build(), arch) for arch, build in BUILDERS.items()}


def run(model, request, control=None, **options):
    control = control or Control()
    opts = RunOptions(outdir=Path("unused"), save=False, **options)
    return run_generation(model, request, control, opts, build_dit_plan(model, request)), control


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(result.images[index].image, dtype=np.int16)


@pytest.mark.parametrize("arch", list(BUILDERS), ids=lambda a: a.value)
def test_txt2img_seeds_infotext_previews(models, arch):
    model = models[arch]
    a, control = run(model, GenerationRequest(**{**BASE, "steps": 3}, seed=11))
    b, _ = run(model, GenerationRequest(**{**BASE, "steps": 3}, seed=11))
    c, _ = run(model, GenerationRequest(**{**BASE, "steps": 3}, seed=12))
    assert a.images[0].image.size == (64, 64)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    fields = parse_infotext(a.images[0].infotext)
    assert fields["Sampler"] == "Euler" and fields["Schedule type"] == "Simple"
    assert fields["Model"] == "tiny_dit" and fields["Seed"] == "11"
    assert a.info["sampler_name"] == "Euler" and a.info["mode"] == "txt2img"
    previews = control.previews
    assert previews and previews[0].size == (64, 64)  # 8x8 latent preview of 16 channels, scaled up 8x
    assert len(np.unique(np.asarray(previews[0]).reshape(-1, 3), axis=0)) > 1


@pytest.mark.parametrize("arch", list(BUILDERS), ids=lambda a: a.value)
def test_batch_position_does_not_change_an_image(models, arch):
    model = models[arch]
    batch, _ = run(model, GenerationRequest(**BASE, seed=20, batch_size=2))
    single, _ = run(model, GenerationRequest(**BASE, seed=21))
    assert batch.info["all_seeds"] == [20, 21]
    assert np.abs(pixels(batch, 1) - pixels(single)).max() <= 1


@pytest.mark.parametrize("arch", [Arch.FLUX, Arch.QWEN_IMAGE], ids=lambda a: a.value)
def test_packed_noise_matches_diffusers_own_sampling(models, arch):
    """Our per-seed CPU noise, packed like the pipeline packs it, gives diffusers' own result for that seed."""
    model = models[arch]
    ours, _ = run(model, GenerationRequest(**BASE, seed=7))
    pipe = model.pipe
    kwargs = model.encoder.encode_schedule(BASE["prompt"], "", 2)[0][1]
    guidance = {"guidance_scale": 3.0} if arch is Arch.FLUX else {"true_cfg_scale": 3.0}
    pipe.scheduler = type(pipe.scheduler).from_config(model.components.scheduler_config)
    theirs = pipe(**kwargs, **guidance, width=64, height=64, num_inference_steps=2,
                  generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.abs(pixels(ours) - np.asarray(theirs, dtype=np.int16)).max() <= 1


def test_negative_prompt_per_family(models):
    def image(arch, negative):
        return pixels(run(models[arch], GenerationRequest(**BASE, seed=3, negative_prompt=negative))[0])

    # SD3: real CFG with the negative prompt; Qwen-Image: true CFG with it
    assert not np.array_equal(image(Arch.SD3, ""), image(Arch.SD3, "blurry, dark"))
    assert not np.array_equal(image(Arch.QWEN_IMAGE, ""), image(Arch.QWEN_IMAGE, "blurry, dark"))
    # Flux: distilled guidance, no negative prompt
    assert np.array_equal(image(Arch.FLUX, ""), image(Arch.FLUX, "blurry, dark"))


def test_flux_distilled_guidance_is_the_cfg_value(models):
    model = models[Arch.FLUX]
    low, _ = run(model, GenerationRequest(**{**BASE, "cfg_scale": 1.0}, seed=4))
    high, _ = run(model, GenerationRequest(**{**BASE, "cfg_scale": 6.0}, seed=4))
    assert not np.array_equal(pixels(low), pixels(high))
    schnell = FakeModel(flux_pipe(schnell=True), Arch.FLUX)  # no guidance embedding: the value is ignored
    a, _ = run(schnell, GenerationRequest(**{**BASE, "cfg_scale": 1.0}, seed=4))
    b, _ = run(schnell, GenerationRequest(**{**BASE, "cfg_scale": 6.0}, seed=4))
    assert np.array_equal(pixels(a), pixels(b))


def test_interrupt_stops_without_images(models):
    result, control = run(models[Arch.FLUX], GenerationRequest(**{**BASE, "steps": 4}, seed=1, n_iter=2),
                          control=Control(interrupt_at=1))
    assert result.interrupted and result.images == ()
    assert max(u.get("step", 0) for u in control.updates) < 4


def test_unsupported_features_are_refused_with_a_reason(models):
    model = models[Arch.SD3]
    with pytest.raises(RequestError, match="flow-matching Euler"):
        build_dit_plan(model, GenerationRequest(**{**BASE, "sampler": "DPM++ 2M"}))
    with pytest.raises(RequestError, match="schedule type 'Karras'"):
        build_dit_plan(model, GenerationRequest(**{**BASE, "schedule": "Karras"}))
    assert build_dit_plan(model, GenerationRequest(**BASE, enable_hr=True)).hires is not None  # webui...dit_hires
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    with pytest.raises(RequestError, match="inpainting"):
        build_dit_plan(model, Img2ImgRequest(**BASE, init_images=(gray,), mask=Image.new("L", (64, 64), 255)))
    with pytest.raises(RequestError, match="multiple of 16"):
        build_dit_plan(models[Arch.FLUX], GenerationRequest(**{**BASE, "width": 72}))


def test_flux_img2img_uses_the_init_image(models):
    model = models[Arch.FLUX]
    red = Image.new("RGB", (64, 64), (220, 20, 20))
    blue = Image.new("RGB", (64, 64), (20, 20, 220))
    request = Img2ImgRequest(**{**BASE, "steps": 4}, seed=2, init_images=(red,), denoising_strength=0.5)
    assert len(run(model, request.with_changes(batch_size=2))[0].images) == 2
    plan = build_dit_plan(model, request)
    assert type(plan.pipe).__name__ == "FluxImg2ImgPipeline" and plan.steps_run == 2
    a, _ = run(model, request)
    b, _ = run(model, request.with_changes(init_images=(blue,)))
    assert parse_infotext(a.images[0].infotext)["Denoising strength"] == "0.5"
    assert not np.array_equal(pixels(a), pixels(b))


@pytest.mark.parametrize("arch,pipeline", [(Arch.SD3, "StableDiffusion3Img2ImgPipeline"),
                                           (Arch.QWEN_IMAGE, "QwenImageImg2ImgPipeline")], ids=["sd3", "qwen_image"])
def test_img2img_pipelines_of_the_other_families(models, arch, pipeline):
    model = models[arch]
    request = Img2ImgRequest(**{**BASE, "steps": 4}, seed=2, init_images=(Image.new("RGB", (80, 64), (200, 9, 9)),),
                             denoising_strength=0.5, batch_size=2)
    plan = build_dit_plan(model, request)
    assert type(plan.pipe).__name__ == pipeline and plan.pipe.transformer is model.pipe.transformer
    result, control = run(model, request)
    assert len(result.images) == 2 and result.images[0].image.size == (64, 64)
    assert control.previews and result.info["task"] == "img2img"


# ----------------------------------------------------------------------------- edit models
def _refs(count: int) -> tuple[Image.Image, ...]:
    return tuple(Image.new("RGB", (64 + 16 * i, 48), (200, 40 * i, 10)) for i in range(count))


def test_reference_geometry_helpers():
    assert fit_area((128, 64), 64 * 64) == (96, 48)
    stitched = stitch_references([Image.new("RGB", (32, 20)), Image.new("RGB", (16, 40))])
    assert stitched.size == (48, 40)


@pytest.fixture(scope="module")
def kontext():
    return FakeModel(flux_pipe(kontext=True), Arch.FLUX, Variant.EDIT)


@pytest.mark.parametrize("count", [1, 2])
def test_kontext_edit_with_reference_images(kontext, count):
    request = Img2ImgRequest(**{**BASE, "prompt": "make it blue"}, seed=5, init_images=_refs(count),
                             batch_size=count)
    plan = build_dit_plan(kontext, request)
    assert type(plan.pipe).__name__ == "FluxKontextPipeline"
    result, _ = run(kontext, request)
    assert len(result.images) == count and result.images[0].image.size == (64, 64)
    assert parse_infotext(result.images[0].infotext)["Reference images"] == str(count)
    other, _ = run(kontext, request.with_changes(init_images=(Image.new("RGB", (64, 48), (0, 0, 0)),) * count))
    assert not np.array_equal(pixels(result), pixels(other))  # the reference conditions the result


def test_kontext_model_still_does_txt2img(kontext):
    plan = build_dit_plan(kontext, GenerationRequest(**BASE, seed=1))
    assert type(plan.pipe).__name__ == "FluxPipeline"
    result, _ = run(kontext, GenerationRequest(**BASE, seed=1))
    assert len(result.images) == 1


@pytest.mark.parametrize("count", [1, 2])
def test_qwen_image_edit_with_reference_images(count):
    model = FakeModel(qwen_pipe(edit=True), Arch.QWEN_IMAGE, Variant.EDIT)
    request = Img2ImgRequest(**{**BASE, "prompt": "make it (blue:1.2)"}, seed=5, init_images=_refs(count),
                             batch_size=count)
    plan = build_dit_plan(model, request)
    expected = "QwenImageEditPipeline" if count == 1 else "QwenImageEditPlusPipeline"
    assert type(plan.pipe).__name__ == expected
    assert plan.pipe.transformer is model.pipe.transformer  # a view over the same components
    result, control = run(model, request)
    assert len(result.images) == count and result.images[0].image.size == (64, 64)
    assert result.info["reference_images"] == count and control.previews


# ----------------------------------------------------------------------------- the job handler's DiT branch
class _Manager:
    def __init__(self, model):
        self.model = model

    def ensure(self, checkpoint, vae):
        return self.model

    def apply_loras(self, model, refs):
        from webui.models.manager import LoraApplication

        return LoraApplication(hashes={})


class _Options(dict):
    def get(self, key, default=None):
        return super().get(key, default)


def test_job_handler_picks_the_dit_plan_and_reports_prompt_notes(models, tmp_path):
    from types import SimpleNamespace

    from webui.runtime.handlers import build_handlers

    ctx = SimpleNamespace(
        manager=_Manager(models[Arch.FLUX]), lora_library=None, plugins=None, samplers=None,
        settings=SimpleNamespace(outdir=tmp_path),
        options=_Options(outdir_samples="", samples_filename_pattern="[seed]", samples_save=False,
                         live_previews_enable=True, show_progress_every_n_steps=1))
    handler = build_handlers(ctx)[GenerationRequest]
    request = GenerationRequest(**{**BASE, "prompt": "a (red:1.3) fox"}, negative_prompt="blurry", seed=9)
    result = handler(SimpleNamespace(request=request), Control())
    assert len(result.images) == 1 and result.info["guidance"] == "distilled"
    warnings = " | ".join(result.info["warnings"])
    assert "weights" in warnings and "negative prompt is ignored" in warnings
    plain, _ = run(models[Arch.FLUX], GenerationRequest(**{**BASE, "prompt": "a red fox"}, seed=9))
    assert np.array_equal(pixels(result), pixels(plain))  # weights stripped: same conditioning as plain text
    with pytest.raises(RequestError, match="ControlNet"):
        from webui.image_requests import ControlUnit

        unit = ControlUnit(model="canny", image=Image.new("RGB", (64, 64)))
        handler(SimpleNamespace(request=request.with_changes(controlnet=(unit,))), Control())


def test_txt2img_and_img2img_tabs_adapt_to_the_checkpoint_family(tmp_path):
    from webui.context import AppContext
    from webui.settings import Settings
    from webui.ui import build_ui

    context = AppContext.create(Settings.for_data_dir(tmp_path))
    try:
        demo = build_ui(context)
        adapters = [d for d in demo.fns.values() if "family_controls" in getattr(d.fn, "__module__", "")]
        assert len(adapters) == 2  # txt2img + img2img
        outputs = {getattr(o, "elem_id", None) for d in adapters for o in d.outputs}
        assert {"txt2img_neg_prompt", "txt2img_cfg_scale", "txt2img_sampling"} <= outputs
    finally:
        context.close()
