"""Loading DiT models through ModelManager.ensure with a real ComponentCache: split layout (models/unet +
models/text_encoders + models/VAE), SD3.5 single file with its CLIPs, diffusers folders (Flux, Kontext,
Qwen-Image); the pipelines run one step at 64x64; missing parts give messages naming the folder and file."""
from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from tests.fixtures.dit_factory import DitModels
from webui.models.cache import ComponentCache
from webui.models.catalog import Catalog
from webui.models.dit.components import DitComponents
from webui.models.manager import ModelManager, ModelUnavailable
from webui.prompt.dit_encode import DitPromptEncoder
from webui.types import Arch, Variant


@pytest.fixture
def dit(fixture_cache, tmp_path):
    return DitModels(tmp_path / "data", fixture_cache)


def _manager(dit: DitModels) -> ModelManager:
    settings = dit.settings()
    catalog = Catalog.from_settings(settings)
    catalog.refresh()
    return ModelManager(catalog=catalog, cache=ComponentCache(2 ** 32), settings=settings)


def _run(model) -> tuple:
    kwargs = dict(prompt="a red cat", height=64, width=64, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    name = type(model.pipe).__name__
    if name == "FluxKontextPipeline":
        kwargs.update(image=Image.new("RGB", (64, 64), "red"), _auto_resize=False, max_area=64 * 64)
    if model.arch in (Arch.SD3, Arch.QWEN_IMAGE):
        kwargs["negative_prompt"] = "blurry"
    images = model.pipe(**kwargs).images
    assert torch.isfinite(torch.as_tensor(images)).all()
    return images.shape


def test_flux_split_layout_loads_runs_and_switches_back_from_cache(dit):
    dit.flux_unet(), dit.text_encoders(), dit.vae(), dit.sd3_single()
    manager = _manager(dit)
    flux = manager.ensure("flux1-dev-tiny", None)
    assert isinstance(flux.components, DitComponents) and type(flux.pipe).__name__ == "FluxPipeline"
    assert (flux.arch, flux.components.variant, flux.components.zero_terminal_snr) == (Arch.FLUX, Variant.NORMAL, False)
    assert flux.components.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert flux.components.scheduler_config["use_dynamic_shifting"] is True
    assert {"clip_l", "t5xxl", "vae", "t5_tokenizer"} <= set(flux.components.parts)
    assert isinstance(flux.encoder, DitPromptEncoder) and not flux.cache_hit
    assert _run(flux) == (1, 64, 64, 3)
    sd3 = manager.ensure("sd3.5_medium_incl_clips_tiny", None)
    assert type(sd3.pipe).__name__ == "StableDiffusion3Pipeline" and sd3.pipe.text_encoder_3 is not None
    assert _run(sd3) == (1, 64, 64, 3)
    again = manager.ensure("flux1-dev-tiny", None)
    assert again.cache_hit and again.components.transformer is flux.components.transformer
    assert again.components.text_encoder_2 is flux.components.text_encoder_2  # one T5 in RAM


@pytest.mark.parametrize("kind, pipeline, variant", [("flux", "FluxPipeline", Variant.NORMAL),
                                                     ("kontext", "FluxKontextPipeline", Variant.EDIT),
                                                     ("qwen", "QwenImagePipeline", Variant.NORMAL)])
def test_diffusers_folders_load_and_run(dit, kind, pipeline, variant):
    folder = dit.folder(kind)
    model = _manager(dit).ensure(folder.name, None)
    assert type(model.pipe).__name__ == pipeline and model.components.variant is variant
    assert isinstance(model.encoder, DitPromptEncoder)
    assert _run(model) == (1, 64, 64, 3)


def test_user_vae_choice_and_diffusers_tokenizer_are_used(dit):
    dit.flux_unet(), dit.text_encoders(tokenizer=False), dit.vae("diffusers"), dit.folder("sd3")
    model = _manager(dit).ensure("flux1-dev-tiny", "flux_vae_diffusers")
    assert model.components.parts["t5_tokenizer"].endswith("tokenizer_3")  # found in the SD3 diffusers folder
    assert model.components.parts["vae"].endswith("flux_vae_diffusers.safetensors")
    assert model.pipe.vae.config.shift_factor == pytest.approx(0.1159)  # Flux statistics, not SD3's
    assert _run(model) == (1, 64, 64, 3)


def test_missing_parts_are_named_with_their_folder(dit):
    dit.flux_unet()
    with pytest.raises(ModelUnavailable, match=r"CLIP-L.*clip_l\.safetensors.*text_encoders"):
        _manager(dit).ensure("flux1-dev-tiny", None)
    dit.text_encoders(tokenizer=False)
    with pytest.raises(ModelUnavailable, match=r"T5 tokenizer.*tokenizer_2/.*FLUX\.1-dev.*t5_tokenizer"):
        _manager(dit).ensure("flux1-dev-tiny", None)
    dit.text_encoders()
    with pytest.raises(ModelUnavailable, match=r"no VAE.*ae\.safetensors.*VAE"):
        _manager(dit).ensure("flux1-dev-tiny", None)


def test_partial_transformer_file_is_refused_with_a_message(dit):
    source = dit.flux_unet()
    dit.text_encoders(), dit.vae()
    from safetensors.torch import load_file, save_file

    state = load_file(str(source))
    del state["double_blocks.0.img_attn.qkv.weight"]
    save_file(state, str(source.parent / "partial.safetensors"))
    with pytest.raises(ModelUnavailable, match=r"partial\.safetensors.*(missing|qkv)"):
        _manager(dit).ensure("partial", None)
    (source.parent / "cut.safetensors").write_bytes(source.read_bytes()[:5000])
    with pytest.raises(ModelUnavailable, match="cut"):
        _manager(dit).ensure("cut", None)
