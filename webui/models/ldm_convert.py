"""ldm/A1111 single-file layout -> diffusers: configs derived from tensor shapes, and key conversion.

Widths, layer counts and block layout always come from the tensors; only what shapes cannot reveal
(attention head counts, activation functions, scheduler settings) comes from the bundled config of the
architecture (``base`` below).  A 6.9 GB SDXL file and a tiny test fixture run through the same functions.

UNet and VAE keys are converted by diffusers' own ``convert_ldm_*_checkpoint`` (tested on real files by
diffusers), then checked: every source tensor must be used, so an unknown block is an error rather than
silently dropped weights.  OpenCLIP text encoders use our own mapping, because diffusers' version
hard-codes SD2's 24th layer and the 1024 width.

Everything here raises ``ConversionError`` with a message that names the component; the loader adds
the file name.
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
VAE_SUBKEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class ConversionError(ValueError):
    """The weights do not fit the expected layout; the message says which component and why."""


# ---------------------------------------------------------------------------------------------- helpers
def take_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """Remove and return every entry under ``prefix`` (prefix stripped), so leftovers stay visible."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    return {k[len(prefix):]: state_dict.pop(k) for k in keys}


def count_indices(state_dict: StateDict, prefix: str) -> int:
    """Number of numbered children under ``prefix`` (``prefix{N}.``): max index + 1, 0 if none."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _require(state_dict: StateDict, key: str, component: str) -> torch.Tensor:
    try:
        return state_dict[key]
    except KeyError:
        raise ConversionError(f"{component}: expected tensor {key!r} is missing") from None


def check_all_used(source: StateDict, converted: StateDict, component: str) -> None:
    """Every source tensor must appear in the converted dict, itself or as a view (same data pointer)."""
    used = {tensor.data_ptr() for tensor in converted.values()}
    unused = sorted(k for k, v in source.items() if v.numel() and v.data_ptr() not in used)
    if unused:
        raise ConversionError(
            f"{component}: {len(unused)} tensors do not fit the {component} layout "
            f"(e.g. {', '.join(unused[:5])}); this is not a standard checkpoint of this architecture"
        )


# ---------------------------------------------------------------------------------------------- UNet
def unet_config_from_ldm(unet: StateDict, base: dict[str, Any]) -> dict[str, Any]:
    """Diffusers UNet config for ldm UNet weights (``model.diffusion_model.`` already stripped)."""
    name = "UNet"
    conv_in = _require(unet, "input_blocks.0.0.weight", name)
    n_in = count_indices(unet, "input_blocks.")
    downs = [i for i in range(1, n_in) if f"input_blocks.{i}.0.op.weight" in unet]
    per_level = downs[0] if downs else n_in  # resnets + 1 (downsampler, or the next level's first block)
    layers_per_block = per_level - 1
    levels = n_in // per_level
    if layers_per_block < 1 or levels * per_level != n_in:
        raise ConversionError(f"{name}: {n_in} input blocks do not form equal levels (downsamplers at {downs})")

    def block_depth(prefix: str) -> int | None:
        if f"{prefix}.1.proj_in.weight" not in unet:
            return None
        return count_indices(unet, f"{prefix}.1.transformer_blocks.")

    widths, down_depths = [], []
    for level in range(levels):
        first = 1 + level * per_level
        widths.append(_require(unet, f"input_blocks.{first}.0.out_layers.3.weight", name).shape[0])
        depths = {block_depth(f"input_blocks.{first + j}") for j in range(layers_per_block)}
        if len(depths) != 1:
            raise ConversionError(f"{name}: level {level} mixes transformer depths {sorted(map(str, depths))}")
        down_depths.append(depths.pop())
    up_depths = []
    for up in range(levels):
        depths = [block_depth(f"output_blocks.{up * per_level + j}") for j in range(per_level)]
        up_depths.append(depths)

    mid_depth = block_depth("middle_block")
    if mid_depth is None:
        raise ConversionError(f"{name}: the middle block has no transformer; not a Stable Diffusion UNet")
    # Levels without attention get depth 1, except the last: diffusers gives the middle block its depth.
    depths = [1 if d is None else d for d in down_depths[:-1]] + [down_depths[-1] or mid_depth]
    if depths[-1] != mid_depth:
        raise ConversionError(f"{name}: middle block depth {mid_depth} differs from the last level's {depths[-1]}")

    attn_key = next((k for k in unet if k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise ConversionError(f"{name}: no cross-attention layers found")
    proj_in = unet["middle_block.1.proj_in.weight"]

    config = copy.deepcopy(base)
    heads = config.get("attention_head_dim")
    if isinstance(heads, list) and len(heads) != levels:
        raise ConversionError(
            f"{name}: has {levels} resolution levels, but this architecture has {len(heads)}: "
            "the file is a different architecture"
        )
    head_list = heads if isinstance(heads, list) else [heads] * levels
    for level, (width, depth) in enumerate(zip(widths, down_depths)):
        if (depth is not None or level == levels - 1) and width % head_list[level]:  # last level: middle block
            raise ConversionError(f"{name}: width {width} of level {level} is not divisible by {head_list[level]} heads")

    config.update(
        in_channels=conv_in.shape[1],
        out_channels=_require(unet, "out.2.weight", name).shape[0],
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        down_block_types=["DownBlock2D" if d is None else "CrossAttnDownBlock2D" for d in down_depths],
        up_block_types=["UpBlock2D" if d[0] is None else "CrossAttnUpBlock2D" for d in up_depths],
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        cross_attention_dim=unet[attn_key].shape[1],
        use_linear_projection=proj_in.ndim == 2,
        mid_block_type="UNetMidBlock2DCrossAttn",
    )
    expected_up = [[d] * per_level for d in reversed(depths)]
    actual_up = [[e if a is None else a for a, e in zip(row, exp)] for row, exp in zip(up_depths, expected_up)]
    if actual_up != expected_up:
        config["reverse_transformer_layers_per_block"] = actual_up
    time_dim = _require(unet, "time_embed.0.weight", name).shape[0]
    if time_dim != widths[0] * 4:
        config["time_embedding_dim"] = time_dim
    if "label_emb.0.0.weight" in unet:
        if config.get("addition_embed_type") != "text_time":
            raise ConversionError(f"{name}: has a label embedding (label_emb) that this architecture does not use")
        config["projection_class_embeddings_input_dim"] = unet["label_emb.0.0.weight"].shape[1]
    elif config.get("addition_embed_type") == "text_time":
        raise ConversionError(f"{name}: SDXL UNet without its size/time embedding (label_emb.*)")
    return config


def convert_unet(unet: StateDict, config: dict[str, Any]) -> StateDict:
    prefixed = {UNET_PREFIX + k: v for k, v in unet.items()}
    converted = convert_ldm_unet_checkpoint(prefixed, config)
    check_all_used(unet, converted, "UNet")
    return converted


# ---------------------------------------------------------------------------------------------- VAE
def vae_config_from_ldm(vae: StateDict, base: dict[str, Any]) -> dict[str, Any]:
    """Diffusers AutoencoderKL config for ldm VAE weights (``encoder.*``, ``decoder.*``, ...)."""
    name = "VAE"
    levels = count_indices(vae, "encoder.down.")
    if not levels:
        raise ConversionError(f"{name}: no encoder blocks (encoder.down.*) found")
    layers = count_indices(vae, "encoder.down.0.block.")
    widths = [_require(vae, f"encoder.down.{i}.block.0.conv2.weight", name).shape[0] for i in range(levels)]
    if count_indices(vae, "decoder.up.0.block.") != layers + 1 or count_indices(vae, "decoder.up.") != levels:
        raise ConversionError(f"{name}: decoder blocks do not mirror the encoder's {levels}x{layers} blocks")
    config = copy.deepcopy(base)
    config.update(
        in_channels=_require(vae, "encoder.conv_in.weight", name).shape[1],
        out_channels=_require(vae, "decoder.conv_out.weight", name).shape[0],
        latent_channels=_require(vae, "decoder.conv_in.weight", name).shape[1],
        block_out_channels=widths,
        layers_per_block=layers,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        use_quant_conv="quant_conv.weight" in vae,
        use_post_quant_conv="post_quant_conv.weight" in vae,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in vae,
    )
    return config


def convert_vae(vae: StateDict, config: dict[str, Any]) -> StateDict:
    converted = convert_ldm_vae_checkpoint(vae, config)
    check_all_used(vae, converted, "VAE")
    return converted


def vae_config_from_diffusers(vae: StateDict, base: dict[str, Any]) -> dict[str, Any]:
    """Config for a VAE file already in diffusers layout (``encoder.down_blocks.*``)."""
    name = "VAE"
    levels = count_indices(vae, "encoder.down_blocks.")
    widths = [_require(vae, f"encoder.down_blocks.{i}.resnets.0.conv2.weight", name).shape[0] for i in range(levels)]
    config = copy.deepcopy(base)
    config.update(
        in_channels=_require(vae, "encoder.conv_in.weight", name).shape[1],
        out_channels=_require(vae, "decoder.conv_out.weight", name).shape[0],
        latent_channels=_require(vae, "decoder.conv_in.weight", name).shape[1],
        block_out_channels=widths,
        layers_per_block=count_indices(vae, "encoder.down_blocks.0.resnets."),
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        use_quant_conv="quant_conv.weight" in vae,
        use_post_quant_conv="post_quant_conv.weight" in vae,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in vae,
    )
    return config


# ---------------------------------------------------------------------------------------------- CLIP
def clip_config_from_ldm(text: StateDict, base: dict[str, Any]) -> dict[str, Any]:
    """HF CLIP text weights as stored by ldm (``text_model.`` prefix already stripped)."""
    name = "text encoder (CLIP)"
    tokens = _require(text, "embeddings.token_embedding.weight", name)
    config = copy.deepcopy(base)
    config.update(
        vocab_size=tokens.shape[0],
        hidden_size=tokens.shape[1],
        max_position_embeddings=_require(text, "embeddings.position_embedding.weight", name).shape[0],
        num_hidden_layers=count_indices(text, "encoder.layers."),
        intermediate_size=_require(text, "encoder.layers.0.mlp.fc1.weight", name).shape[0],
    )
    _check_heads(config, name)
    return config


def convert_clip(text: StateDict) -> StateDict:
    """ldm CLIP keys -> transformers 5 ``CLIPTextModel`` keys (no ``text_model.`` prefix)."""
    converted = {k.removeprefix("text_model."): v for k, v in text.items()}
    converted.pop("embeddings.position_ids", None)  # a buffer in old transformers, not a weight
    return converted


def open_clip_config_from_ldm(
    text: StateDict, base: dict[str, Any], *, drop_last_layers: int = 0, with_projection: bool = False
) -> dict[str, Any]:
    """OpenCLIP text tower (``token_embedding``, ``transformer.resblocks.N``...) -> HF CLIP text config."""
    name = "text encoder (OpenCLIP)"
    tokens = _require(text, "token_embedding.weight", name)
    config = copy.deepcopy(base)
    config.update(
        vocab_size=tokens.shape[0],
        hidden_size=tokens.shape[1],
        max_position_embeddings=_require(text, "positional_embedding", name).shape[0],
        num_hidden_layers=count_indices(text, "transformer.resblocks.") - drop_last_layers,
        intermediate_size=_require(text, "transformer.resblocks.0.mlp.c_fc.weight", name).shape[0],
    )
    if with_projection:
        config["projection_dim"] = _require(text, "text_projection", name).shape[1]
    _check_heads(config, name)
    return config


_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                    "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
# Present in real OpenCLIP checkpoints but not part of the HF text model.
_OPEN_CLIP_UNUSED = ("logit_scale", "attn_mask")


def convert_open_clip(text: StateDict, config: dict[str, Any], *, with_projection: bool) -> StateDict:
    """OpenCLIP text tower -> HF ``CLIPTextModel`` (flat keys) or ``CLIPTextModelWithProjection``.

    Layers past ``num_hidden_layers`` are dropped (SD2 runs its penultimate layer, so diffusers' text
    encoder has 23 of the 24); ``text_projection`` is kept (transposed) only ``with_projection``.
    """
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    out: StateDict = {
        "embeddings.token_embedding.weight": text.pop("token_embedding.weight"),
        "embeddings.position_embedding.weight": text.pop("positional_embedding"),
        "final_layer_norm.weight": _require(text, "ln_final.weight", "text encoder (OpenCLIP)"),
        "final_layer_norm.bias": text.pop("ln_final.bias"),
    }
    text.pop("ln_final.weight")
    projection = text.pop("text_projection", None)
    if with_projection:
        if projection is None:
            raise ConversionError("text encoder (OpenCLIP): text_projection is missing")
    for name in _OPEN_CLIP_UNUSED:
        text.pop(name, None)
    pattern = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
    for key in sorted(text):
        match = pattern.match(key)
        if not match:
            continue
        index, rest = int(match.group(1)), match.group(2)
        tensor = text.pop(key)
        if index >= layers:
            continue  # the unused last layer(s)
        target = f"encoder.layers.{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{target}self_attn.{name}.{kind}"] = tensor[part * hidden:(part + 1) * hidden].clone()
            continue
        module, _, param = rest.rpartition(".")
        if module not in _OPEN_CLIP_LAYER:
            raise ConversionError(f"text encoder (OpenCLIP): unknown tensor transformer.resblocks.{index}.{rest}")
        out[f"{target}{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
    if text:
        raise ConversionError(f"text encoder (OpenCLIP): unknown tensors {sorted(text)[:5]}")
    if with_projection:
        out = {"text_model." + k: v for k, v in out.items()}
        out["text_projection.weight"] = projection.T.contiguous()
    return out


def _check_heads(config: dict[str, Any], name: str) -> None:
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ConversionError(
            f"{name}: width {config['hidden_size']} is not divisible by {config['num_attention_heads']} heads"
        )
