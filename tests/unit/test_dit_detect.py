"""DiT detection from headers (Flux BFL, SD3.5 single file, split text encoders, 16-ch VAE, diffusers folders)
and the exactness of our single-file converters."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures import dit_factory as f
from webui.models.detect import BrokenModelFile, detect, detect_path, parse_header
from webui.models.dit import configs, convert
from webui.models.safetensors_header import read_header
from webui.types import Arch, ModelKind, Variant


def test_flux_round_trip_is_exact_and_config_comes_from_shapes():
    model = f.flux_transformer(0)
    state = model.state_dict()
    bfl = convert.flux_from_diffusers(state)
    assert "single_blocks.0.linear1.weight" in bfl and "double_blocks.0.img_attn.qkv.weight" in bfl
    back = convert.flux_to_diffusers(bfl)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    config = configs.flux_config({k: v.shape for k, v in bfl.items()})
    for key in ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "pooled_projection_dim", "guidance_embeds"):
        assert config[key] == model.config[key], key
    assert tuple(config["axes_dims_rope"]) == tuple(model.config.axes_dims_rope)


def test_sd3_round_trip_is_exact_and_config_comes_from_shapes():
    model = f.sd3_transformer(0)
    state = model.state_dict()
    original = convert.sd3_from_diffusers(state)
    assert "joint_blocks.0.x_block.attn2.qkv.weight" in original and "pos_embed" in original
    back = convert.sd3_to_diffusers(original)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    config = configs.sd3_config({k: v.shape for k, v in original.items()})
    for key in ("num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size", "qk_norm", "patch_size"):
        assert config[key] == model.config[key], key
    assert list(config["dual_attention_layers"]) == list(model.config.dual_attention_layers)


def test_converter_rejects_leftover_tensors():
    bfl = convert.flux_from_diffusers(f.flux_transformer(0).state_dict())
    bfl["double_blocks.0.something_else.weight"] = torch.zeros(2)
    with pytest.raises(convert.ConversionError, match="something_else"):
        convert.flux_to_diffusers(bfl)


def test_detects_flux_bfl_transformer(fixture_cache):
    det = detect_path(fixture_cache.get(f.write_flux_bfl, v=f.DIT_FACTORY_VERSION))
    assert (det.kind, det.arch, det.variant, det.family) == (ModelKind.CHECKPOINT, Arch.FLUX, Variant.NORMAL,
                                                               "Flux.1 dev")
    assert det.details["needs"] == ["clip_l", "t5xxl", "vae"] and not det.unsupported
    schnell = detect_path(fixture_cache.get(f.write_flux_bfl, schnell=True, v=f.DIT_FACTORY_VERSION))
    assert schnell.family == "Flux.1 schnell" and schnell.details["config_key"] == "flux-schnell"


def test_detects_sd3_single_file_with_its_parts(fixture_cache):
    det = detect_path(fixture_cache.get(f.write_sd3_single, v=f.DIT_FACTORY_VERSION))
    assert (det.kind, det.arch, det.family) == (ModelKind.CHECKPOINT, Arch.SD3, "SD3.5")
    assert set(det.details["included"]) == {"clip_l", "clip_g", "vae"}
    assert det.details["needs"] == [] and det.details["optional"] == ["t5xxl"]


def test_detects_split_text_encoders_and_16_channel_vae(fixture_cache):
    folder = fixture_cache.get(f.write_text_encoders, v=f.DIT_FACTORY_VERSION)
    clip_l = detect_path(folder / "clip_l.safetensors")
    clip_g = detect_path(folder / "clip_g.safetensors")
    t5 = detect_path(folder / "t5xxl_fp16.safetensors")
    assert {clip_l.kind, clip_g.kind, t5.kind} == {ModelKind.TEXT_ENCODER}
    assert (clip_l.details["width"], clip_g.details["width"]) == (32, 48)
    assert t5.details["encoder"] == "t5"
    vae = detect_path(fixture_cache.get(f.write_vae16, v=f.DIT_FACTORY_VERSION))
    assert vae.kind is ModelKind.VAE and vae.details["latent_channels"] == 16 and not vae.unsupported


def _header(shapes: dict[str, list[int]]):
    import math

    entries, offset = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape) * 2
        entries[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return parse_header(entries)


def test_real_widths_name_the_text_encoders_and_chroma():
    clip_l = detect(_header({"text_model.embeddings.token_embedding.weight": [49408, 768],
                             "text_model.encoder.layers.0.mlp.fc1.weight": [3072, 768]}))
    t5 = detect(_header({"shared.weight": [32128, 4096], "encoder.block.0.layer.0.SelfAttention.q.weight": [4096, 4096]}))
    assert (clip_l.details["encoder"], t5.details["encoder"]) == ("clip_l", "t5xxl")
    chroma = detect(_header({"double_blocks.0.img_attn.qkv.weight": [9216, 3072], "img_in.weight": [3072, 64],
                             "distilled_guidance_layer.in_proj.weight": [5120, 64]}))
    assert (chroma.family, chroma.arch, chroma.unsupported) == ("Chroma", Arch.FLUX, None)  # loadable now
    assert chroma.details["needs"] == ["t5xxl", "vae"]  # T5 only, no CLIP


def test_flux_lora_is_not_taken_for_a_transformer():
    det = detect(_header({"double_blocks.0.img_attn.qkv.lora_A.weight": [4, 3072],
                          "double_blocks.0.img_attn.qkv.lora_B.weight": [9216, 4]}))
    assert det.kind is ModelKind.LORA


@pytest.mark.parametrize("kind, arch, variant", [("flux", Arch.FLUX, Variant.NORMAL), ("kontext", Arch.FLUX, Variant.EDIT),
                                                 ("sd3", Arch.SD3, Variant.NORMAL), ("qwen", Arch.QWEN_IMAGE, Variant.NORMAL)])
def test_detects_diffusers_folders(fixture_cache, kind, arch, variant):
    writer, kwargs = {"flux": (f.write_flux_folder, {}), "kontext": (f.write_flux_folder, {"kontext": True}),
                      "sd3": (f.write_sd3_folder, {}), "qwen": (f.write_qwen_folder, {})}[kind]
    det = detect_path(fixture_cache.get(writer, v=f.DIT_FACTORY_VERSION, **kwargs))
    assert (det.kind, det.arch, det.variant) == (ModelKind.CHECKPOINT, arch, variant) and not det.unsupported


def test_incomplete_diffusers_folder_and_truncated_file_are_broken(fixture_cache, tmp_path):
    import shutil

    folder = tmp_path / "flux"
    shutil.copytree(fixture_cache.get(f.write_flux_folder, v=f.DIT_FACTORY_VERSION), folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(BrokenModelFile, match="text_encoder_2"):
        detect_path(folder)
    source = fixture_cache.get(f.write_flux_bfl, v=f.DIT_FACTORY_VERSION)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(source.read_bytes()[:1000])
    with pytest.raises(BrokenModelFile):
        read_header(cut)
