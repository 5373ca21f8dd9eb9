"""Checkpoint/VAE loading: exact round trips from the tiny fixtures, pipelines that generate, clear errors."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.fixtures import factory
from webui import configs
from webui.models import loaders
from webui.models.loaders import ModelLoadError
from webui.types import Arch, Prediction, Variant

# fixture name, bundled config key, arch, variant, prediction passed by the caller (detection)
CASES = [
    ("sd15", "sd15", Arch.SD1, Variant.NORMAL, None),
    ("sd15_inpaint", "sd15_inpaint", Arch.SD1, Variant.INPAINT, None),
    ("sd2v", "sd2_v", Arch.SD2, Variant.NORMAL, Prediction.V_PREDICTION),
    ("sdxl", "sdxl_base", Arch.SDXL, Variant.NORMAL, None),
    ("sdxl_inpaint", "sdxl_inpaint", Arch.SDXL, Variant.INPAINT, None),
    ("sdxl_vpred", "sdxl_base", Arch.SDXL, Variant.NORMAL, Prediction.V_PREDICTION),
    ("sdxl_refiner", "sdxl_refiner", Arch.SDXL_REFINER, Variant.NORMAL, None),
]


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """Load each fixture once per module: name -> CheckpointComponents."""
    cache: dict[str, loaders.CheckpointComponents] = {}

    def get(name: str) -> loaders.CheckpointComponents:
        if name not in cache:
            _, _, arch, variant, prediction = next(c for c in CASES if c[0] == name)
            cache[name] = loaders.load_checkpoint(tiny_models.path(name), arch=arch, variant=variant,
                                                  prediction=prediction)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def source():
    """The models each fixture was written from (built once per module): key -> components."""
    cache: dict[str, dict[str, torch.nn.Module]] = {}

    def get(key: str) -> dict[str, torch.nn.Module]:
        if key not in cache:
            cache[key] = factory.build_components(key)
        return cache[key]

    return get


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, label: str) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys(), f"{label}: key sets differ: {sorted(set(want) ^ set(got))[:5]}"
    different = [k for k in want if not torch.equal(want[k].float(), got[k].float())]
    assert not different, f"{label}: {len(different)} tensors differ, e.g. {different[:3]}"


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name,key,arch,variant,prediction", CASES, ids=[c[0] for c in CASES])
def test_round_trip_is_exact(loaded, source, name, key, arch, variant, prediction):
    """ldm file written by our writer -> loader (diffusers' converters) -> every parameter equal."""
    components = loaded(name)
    for part, model in source(key).items():
        assert_same_weights(model, getattr(components, part), f"{name}.{part}")
    assert (components.arch, components.variant, components.config_key) == (arch, variant, key)
    bundled = configs.load_config(key, "unet")
    # widths come from the tensors, head counts from the bundled config
    assert list(components.unet.config.block_out_channels) == factory.TINY[key]["unet"]["block_out_channels"]
    assert components.unet.config.attention_head_dim == bundled["attention_head_dim"]
    assert components.unet.dtype == torch.float32 and not components.unet.conv_in.weight.requires_grad


def test_derived_configs_match_the_source_models(loaded, source):
    components = loaded("sdxl")
    unet = source("sdxl_base")["unet"]
    for field in ("block_out_channels", "layers_per_block", "transformer_layers_per_block", "cross_attention_dim",
                  "projection_class_embeddings_input_dim", "addition_time_embed_dim", "in_channels"):
        want, got = unet.config[field], components.unet.config[field]
        if field == "transformer_layers_per_block":  # level 0 has no attention: its depth is irrelevant
            want, got = list(want)[1:], list(got)[1:]
        assert list(np.atleast_1d(want)) == list(np.atleast_1d(got)), field
    te2 = components.text_encoder_2.config
    assert (te2.hidden_size, te2.num_hidden_layers, te2.projection_dim, te2.hidden_act) == (80, 32, 80, "gelu")
    assert components.vae.config.scaling_factor == 0.13025 and components.vae.config.force_upcast


def test_asymmetric_transformer_depths_are_read_from_the_weights():
    """SSD-1B-style UNets (different depths in the up path) need reverse_transformer_layers_per_block."""
    from diffusers import UNet2DConditionModel

    from webui.models import ldm_layout
    from webui.models import ldm_convert

    config = dict(block_out_channels=[32, 64, 64], down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                  up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"], attention_head_dim=[1, 2, 2],
                  cross_attention_dim=32, layers_per_block=2, transformer_layers_per_block=[1, 2, 3],
                  reverse_transformer_layers_per_block=[[3, 1, 3], [2, 2, 1], [1, 1, 1]], sample_size=8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    ldm_sd = ldm_layout.unet_to_ldm(unet.state_dict(), dict(unet.config))
    base = {k: v for k, v in config.items() if k not in ("block_out_channels", "transformer_layers_per_block",
                                                          "reverse_transformer_layers_per_block")}
    derived = ldm_convert.unet_config_from_ldm(ldm_sd, base)
    assert derived["transformer_layers_per_block"] == [1, 2, 3]
    assert derived["reverse_transformer_layers_per_block"] == [[3, 1, 3], [2, 2, 1], [1, 1, 1]]
    loaded = loaders.instantiate(lambda: UNet2DConditionModel.from_config(derived),
                                 ldm_convert.convert_unet(ldm_sd, derived), "UNet")
    assert_same_weights(unet, loaded, "asymmetric unet")


def test_sd2_text_encoder_uses_23_of_24_layers(loaded, tiny_models):
    te = loaded("sd2v").text_encoder
    assert te.config.num_hidden_layers == 23 and te.config.hidden_act == "gelu"
    with safe_open(str(tiny_models.sd2v), "pt") as handle:
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in handle.keys()


def test_open_clip_conversion_agrees_with_diffusers(tiny_models, source):
    """Our OpenCLIP mapping equals diffusers' own converter on a real-layout (24-layer) SD2 file."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from webui.models import ldm_convert

    state = loaders.read_state_dict(tiny_models.sd2v, dtype=torch.float32)
    model = source("sd2_v")["text_encoder"]
    theirs = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(model, state).items()}
    text = ldm_convert.take_prefix(dict(state), "cond_stage_model.model.")
    config = ldm_convert.open_clip_config_from_ldm(text, configs.load_config("sd2_v", "text_encoder"), drop_last_layers=1)
    ours = ldm_convert.convert_open_clip(text, config, with_projection=False)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_markers_and_prediction(loaded):
    vpred = loaded("sdxl_vpred")
    assert vpred.prediction is Prediction.V_PREDICTION and vpred.zero_terminal_snr
    assert vpred.scheduler_config["prediction_type"] == "v_prediction"
    assert vpred.scheduler_config["rescale_betas_zero_snr"] is True
    plain = loaded("sdxl")
    assert plain.prediction is Prediction.EPSILON and not plain.zero_terminal_snr
    assert loaded("sd2v").scheduler_config["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loading(tiny_models, source, dtype):
    components = loaders.load_checkpoint(tiny_models.sd15, arch=Arch.SD1, dtype=dtype)
    for part in ("unet", "vae", "text_encoder"):
        model = getattr(components, part)
        assert model.dtype == dtype
        ref = source("sd15")[part].state_dict()
        assert all(torch.equal(t, ref[k].to(dtype)) for k, t in model.state_dict().items() if t.is_floating_point())


def test_loading_makes_no_network_connection(tiny_models, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    components = loaders.load_checkpoint(tiny_models.sd15, arch=Arch.SD1)
    loaders.build_pipeline(components)


# ---------------------------------------------------------------------------------------------- generation
def generate(pipe, seed: int = 1, **extra) -> np.ndarray:
    kwargs = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=2, height=64, width=64,
                  generator=torch.Generator().manual_seed(seed), output_type="np")
    kwargs.update(extra)
    return pipe(**kwargs).images[0]


@pytest.mark.parametrize("name,pipeline", [
    ("sd15", "StableDiffusionPipeline"),
    ("sd2v", "StableDiffusionPipeline"),
    ("sdxl", "StableDiffusionXLPipeline"),
    ("sdxl_vpred", "StableDiffusionXLPipeline"),
])
def test_txt2img_pipelines_generate(loaded, name, pipeline):
    pipe = loaders.build_pipeline(loaded(name))
    assert type(pipe).__name__ == pipeline and getattr(pipe, "safety_checker", None) is None
    first, again = generate(pipe), generate(pipe)
    assert first.shape == (64, 64, 3) and np.isfinite(first).all()
    assert np.array_equal(first, again)
    if name == "sd15":  # the seed matters (checked once: it is the same code path for every arch)
        assert not np.array_equal(first, generate(pipe, seed=2))


def _image_and_mask():
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return image, Image.fromarray(mask)


@pytest.mark.parametrize("name,pipeline", [("sd15_inpaint", "StableDiffusionInpaintPipeline"),
                                           ("sdxl_inpaint", "StableDiffusionXLInpaintPipeline")])
def test_inpaint_pipelines_generate(loaded, name, pipeline):
    pipe = loaders.build_pipeline(loaded(name))
    assert type(pipe).__name__ == pipeline
    image, mask = _image_and_mask()
    first = generate(pipe, image=image, mask_image=mask, strength=1.0)
    assert np.isfinite(first).all()
    assert np.array_equal(first, generate(pipe, image=image, mask_image=mask, strength=1.0))


def test_refiner_img2img(loaded):
    pipe = loaders.build_pipeline(loaded("sdxl_refiner"))
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline" and pipe.text_encoder is None
    image, _ = _image_and_mask()
    out = generate(pipe, image=image, strength=0.6, num_inference_steps=3)
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()


def test_each_pipeline_gets_a_fresh_scheduler(loaded):
    components = loaded("sd15")
    first, second = loaders.build_pipeline(components), loaders.build_pipeline(components)
    assert first.scheduler is not second.scheduler and first.unet is second.unet


# ---------------------------------------------------------------------------------------------- folders and VAEs
def test_diffusers_folder_loads(tiny_models):
    components = loaders.load_checkpoint(tiny_models.diffusers_sd15, arch=Arch.SD1)
    written = factory.build_components("sd15", dtype=torch.float32)  # the folder keeps full fp32 weights
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(written[part], getattr(components, part), part)
    assert components.tokenizer.pad_token == "<|endoftext|>"
    image = generate(loaders.build_pipeline(components))
    assert np.isfinite(image).all()
    # the folder's own configs say what it is when no architecture is given
    assert loaders.load_checkpoint(tiny_models.diffusers_sd15, arch=None).arch is Arch.SD1


def test_diffusers_folder_in_transformers_5_format(tmp_path):
    folder = factory.write_diffusers_folder(tmp_path, legacy_format=False)  # flat CLIP keys, tokenizer.json
    components = loaders.load_checkpoint(folder, arch=Arch.SD1)
    assert_same_weights(factory.build_components("sd15", dtype=torch.float32)["text_encoder"],
                        components.text_encoder, "text_encoder")
    assert components.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_diffusers_folder_with_missing_weights_is_refused(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_models.diffusers_sd15, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["decoder.conv_out.weight"]
    weights.unlink()  # a hard link into the fixture cache: replace, never edit in place
    save_file(state, str(weights))
    with pytest.raises(ModelLoadError, match=r"missing \(e\.g\. decoder\.conv_out\.weight"):
        loaders.load_checkpoint(folder, arch=Arch.SD1)


def test_vae_file_loads_and_swaps_into_a_pipeline(loaded, tiny_models):
    vae = loaders.load_vae(tiny_models.vae, arch=Arch.SD1)
    assert_same_weights(factory.build_vae(), vae, "vae")
    assert vae.config.scaling_factor == 0.18215
    components = loaded("sd15")
    pipe = loaders.build_pipeline(components, vae=vae)
    assert pipe.vae is vae and components.vae is not vae
    swapped, own = generate(pipe), generate(loaders.build_pipeline(components))
    assert np.isfinite(swapped).all() and not np.array_equal(swapped, own)


def test_vae_scaling_follows_arch_and_diffusers_layout_loads(tmp_path):
    sdxl = loaders.load_vae(factory.write_vae(tmp_path, arch="sdxl"), arch=Arch.SDXL)
    assert sdxl.config.scaling_factor == 0.13025
    path = factory.write_vae(tmp_path, layout="diffusers")
    assert_same_weights(factory.build_vae(), loaders.load_vae(path), "diffusers-layout vae")
    assert loaders.load_vae(path, scaling_factor=0.5).config.scaling_factor == 0.5


def test_checkpoint_without_vae(tmp_path, tiny_models):
    state = loaders.read_state_dict(tiny_models.sd15)
    path = factory.save_safetensors({k: v for k, v in state.items() if not k.startswith("first_stage_model.")},
                                    tmp_path / "no_vae.safetensors")
    components = loaders.load_checkpoint(path, arch=Arch.SD1)
    assert components.vae is None
    with pytest.raises(ModelLoadError, match="no built-in VAE.*select a VAE"):
        loaders.build_pipeline(components)
    pipe = loaders.build_pipeline(components, vae=loaders.load_vae(tiny_models.vae))
    assert np.isfinite(generate(pipe)).all()


# ---------------------------------------------------------------------------------------------- errors
def test_truncated_file(tmp_path):
    path = factory.write_corrupt_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as info:
        loaders.load_checkpoint(path, arch=Arch.SD1)
    assert str(path) in str(info.value) and info.value.path == path


def test_vae_file_given_as_checkpoint(tiny_models):
    with pytest.raises(ModelLoadError, match=r"not a checkpoint; it looks like a VAE file: put it in models/VAE"):
        loaders.load_checkpoint(tiny_models.vae, arch=Arch.SD1)


def test_lora_file_given_as_checkpoint(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(path))
    with pytest.raises(ModelLoadError, match="looks like a LoRA file: put it in models/Lora"):
        loaders.load_checkpoint(path, arch=Arch.SD1)


def test_checkpoint_given_as_vae(tiny_models):
    with pytest.raises(ModelLoadError, match="full checkpoint, not a VAE"):
        loaders.load_vae(tiny_models.sd15)


def test_pickle_needs_explicit_permission(tmp_path, source):
    path = factory.write_pickle_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match=r"tiny_sd15\.ckpt: is a pickle-based .*--allow-pickle"):
        loaders.load_checkpoint(path, arch=Arch.SD1)
    components = loaders.load_checkpoint(path, arch=Arch.SD1, allow_pickle=True)
    assert_same_weights(source("sd15")["unet"], components.unet, "unet from .ckpt")


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": socket.gethostname}, path)  # a global weights_only refuses
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        loaders.load_checkpoint(path, arch=Arch.SD1, allow_pickle=True)


def test_missing_tensor_is_named(tmp_path, tiny_models):
    state = loaders.read_state_dict(tiny_models.sd15)
    del state["model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight"]
    path = factory.save_safetensors(state, tmp_path / "damaged.safetensors")
    with pytest.raises(ModelLoadError, match=r"damaged\.safetensors: UNet: .*missing.*up_blocks\.1\.attentions\.2"):
        loaders.load_checkpoint(path, arch=Arch.SD1)


@pytest.mark.parametrize("extra,message", [
    ("input_blocks.1.2.weight", "1 tensors do not fit the UNet layout"),  # diffusers' converter would drop it
    ("input_blocks.1.1.extra_adapter.weight", r"1 unexpected \(e\.g\. down_blocks\.0\.attentions\.0\.extra"),
])
def test_unknown_unet_tensor_is_not_dropped_silently(tmp_path, tiny_models, extra, message):
    state = loaders.read_state_dict(tiny_models.sd15)
    state["model.diffusion_model." + extra] = torch.zeros(4)
    path = factory.save_safetensors(state, tmp_path / "extra.safetensors")
    with pytest.raises(ModelLoadError, match=message):
        loaders.load_checkpoint(path, arch=Arch.SD1)


def test_wrong_architecture_is_reported(tiny_models, tmp_path):
    with pytest.raises(ModelLoadError, match=r"not a sdxl checkpoint \(its text encoders are laid out like sd1\)"):
        loaders.load_checkpoint(tiny_models.sd15, arch=Arch.SDXL)
    with pytest.raises(ModelLoadError, match=r"no text_encoder weights under cond_stage_model\.model\.\*"):
        loaders.load_checkpoint(tiny_models.sd15, arch=Arch.SD2)
    # text encoders present but the UNet is another architecture's
    state = {k: v for k, v in loaders.read_state_dict(tiny_models.sd2v).items() if not k.startswith("model.")}
    state.update({k: v for k, v in loaders.read_state_dict(tiny_models.sdxl).items() if k.startswith("model.")})
    path = factory.save_safetensors(state, tmp_path / "mixed.safetensors")
    with pytest.raises(ModelLoadError, match=r"3 resolution levels, but this architecture has 4.*sd2/normal"):
        loaders.load_checkpoint(path, arch=Arch.SD2)


def test_unet_only_file(tmp_path, tiny_models):
    state = {k: v for k, v in loaders.read_state_dict(tiny_models.sd15).items() if k.startswith("model.")}
    path = factory.save_safetensors(state, tmp_path / "unet_only.safetensors")
    with pytest.raises(ModelLoadError, match="it has no text encoder"):
        loaders.load_checkpoint(path, arch=Arch.SD1)


def test_variant_must_fit_the_unet(tiny_models):
    with pytest.raises(ModelLoadError, match="9 input channels, but a normal model has 4"):
        loaders.load_checkpoint(tiny_models.sd15_inpaint, arch=Arch.SD1, variant=Variant.NORMAL)
    assert loaders.load_checkpoint(tiny_models.sd15_inpaint, arch=Arch.SD1, variant=None).variant is Variant.INPAINT


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="file not found"):
        loaders.load_checkpoint(tmp_path / "nope.safetensors", arch=Arch.SD1)
