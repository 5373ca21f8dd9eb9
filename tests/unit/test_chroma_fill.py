"""Chroma and Flux.1 Fill: key tables (exact round trips), configs from shapes, detection, the Fill mask
conditioning layout (diffusers' ``prepare_mask_latents`` against the pixel-unshuffle math), the Fill start
latents and the family tables (prompt notes, task pipelines, UI profiles)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from tests.fixtures import chroma_fill_factory as cf
from webui.models.detect import detect_path
from webui.models.dit import configs, convert
from webui.types import Arch, ModelKind, RequestError, Variant

V = cf.CHROMA_FILL_VERSION


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_chroma_round_trip_is_exact_and_config_comes_from_shapes():
    model = cf.chroma_transformer(0)
    state = model.state_dict()
    bfl = convert.chroma_from_diffusers(state)
    # real Chroma names (diffusers' convert_chroma_transformer_checkpoint_to_diffusers reads these)
    for key in ("distilled_guidance_layer.in_proj.weight", "distilled_guidance_layer.layers.1.in_layer.weight",
                "distilled_guidance_layer.layers.1.out_layer.bias", "distilled_guidance_layer.norms.1.scale",
                "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.norm.key_norm.scale",
                "single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight", "final_layer.linear.weight",
                "img_in.weight", "txt_in.weight"):
        assert key in bfl, key
    assert not any(p in k for k in bfl for p in ("_mod.", "modulation", "time_in", "vector_in", "guidance_in"))
    assert _same(convert.chroma_to_diffusers(bfl), state)
    config = configs.chroma_config({k: v.shape for k, v in bfl.items()})
    assert config.pop("_class_name") == "ChromaTransformer2DModel"
    assert config.pop("out_channels") == 64
    for key, value in config.items():
        assert tuple(value) == tuple(model.config[key]) if key == "axes_dims_rope" else value == model.config[key], key


def test_chroma_table_rejects_leftovers_and_flux_config_rejects_chroma():
    bfl = convert.chroma_from_diffusers(cf.chroma_transformer(0).state_dict())
    with pytest.raises(convert.ConversionError, match="no place"):
        convert.chroma_to_diffusers({**bfl, "double_blocks.0.img_mod.lin.weight": torch.zeros(2, 2)})
    with pytest.raises(convert.ConversionError, match="vector_in"):
        configs.flux_config({k: v.shape for k, v in bfl.items()})


def test_fill_round_trip_and_config_keep_384_in_64_out():
    model = cf.fill_transformer(0)
    state = model.state_dict()
    bfl = convert.flux_from_diffusers(state)
    assert tuple(bfl["img_in.weight"].shape) == (32, 384)
    assert _same(convert.flux_to_diffusers(bfl), state)
    config = configs.flux_config({k: v.shape for k, v in bfl.items()})
    assert (config["in_channels"], config["out_channels"], config["guidance_embeds"]) == (384, 64, True)


def test_detection_of_chroma_and_fill_files_and_folders(fixture_cache, tmp_path):
    chroma = detect_path(fixture_cache.get(cf.write_chroma_bfl, v=V))
    assert (chroma.kind, chroma.arch, chroma.variant, chroma.family) == (ModelKind.CHECKPOINT, Arch.FLUX,
                                                                         Variant.NORMAL, "Chroma")
    assert chroma.details["needs"] == ["t5xxl", "vae"] and chroma.details["config_key"] == "chroma"
    assert chroma.details["format"] == "bfl" and "unsupported" not in chroma.details
    # the same transformer saved with diffusers key names (transformer/diffusion_pytorch_model.safetensors)
    path = tmp_path / "chroma_diffusers_layout.safetensors"
    save_file({k: v.contiguous() for k, v in cf.chroma_transformer(0).state_dict().items()}, str(path))
    alt = detect_path(path)
    assert (alt.arch, alt.family, alt.details["format"], alt.details["config_key"]) == (
        Arch.FLUX, "Chroma", "diffusers", "chroma")
    fill = detect_path(fixture_cache.get(cf.write_fill_bfl, v=V))
    assert (fill.arch, fill.variant, fill.family) == (Arch.FLUX, Variant.INPAINT, "Flux.1 Fill")
    assert fill.details["in_channels"] == 384 and fill.details["needs"] == ["clip_l", "t5xxl", "vae"]
    chroma_dir = detect_path(fixture_cache.get(cf.write_chroma_folder, v=V))
    assert (chroma_dir.arch, chroma_dir.family, chroma_dir.details["pipeline"]) == (Arch.FLUX, "Chroma",
                                                                                    "ChromaPipeline")
    fill_dir = detect_path(fixture_cache.get(cf.write_fill_folder, v=V))
    assert (fill_dir.arch, fill_dir.variant, fill_dir.family) == (Arch.FLUX, Variant.INPAINT, "Flux.1 Fill")


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def test_fill_mask_conditioning_is_the_pixel_unshuffled_packed_mask():
    """What the 320 extra input channels hold: diffusers' prepare_mask_latents == 8x8 pixel-unshuffle of the
    mask, packed 2x2 (256 values per token), after the packed masked-image latents (64 values)."""
    pipe = cf.fill_pipe()
    torch.manual_seed(3)
    mask = (torch.rand(2, 1, 64, 96) > 0.5).float()
    raw = torch.randn(2, 16, 8, 12)  # masked-image latents as the VAE returns them (unscaled)
    got_mask, got_latents = pipe.prepare_mask_latents(mask, raw, 2, 16, 1, 64, 96, torch.float32, "cpu", None)
    assert got_mask.shape == (2, 4 * 6, 256) and got_latents.shape == (2, 4 * 6, 64)
    assert torch.equal(got_mask, _pack(F.pixel_unshuffle(mask, 8)))
    scaled = (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert torch.allclose(got_latents, _pack(scaled), atol=1e-6)
    assert got_mask.shape[-1] + got_latents.shape[-1] + 64 == pipe.transformer.config.in_channels


def test_fill_start_latents_and_first_sigma_match_the_pipeline():
    from webui.generation.dit_fill import first_sigma, start_latents
    from webui.image_requests import FILL_LATENT_NOISE, FILL_LATENT_NOTHING, FILL_ORIGINAL

    pipe = cf.fill_pipe()
    seen: list[float] = []

    def record(p, step, t, tensors):
        if step == 0:
            seen.append(float(t) / 1000)
        return tensors

    image, mask = Image.new("RGB", (64, 64), (90, 30, 200)), Image.new("L", (64, 64), 255)
    pipe(prompt="a cat", image=image, mask_image=mask, height=64, width=64, strength=0.5, num_inference_steps=4,
         output_type="latent", callback_on_step_end=record, generator=torch.Generator().manual_seed(0))
    sigma = first_sigma(dict(pipe.scheduler.config), 4, 0.5, image_seq_len=16)
    assert sigma == pytest.approx(seen[0], abs=1e-6) and 0 < sigma < 1
    latents, noise = torch.full((1, 16, 8, 8), 2.0), torch.ones(1, 16, 8, 8)
    half = torch.zeros(1, 1, 8, 8)
    half[..., :4] = 1
    assert torch.allclose(start_latents(latents, noise, half, FILL_ORIGINAL, 0.25), torch.full_like(latents, 1.75))
    nothing = start_latents(latents, noise, half, FILL_LATENT_NOTHING, 0.0)
    assert torch.equal(nothing[..., :4], torch.zeros(1, 16, 8, 4)) and torch.equal(nothing[..., 4:], latents[..., 4:])
    noised = start_latents(latents, noise, half, FILL_LATENT_NOISE, 0.0)
    assert torch.equal(noised[..., :4], noise[..., :4])


def test_family_tables_for_prompts_tasks_and_ui():
    from types import SimpleNamespace

    from webui.generation.dit import guidance_mode
    from webui.generation.pipeline_tasks import task_pipeline
    from webui.prompt.dit_encode import prompt_notes
    from webui.ui.family_controls import profile_for

    assert not prompt_notes(Arch.FLUX, "a cat", "blurry", pipeline="ChromaPipeline")
    assert any("negative prompt is ignored" in n for n in prompt_notes(Arch.FLUX, "a cat", "blurry",
                                                                       pipeline="FluxPipeline"))
    pipe = cf.chroma_pipe()
    model = SimpleNamespace(pipe=pipe, arch=Arch.FLUX, task_pipes={},
                            components=SimpleNamespace(pipeline_class="ChromaPipeline", variant=Variant.NORMAL))
    assert guidance_mode(model) == "cfg"
    view = task_pipeline(model, "img2img")
    assert type(view).__name__ == "ChromaImg2ImgPipeline" and view.transformer is pipe.transformer
    assert task_pipeline(model, "img2img") is view and task_pipeline(model, "txt2img") is pipe
    with pytest.raises(RequestError, match="inpaint is not available for Chroma"):
        task_pipeline(model, "inpaint")
    chroma = profile_for(Arch.FLUX, Variant.NORMAL, "chroma-unlocked-v50", family="Chroma")
    assert chroma.negative_visible and chroma.cfg == 4.0 and "CFG" in chroma.cfg_label
    fill = profile_for(Arch.FLUX, Variant.INPAINT, "flux1-fill-dev", family="Flux.1 Fill")
    assert not fill.negative_visible and fill.cfg == 30.0
    assert not profile_for(Arch.FLUX, Variant.NORMAL, "flux1-dev").negative_visible
