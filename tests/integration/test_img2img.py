"""img2img / inpaint / instruction-edit through the one generation path (AppContext -> worker -> runner).

Behaviour a user sees: output size and infotext, same seed = same pixels, denoising strength controls
how far the result moves from the input, inpainting leaves unmasked pixels bit-identical (whole picture
and "only masked"), 9-channel inpaint checkpoints work in img2img and txt2img, instruct-pix2pix edits,
and components are shared (switching task never reloads the checkpoint).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.fixtures.controlnet_factory import place_controlnets
from tests.fixtures.factory import TinyModels
from tests.fixtures.ip_adapter_factory import place_ip_adapters
from webui.context import AppContext
from webui.image_requests import ControlUnit, Img2ImgRequest, ReferenceImages
from webui.io.metadata import parse_infotext
from webui.settings import Settings
from webui.types import GenerationRequest, JobState, RequestError

SMALL = dict(width=64, height=64, steps=4, prompt="a red fox", negative_prompt="blurry", seed=3)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("img2img")
    models = TinyModels(root, fixture_cache)
    for name in ("sd15", "sd15_inpaint", "sd15_pix2pix"):
        models.path(name)
    place_ip_adapters(root / "models", fixture_cache, ("ipadapter/tiny-ip-adapter_sd15.safetensors",
                                                       "clip_vision/tiny-CLIP-ViT-H-14.safetensors"))
    place_controlnets(root / "models" / "ControlNet", fixture_cache,
                      ("tiny_control_sd15_canny.safetensors", "tiny_cn_sd15_diffusers", "tiny_cn_sdxl.safetensors"))
    context = AppContext.create(Settings.for_data_dir(root))
    context.options.update({"sd_model_checkpoint": "tiny_sd15"})
    yield context
    context.close()


def gradient(width=96, height=80) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 90, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


def square_mask(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def done(job):
    assert job.state is JobState.DONE, job.error
    return job.result


def arr(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_img2img_size_infotext_and_determinism(ctx):
    source = gradient()
    a = done(ctx.run(Img2ImgRequest(**SMALL, init_images=[source], denoising_strength=0.5), timeout=120))
    b = done(ctx.run(Img2ImgRequest(**SMALL, init_images=[source], denoising_strength=0.5), timeout=120))
    image = a.images[0].image
    assert image.size == (64, 64)
    assert np.array_equal(arr(image), arr(b.images[0].image))
    fields = parse_infotext(a.images[0].infotext)
    assert fields["Denoising strength"] == "0.5"
    assert a.info["mode"] == "img2img" and a.info["task"] == "img2img"
    assert a.images[0].path and "img2img" in a.images[0].path


def test_denoising_strength_sets_the_steps_run(ctx):
    # A1111: img2img runs steps x denoising strength sampling steps (tiny random VAEs blur colours, so the
    # distance from the input is not a usable measure here; the step count is)
    source = gradient(64, 64)
    jobs = {s: ctx.run(Img2ImgRequest(**{**SMALL, "steps": 8}, init_images=[source], denoising_strength=s),
                       timeout=120) for s in (0.25, 0.5, 1.0)}
    assert {s: (done(j), j.progress.total_steps)[1] for s, j in jobs.items()} == {0.25: 2, 0.5: 4, 1.0: 8}
    assert not np.array_equal(arr(jobs[0.25].result.images[0].image), arr(jobs[1.0].result.images[0].image))
    with pytest.raises(RequestError, match="raise the denoising strength"):  # refused at submit time
        ctx.submit(Img2ImgRequest(**SMALL, init_images=[source], denoising_strength=0.1))


def test_inpaint_whole_picture_keeps_unmasked_pixels(ctx):
    source = gradient(64, 64)
    mask = square_mask((64, 64), (16, 16, 47, 47))
    result = done(ctx.run(Img2ImgRequest(**SMALL, init_images=[source], mask=mask, mask_blur=0,
                                         denoising_strength=1.0, inpainting_fill=2), timeout=120))
    out, base = arr(result.images[0].image), arr(source)
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], base[outside])
    assert np.abs(out[~outside] - base[~outside]).mean() > 5  # the masked area was generated
    fields = parse_infotext(result.images[0].infotext)
    assert fields["Masked content"] == "latent noise" and fields["Mask blur"] == "0"


def test_inpaint_only_masked_returns_full_size_and_pastes_back(ctx):
    source = gradient(160, 128)
    mask = square_mask(source.size, (100, 40, 130, 70))
    result = done(ctx.run(Img2ImgRequest(**SMALL, init_images=[source], mask=mask, mask_blur=2,
                                         inpaint_full_res=True, inpaint_full_res_padding=8,
                                         denoising_strength=0.9), timeout=120))
    out = result.images[0].image
    assert out.size == source.size  # pasted back into the original, not the 64x64 working size
    far = np.ones((128, 160), bool)
    far[30:81, 90:141] = False  # mask + blur + a margin
    assert np.array_equal(arr(out)[far], arr(source)[far])
    assert parse_infotext(result.images[0].infotext)["Inpaint area"] == "Only masked"


@pytest.mark.parametrize("fill", [0, 1, 3])
def test_inpaint_checkpoint_runs_each_masked_content(ctx, fill):
    source = gradient(64, 64)
    mask = square_mask((64, 64), (8, 8, 40, 40))
    result = done(ctx.run(Img2ImgRequest(**SMALL, checkpoint="tiny_sd15_inpaint", init_images=[source], mask=mask,
                                         mask_blur=0, inpainting_fill=fill, denoising_strength=0.8), timeout=120))
    assert result.info["task"] == "inpaint"
    outside = np.asarray(mask) == 0
    assert np.array_equal(arr(result.images[0].image)[outside], arr(source)[outside])


def test_txt2img_on_inpaint_checkpoint(ctx):
    result = done(ctx.run(GenerationRequest(**SMALL, checkpoint="tiny_sd15_inpaint"), timeout=120))
    assert result.images[0].image.size == (64, 64)


def test_instruct_pix2pix_edit_and_image_cfg(ctx):
    source = gradient(64, 64)
    one = done(ctx.run(Img2ImgRequest(**SMALL, checkpoint="tiny_sd15_pix2pix", init_images=[source],
                                      image_cfg_scale=1.0), timeout=120))
    two = done(ctx.run(Img2ImgRequest(**SMALL, checkpoint="tiny_sd15_pix2pix", init_images=[source],
                                      image_cfg_scale=2.5), timeout=120))
    assert one.info["task"] == "edit"
    assert parse_infotext(one.images[0].infotext)["Image CFG scale"] == "1"
    assert not np.array_equal(arr(one.images[0].image), arr(two.images[0].image))
    txt = ctx.run(GenerationRequest(**SMALL, checkpoint="tiny_sd15_pix2pix"), timeout=120)
    assert txt.state is JobState.FAILED and "instruction-edit" in txt.error


def test_batch_cycles_init_images_and_shares_components(ctx):
    red, blue = Image.new("RGB", (64, 64), (220, 20, 20)), Image.new("RGB", (64, 64), (20, 20, 220))
    common = {**SMALL, "denoising_strength": 0.5}
    batch = done(ctx.run(Img2ImgRequest(**common, init_images=[red, blue], batch_size=2), timeout=120))
    alone = {name: done(ctx.run(Img2ImgRequest(**{**common, "seed": 4}, init_images=[img]), timeout=120))
             for name, img in (("red", red), ("blue", blue))}
    second = arr(batch.images[1].image)  # seed 4, second init image
    to_blue = np.abs(second - arr(alone["blue"].images[0].image)).mean()
    to_red = np.abs(second - arr(alone["red"].images[0].image)).mean()
    assert to_blue < 1.0 < to_red  # same seed + same init image = same picture, whatever the batch position
    model = ctx.manager.current
    views = list(model.task_pipes.values())
    assert views and all(view.unet is model.pipe.unet and view.vae is model.pipe.vae for view in views)
    done(ctx.run(GenerationRequest(**SMALL), timeout=120))
    assert ctx.manager.current is model  # txt2img after img2img: no reload


def test_bad_input_fails_the_job_with_a_message_and_the_next_job_works(ctx):
    source = gradient(64, 64)
    empty = Image.new("L", (64, 64), 0)
    job = ctx.run(Img2ImgRequest(**SMALL, init_images=[source], mask=empty), timeout=120)
    assert job.state is JobState.FAILED and "mask is empty" in job.error
    done(ctx.run(Img2ImgRequest(**SMALL, init_images=[source]), timeout=120))


def canny_unit(**changes) -> ControlUnit:
    fields = dict(image=gradient(64, 64), module="canny", model="tiny_control_sd15_canny", weight=1.0,
                  processor_res=64)
    return ControlUnit(**{**fields, **changes})


def test_controlnet_units_in_txt2img_change_the_image_and_are_in_infotext(ctx):
    plain = done(ctx.run(GenerationRequest(**SMALL), timeout=120))
    one = done(ctx.run(GenerationRequest(**SMALL, controlnet=[canny_unit()]), timeout=120))
    zero = done(ctx.run(GenerationRequest(**SMALL, controlnet=[canny_unit(weight=0.0)]), timeout=120))
    two = done(ctx.run(GenerationRequest(**SMALL, controlnet=[canny_unit(), canny_unit(
        model="tiny_cn_sd15_diffusers", module="none", guidance_end=0.5)]), timeout=120))
    assert not np.array_equal(arr(plain.images[0].image), arr(one.images[0].image))
    assert np.abs(arr(plain.images[0].image) - arr(zero.images[0].image)).max() <= 1  # weight 0 = no control
    assert not np.array_equal(arr(one.images[0].image), arr(two.images[0].image))
    fields = parse_infotext(two.images[0].infotext)
    assert "canny" in fields["ControlNet 0"] and "ControlNet 1" in fields
    assert one.extra_images and one.extra_images[0].size == (64, 64)  # the preprocessed map is returned
    assert ctx.manager.current.name.startswith("tiny_sd15")


def test_hires_fix_applies_the_controlnet_units_again_in_the_second_pass(ctx):
    """End to end (128x128 result, MultiControlNet view, infotext), then the second pass alone on the same
    first-pass latents: with the unit it differs from no unit; with the unit at weight 0 it equals no unit
    (the ControlNet residuals are scaled by 0; float32 on the CPU, tolerance 1e-5)."""
    import time

    import torch

    from tests.fixtures.dit_pipes import Control
    from webui.generation.control import prepare_control
    from webui.generation.hires import run_hires

    hires = dict(enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.6)
    two_units = [canny_unit(), canny_unit(model="tiny_cn_sd15_diffusers", module="none", guidance_end=0.5)]
    result = done(ctx.run(GenerationRequest(**SMALL, **hires, controlnet=two_units), timeout=120))
    assert result.images[0].image.size == (128, 128)
    assert "ControlNet 1" in parse_infotext(result.images[0].infotext)

    model = ctx.manager.current  # idle worker: the second pass is run here directly
    request = GenerationRequest(**SMALL, **hires)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    def second_pass(units):
        cond = prepare_control(units, base_arch=model.arch, width=64, height=64, loader=ctx.controlnets,
                               do_cfg=True) if units else None
        out, interrupted = run_hires(model=model, request=request, latents=latents.clone(), seeds=[3],
                                     control=Control(), started=time.perf_counter(), control_cond=cond)
        assert not interrupted
        return out

    plain, controlled, zero = second_pass([]), second_pass([canny_unit()]), second_pass([canny_unit(weight=0.0)])
    assert controlled.shape == plain.shape == (1, 4, 16, 16)
    assert (controlled - plain).abs().max() > 1e-3
    assert torch.allclose(zero, plain, atol=1e-5)


def test_send_to_restores_controlnet_unit_settings_from_the_infotext(ctx):
    """A result's infotext fills the target tab's units as they ran (not their images); other units off."""
    from webui.ui.send_to import parameter_values

    unit = canny_unit(weight=0.8, guidance_start=0.1, guidance_end=0.9, resize_mode=2, pixel_perfect=False,
                      control_mode="ControlNet is more important", threshold_a=50, threshold_b=150)
    result = done(ctx.run(GenerationRequest(**SMALL, controlnet=[unit]), timeout=120))
    values = parameter_values(result.images[0].infotext, None, unit_count=3)
    assert {k: v for k, v in values.items() if k.startswith("cn")} == {
        "cn0_enabled": True, "cn0_module": "canny", "cn0_model": "tiny_control_sd15_canny", "cn0_weight": 0.8,
        "cn0_resize_mode": "Resize and Fill", "cn0_processor_res": 64, "cn0_threshold_a": 50.0,
        "cn0_threshold_b": 150.0, "cn0_guidance_start": 0.1, "cn0_guidance_end": 0.9, "cn0_pixel_perfect": False,
        "cn0_control_mode": "ControlNet is more important", "cn1_enabled": False, "cn2_enabled": False}
    assert values["prompt"] == SMALL["prompt"]
    assert not any(k.startswith("cn") for k in parameter_values(
        done(ctx.run(GenerationRequest(**SMALL), timeout=120)).images[0].infotext, None, unit_count=3))


def test_controlnet_in_img2img_uses_the_input_image_and_inpaint_keeps_unmasked(ctx):
    source = gradient(64, 64)
    mask = square_mask((64, 64), (16, 16, 47, 47))
    unit = canny_unit(image=None)
    img = done(ctx.run(Img2ImgRequest(**SMALL, init_images=[source], controlnet=[unit]), timeout=120))
    assert "ControlNet 0" in parse_infotext(img.images[0].infotext)
    inp = done(ctx.run(Img2ImgRequest(**SMALL, init_images=[source], mask=mask, mask_blur=0, controlnet=[unit],
                                      denoising_strength=1.0), timeout=120))
    outside = np.asarray(mask) == 0
    assert np.array_equal(arr(inp.images[0].image)[outside], arr(source)[outside])


def test_controlnet_errors_are_clear(ctx):
    no_image = ctx.run(GenerationRequest(**SMALL, controlnet=[canny_unit(image=None)]), timeout=120)
    assert no_image.state is JobState.FAILED and "no image" in no_image.error
    wrong = ctx.run(GenerationRequest(**SMALL, controlnet=[canny_unit(model="tiny_cn_sdxl")]), timeout=120)
    assert wrong.state is JobState.FAILED and "SDXL" in wrong.error
    done(ctx.run(GenerationRequest(**SMALL), timeout=120))  # and the next job works


def test_reference_images_in_txt2img_and_img2img_and_the_unet_is_restored(ctx):
    red, blue = Image.new("RGB", (64, 64), (220, 30, 30)), gradient(64, 64)
    ref = dict(model="tiny-ip-adapter_sd15", weight=1.0)
    plain = done(ctx.run(GenerationRequest(**SMALL), timeout=120))
    with_red = done(ctx.run(GenerationRequest(**SMALL, ip_adapters=[ReferenceImages(**ref, images=[red])]),
                            timeout=120))
    with_two = done(ctx.run(GenerationRequest(**SMALL, ip_adapters=[ReferenceImages(**ref, images=[red, blue])]),
                            timeout=120))
    assert not np.array_equal(arr(plain.images[0].image), arr(with_red.images[0].image))
    assert not np.array_equal(arr(with_red.images[0].image), arr(with_two.images[0].image))
    assert "IP-Adapter" in parse_infotext(with_red.images[0].infotext)
    img = done(ctx.run(Img2ImgRequest(**SMALL, init_images=[blue], ip_adapters=[ReferenceImages(**ref, images=[red])]),
                       timeout=120))
    assert img.images[0].image.size == (64, 64)
    again = done(ctx.run(GenerationRequest(**SMALL), timeout=120))
    assert np.array_equal(arr(plain.images[0].image), arr(again.images[0].image))  # adapter detached exactly
