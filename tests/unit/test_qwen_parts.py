"""Qwen-Image split layout: key conversions (exact round trips, agreement with diffusers' own Wan VAE converter),
configs from shapes (tiny fixtures and the published real widths), variant naming, detection of each part."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures import qwen_split_factory as qf
from webui.models.detect import detect, detect_path, parse_header
from webui.models.dit import qwen_parts as q, qwen_vae
from webui.models.dit.convert import ConversionError
from webui.types import Arch, ModelKind, Variant


@pytest.fixture(scope="module")
def pipe():
    return qf.qwen_pipe(edit=True)


def _header(shapes: dict[str, list[int]], metadata: dict[str, str] | None = None):
    import math

    entries, offset = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape) * 2
        entries[key] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        entries["__metadata__"] = metadata
    return parse_header(entries)


def test_vae_table_agrees_with_diffusers_wan_converter_on_the_real_block_layout():
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, num_res_blocks=2)  # real layout, tiny widths
    state = vae.state_dict()
    wan = qwen_vae.vae_from_diffusers(state)
    assert "decoder.upsamples.14.residual.6.weight" in wan and "decoder.upsamples.3.resample.1.weight" in wan
    assert "encoder.downsamples.0.residual.0.gamma" in wan and wan["conv1.weight"].ndim == 5
    reference = convert_wan_vae_to_diffusers(dict(wan))  # diffusers' converter: hard-codes 2 res blocks
    ours = qwen_vae.vae_to_diffusers(wan)
    assert set(ours) == set(reference) == set(state)
    assert all(torch.equal(ours[k], state[k]) and torch.equal(reference[k], state[k]) for k in state)
    config = qwen_vae.vae_config({k: v.shape for k, v in ours.items()})
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
        expected = vae.config[key]
        assert config[key] == (list(expected) if isinstance(expected, (list, tuple)) else expected), key


def test_vae_round_trip_with_one_res_block_and_unknown_keys_are_refused(pipe):
    state = pipe.vae.state_dict()
    wan = qwen_vae.vae_from_diffusers(state)
    back = qwen_vae.vae_to_diffusers(wan)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    config = qwen_vae.vae_config({k: v.shape for k, v in back.items()})
    assert (config["base_dim"], config["num_res_blocks"], config["dim_mult"]) == (8, 1, [1, 2, 4, 4])
    wan["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="decoder.extra.weight"):
        qwen_vae.vae_to_diffusers(wan)


def test_text_encoder_round_trip_and_config_from_shapes(pipe):
    model = pipe.text_encoder
    state = model.state_dict()
    comfy = q.text_encoder_to_comfy(state)
    assert {"model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight",
            "visual.patch_embed.proj.weight", "visual.merger.mlp.2.weight", "lm_head.weight"} <= set(comfy)
    assert not any(k.startswith("model.language_model") for k in comfy)
    back = q.text_encoder_to_transformers(comfy)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    ids = dict(zip(q.VISION_TOKENS, pipe.tokenizer.convert_tokens_to_ids(list(q.VISION_TOKENS))))
    config = q.text_encoder_config({k: v.shape for k, v in back.items()}, ids)
    text, vision = model.config.text_config, model.config.vision_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps"):
        assert config["text_config"][key] == getattr(text, key), key
    assert config["text_config"]["rope_scaling"]["mrope_section"] == list(text.rope_parameters["mrope_section"])
    for key in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "patch_size",
                "spatial_merge_size", "temporal_patch_size", "window_size", "fullatt_block_indexes"):
        assert config["vision_config"][key] == getattr(vision, key), key
    assert config["image_token_id"] == model.config.image_token_id and not config["tie_word_embeddings"]
    comfy["model.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="model.mystery.weight"):
        q.text_encoder_to_transformers(comfy)


def test_transformer_config_from_shapes(pipe):
    model = pipe.transformer
    config = q.transformer_config({k: v.shape for k, v in model.state_dict().items()})
    for key in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "guidance_embeds", "zero_cond_t"):
        assert config[key] == model.config[key], key
    assert tuple(config["axes_dims_rope"]) == tuple(model.config.axes_dims_rope)


def test_published_widths_give_the_published_configs():
    layer = "model.layers."
    te = {"model.embed_tokens.weight": [152064, 3584], layer + "0.self_attn.q_proj.weight": [3584, 3584],
          layer + "0.self_attn.k_proj.weight": [512, 3584], layer + "0.mlp.gate_proj.weight": [18944, 3584],
          layer + "27.input_layernorm.weight": [3584], "visual.patch_embed.proj.weight": [1280, 3, 2, 14, 14],
          "visual.blocks.0.mlp.gate_proj.weight": [3420, 1280], "visual.blocks.31.norm1.weight": [1280],
          "visual.merger.mlp.0.weight": [5120, 5120], "visual.merger.mlp.2.weight": [3584, 5120]}
    shapes = {q.text_encoder_to_transformers({k: k}).popitem()[0]: v for k, v in te.items()}
    config = q.text_encoder_config(shapes, dict.fromkeys(q.VISION_TOKENS, 0))
    text, vision = config["text_config"], config["vision_config"]
    assert (text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"]) == (28, 28, 4)
    assert text["rope_scaling"]["mrope_section"] == [16, 24, 24] and config["tie_word_embeddings"]
    assert (vision["depth"], vision["num_heads"], vision["spatial_merge_size"]) == (32, 16, 2)
    assert vision["fullatt_block_indexes"] == [7, 15, 23, 31]
    dit = {"img_in.weight": [3072, 64], "txt_in.weight": [3072, 3584], "proj_out.weight": [64, 3072],
           "transformer_blocks.0.attn.norm_q.weight": [128], "transformer_blocks.59.img_mod.1.weight": [18432, 3072]}
    config = q.transformer_config(dit)
    assert (config["num_layers"], config["num_attention_heads"], config["out_channels"]) == (60, 24, 16)
    assert tuple(config["axes_dims_rope"]) == (16, 56, 56) and config["joint_attention_dim"] == 3584


@pytest.mark.parametrize("name, metadata, marker, family, pipeline", [
    ("qwen_image_bf16", {}, False, "Qwen-Image", "QwenImagePipeline"),
    ("qwen_image_edit_fp8_e4m3fn", {}, False, "Qwen-Image-Edit", "QwenImageEditPipeline"),
    ("qwen_image_edit_2509_bf16", {}, False, "Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline"),
    ("Qwen-Image-Edit-2511-bf16", {}, False, "Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline"),
    ("model", {"modelspec.title": "Qwen-Image-Edit-2509"}, False, "Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline"),
    ("qwen_image_bf16", {}, True, "Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline"),
])
def test_variant_from_marker_metadata_or_file_name(name, metadata, marker, family, pipeline):
    keys = ["transformer_blocks.0.img_mod.1.weight"] + (["__index_timestep_zero__"] if marker else [])
    found, _source = q.variant_of(keys, metadata, name + ".safetensors")
    assert (found.family, found.pipeline) == (family, pipeline)
    assert found.zero_cond_t is (family.endswith("2511"))


def test_detects_the_three_split_parts(fixture_cache):
    v = qf.QWEN_SPLIT_VERSION
    base = detect_path(fixture_cache.get(qf.write_transformer, variant="base", v=v))
    assert (base.kind, base.arch, base.variant, base.family) == (ModelKind.CHECKPOINT, Arch.QWEN_IMAGE,
                                                                 Variant.NORMAL, "Qwen-Image")
    assert base.details["needs"] == ["qwen2.5-vl", "vae"] and not base.unsupported
    edit = detect_path(fixture_cache.get(qf.write_transformer, variant="2511", prefix="model.diffusion_model.", v=v))
    assert (edit.variant, edit.family, edit.details["zero_cond_t"]) == (Variant.EDIT, "Qwen-Image-Edit-2511", True)
    assert edit.details["prefix"] == "model.diffusion_model."
    te = detect_path(fixture_cache.get(qf.write_text_encoder, v=v))
    assert te.kind is ModelKind.TEXT_ENCODER and not te.unsupported
    assert (te.details["encoder"], te.details["format"], te.details["width"]) == ("qwen2.5-vl", "comfy", 32)
    vae = detect_path(fixture_cache.get(qf.write_vae, v=v))
    assert (vae.kind, vae.arch, vae.details["vae_family"], vae.details["z_dim"]) == (ModelKind.VAE, Arch.QWEN_IMAGE,
                                                                                     "Qwen-Image", 16)
    assert not vae.unsupported and "latent_channels" not in vae.details  # never offered to Flux / SD3


def test_wan22_vae_is_detected_but_refused():
    det = detect(_header({"encoder.conv1.weight": [160, 12, 3, 3, 3], "conv2.weight": [48, 48, 1, 1, 1],
                          "decoder.middle.0.residual.0.gamma": [1024, 1, 1, 1],
                          "decoder.upsamples.0.upsamples.0.residual.0.gamma": [1024, 1, 1, 1]}))
    assert det.kind is ModelKind.VAE and "Qwen-Image VAE" in det.unsupported


def test_a_qwen_text_encoder_of_another_width_is_refused_naming_both_widths(tmp_path):
    from types import SimpleNamespace

    from webui.models.dit.components import DitLoadError

    def record(name: str, width: int):
        return SimpleNamespace(path=tmp_path / name, filename=name, name=name.removesuffix(".safetensors"),
                               usable=True, detection=SimpleNamespace(details={"encoder": "qwen2.5-vl",
                                                                               "width": width}))

    three_b = record("qwen_2.5_vl_3b.safetensors", 2048)
    with pytest.raises(DitLoadError, match=r"qwen_2\.5_vl_3b.*2048 wide.*3584-wide.*qwen_2\.5_vl_7b\.safetensors"):
        q.find_text_encoder([three_b], family="Qwen-Image", model=tmp_path / "qwen_image.safetensors",
                            roots=(tmp_path,), text_width=3584)
    seven_b = record("qwen_2.5_vl_7b.safetensors", 3584)
    assert q.find_text_encoder([three_b, seven_b], family="Qwen-Image", model=tmp_path / "q.safetensors",
                               roots=(tmp_path,), text_width=3584) is seven_b
