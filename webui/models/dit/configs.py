"""diffusers / transformers configs derived from tensor shapes (header shapes or loaded tensors), per family.

Nothing here reads a file or assumes a real-model width: a tiny test model and the real one go through the
same code.  What shapes cannot say (activation, rope axes, head width of a model without q/k norms) follows
the families' published configs, scaled down for widths no real model has.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from webui.models.dit.convert import ConversionError, count_blocks

Shapes = Mapping[str, Sequence[int]]

_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
SCHEDULERS = MappingProxyType({
    "flux-dev": {**_FLOW, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "flux-schnell": {**_FLOW, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                     "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "chroma": {**_FLOW, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
               "base_image_seq_len": 256, "max_image_seq_len": 4096},  # Chroma1-HD: Flux dev's dynamic shift
    "sd3": {**_FLOW, "shift": 3.0},
})
# 16-channel AutoencoderKL (Flux ae.safetensors, SD3 VAE): identical shapes, different latent statistics.
VAE_LATENT_STATS = MappingProxyType({"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)})
VAE_BASE = MappingProxyType({
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "act_fn": "silu", "norm_num_groups": 32, "sample_size": 1024, "force_upcast": True,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_quant_conv": False, "use_post_quant_conv": False,
})


def _shape(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in shapes[key])
    except KeyError:
        raise ConversionError(f"{what}: tensor {key} is missing (incomplete or not a {what} file)") from None


def vae_base(family: str) -> dict[str, Any]:
    scaling, shift = VAE_LATENT_STATS[family]
    return {**VAE_BASE, "scaling_factor": scaling, "shift_factor": shift}


# ---------------------------------------------------------------------------------------------- Flux
def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux splits each head's rope over (index, y, x): (16, 56, 56) for 128; even parts for other widths."""
    first = max(2, head_dim // 8 // 2 * 2)
    second = (head_dim - first) // 2 // 2 * 2
    return first, second, head_dim - first - second


def _flux_blocks(shapes: Shapes, what: str) -> tuple[dict[str, Any], int]:
    """The config entries Flux.1 and its derivatives (Chroma) share, from BFL-layout shapes; and the width."""
    inner, in_channels = _shape(shapes, "img_in.weight", what)
    head_dim = _shape(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", what)[0]
    if inner % head_dim:
        raise ConversionError(f"{what}: width {inner} is not a multiple of the head width {head_dim}")
    return {
        "patch_size": 1, "in_channels": in_channels, "out_channels": _shape(shapes, "final_layer.linear.weight", what)[0],
        "num_layers": count_blocks(shapes, "double_blocks"), "num_single_layers": count_blocks(shapes, "single_blocks"),
        "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
        "joint_attention_dim": _shape(shapes, "txt_in.weight", what)[1], "axes_dims_rope": list(flux_rope_axes(head_dim)),
    }, inner


def flux_config(shapes: Shapes) -> dict[str, Any]:
    """FluxTransformer2DModel config from BFL-layout shapes (``double_blocks.*``...; prefix removed)."""
    what = "Flux transformer"
    blocks, inner = _flux_blocks(shapes, what)
    mlp = _shape(shapes, "double_blocks.0.img_mlp.0.weight", what)[0]
    if mlp != 4 * inner:
        raise ConversionError(f"{what}: width {inner}, head width {blocks['attention_head_dim']} and MLP width {mlp} "
                              "do not fit Flux.1 (MLP = 4 x width)")
    return {"_class_name": "FluxTransformer2DModel", **blocks,
            "pooled_projection_dim": _shape(shapes, "vector_in.in_layer.weight", what)[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in shapes}


def chroma_config(shapes: Shapes) -> dict[str, Any]:
    """ChromaTransformer2DModel config from BFL-layout shapes (Flux blocks + ``distilled_guidance_layer.*``)."""
    what = "Chroma transformer"
    blocks, inner = _flux_blocks(shapes, what)
    hidden, approximator_in = _shape(shapes, "distilled_guidance_layer.in_proj.weight", what)
    if _shape(shapes, "distilled_guidance_layer.out_proj.weight", what)[0] != inner:
        raise ConversionError(f"{what}: width {inner} and the guidance approximator's output do not fit Chroma")
    return {"_class_name": "ChromaTransformer2DModel", **blocks,
            "approximator_num_channels": approximator_in, "approximator_hidden_dim": hidden,
            "approximator_layers": count_blocks(shapes, "distilled_guidance_layer.layers")}


# ---------------------------------------------------------------------------------------------- SD3
def sd3_config(shapes: Shapes) -> dict[str, Any]:
    """SD3Transformer2DModel config from Stability-layout shapes (``joint_blocks.*``; prefix removed)."""
    what = "SD3 transformer"
    inner, in_channels, patch, _ = _shape(shapes, "x_embedder.proj.weight", what)
    layers = count_blocks(shapes, "joint_blocks")
    if "joint_blocks.0.x_block.attn.ln_q.weight" in shapes:  # SD3.5: q/k norms have the head width
        head_dim = _shape(shapes, "joint_blocks.0.x_block.attn.ln_q.weight", what)[0]
    else:  # SD3 medium: MMDiT depth == number of heads
        head_dim = inner // max(layers, 1)
    if not layers or inner % head_dim:
        raise ConversionError(f"{what}: width {inner} does not divide into heads of {head_dim} ({layers} blocks)")
    pos = _shape(shapes, "pos_embed", what)
    side = int(math.isqrt(pos[1]))
    return {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128 if side >= 128 else side,
        "patch_size": patch, "in_channels": in_channels, "num_layers": layers,
        "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
        "joint_attention_dim": _shape(shapes, "context_embedder.weight", what)[1],
        "caption_projection_dim": _shape(shapes, "context_embedder.weight", what)[0],
        "pooled_projection_dim": _shape(shapes, "y_embedder.mlp.0.weight", what)[1],
        "out_channels": _shape(shapes, "final_layer.linear.weight", what)[0] // (patch * patch),
        "pos_embed_max_size": side,
        "dual_attention_layers": [i for i in range(layers) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes],
        "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else None,
    }


# ---------------------------------------------------------------------------------------------- text encoders
def clip_config(shapes: Shapes) -> dict[str, Any]:
    """CLIPTextConfig for HF CLIP text weights (``text_model.`` removed).  CLIP-G (1280 wide) uses gelu,
    CLIP-L quick_gelu; real CLIPs have 64-wide heads (8-wide below 64, test widths)."""
    what = "CLIP text encoder"
    vocab, hidden = _shape(shapes, "embeddings.token_embedding.weight", what)
    head = 64 if hidden % 64 == 0 else 8
    projection = tuple(shapes.get("text_projection.weight", (hidden, hidden)))
    return {
        "vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": hidden // head,
        "max_position_embeddings": _shape(shapes, "embeddings.position_embedding.weight", what)[0],
        "num_hidden_layers": count_blocks(shapes, "encoder.layers"),
        "intermediate_size": _shape(shapes, "encoder.layers.0.mlp.fc1.weight", what)[0],
        "projection_dim": int(projection[0]), "hidden_act": "gelu" if hidden == 1280 else "quick_gelu",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,  # as the published configs: EOS by argmax
    }


def t5_config(shapes: Shapes) -> dict[str, Any]:
    """T5Config (v1.1 encoder, gated GELU) for HF T5 encoder weights."""
    what = "T5 text encoder"
    vocab, d_model = _shape(shapes, "shared.weight", what)
    buckets, heads = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", what)
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    wi = "wi_0" if gated else "wi"
    return {
        "vocab_size": vocab, "d_model": d_model, "num_heads": heads, "relative_attention_num_buckets": buckets,
        "d_kv": _shape(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", what)[0] // heads,
        "d_ff": _shape(shapes, f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight", what)[0],
        "num_layers": count_blocks(shapes, "encoder.block"),
        "feed_forward_proj": "gated-gelu" if gated else "relu", "is_encoder_decoder": False, "use_cache": False,
    }
