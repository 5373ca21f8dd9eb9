"""The Qwen-Image VAE file (``qwen_image_vae.safetensors``, Wan-2.1 layout with 5-D causal convolutions) as
diffusers ``AutoencoderKLQwenImage``: key conversion by a table built from the file's own block list (either
layout; ``vae_from_diffusers`` is the exact inverse, used by the fixtures), config from shapes, strict loading.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from webui.models.dit.components import DitLoadError
from webui.models.dit.configs import _shape
from webui.models.dit.convert import ConversionError

StateDict = dict[str, torch.Tensor]
Shapes = Mapping[str, Sequence[int]]

RESNET_PARTS = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
                ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))
_BLOCK = re.compile(r"^(encoder\.downsamples|decoder\.upsamples|encoder\.down_blocks)\.(\d+)\.(\w+)")
BLOCK_KINDS = {**dict.fromkeys(("residual", "shortcut", "norm1", "conv1", "norm2", "conv2", "conv_shortcut"), "res"),
               "resample": "resample", "time_conv": "resample"}  # anything else in a block list: attention
_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.")


def _plan(keys: Iterable[str]) -> tuple[list[str], list[tuple[int, bool]]]:
    """(encoder block kinds in order, decoder levels as (resnets, has upsampler)) from either layout's keys."""
    enc: dict[int, str] = {}
    flat: dict[int, str] = {}
    levels: dict[int, list[int]] = {}
    for key in keys:
        if m := _BLOCK.match(key):
            (flat if m.group(1) == "decoder.upsamples" else enc)[int(m.group(2))] = BLOCK_KINDS.get(m.group(3), "attn")
        elif m := _UP.match(key):
            level = levels.setdefault(int(m.group(1)), [0, 0])
            if m.group(2) == "resnets":
                level[0] = max(level[0], int(m.group(3)) + 1)
            else:
                level[1] = 1
    if flat:  # Wan layout: runs of residual blocks, each closed by a resample
        dec, count = [], 0
        for i in sorted(flat):
            if flat[i] == "attn":
                raise ConversionError(f"Qwen-Image VAE: attention block decoder.upsamples.{i} is not supported")
            if flat[i] == "resample":
                dec.append((count, True))
                count = 0
            else:
                count += 1
        dec.append((count, False))
    else:
        dec = [(levels[i][0], bool(levels[i][1])) for i in sorted(levels)]
    return [enc[i] for i in sorted(enc)], dec


def _module_pairs(enc: Sequence[str], dec: Sequence[tuple[int, bool]]) -> list[tuple[str, str, bool]]:
    """(Wan module, diffusers module, is a residual block) for every module of the VAE."""
    pairs = [("conv1", "quant_conv", False), ("conv2", "post_quant_conv", False)]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv1", f"{side}.conv_in", False), (f"{side}.head.0", f"{side}.norm_out", False),
                  (f"{side}.head.2", f"{side}.conv_out", False),
                  (f"{side}.middle.0", f"{side}.mid_block.resnets.0", True),
                  (f"{side}.middle.1", f"{side}.mid_block.attentions.0", False),
                  (f"{side}.middle.2", f"{side}.mid_block.resnets.1", True)]
    pairs += [(f"encoder.downsamples.{i}", f"encoder.down_blocks.{i}", kind == "res") for i, kind in enumerate(enc)]
    flat = 0
    for level, (resnets, upsampler) in enumerate(dec):
        for k in range(resnets):
            pairs.append((f"decoder.upsamples.{flat}", f"decoder.up_blocks.{level}.resnets.{k}", True))
            flat += 1
        if upsampler:
            pairs.append((f"decoder.upsamples.{flat}", f"decoder.up_blocks.{level}.upsamplers.0", False))
            flat += 1
    return pairs


def _rename(sd: StateDict, pairs: Sequence[tuple[str, str, bool]], inner: Sequence[tuple[str, str]]) -> StateDict:
    modules = {src: (dst, res) for src, dst, res in pairs}
    out, leftover = {}, []
    for key, tensor in sd.items():
        parts = key.split(".")
        src = next((".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in modules), None)
        if src is None:
            leftover.append(key)
            continue
        dst, res = modules[src]
        rest = key[len(src) + 1:]
        if res:
            rest = next((b + rest[len(a):] for a, b in inner if rest.startswith(a)), rest)
        out[f"{dst}.{rest}"] = tensor
    if leftover:
        raise ConversionError(f"Qwen-Image VAE: {len(leftover)} unknown keys (e.g. {', '.join(leftover[:3])})")
    return out


def vae_to_diffusers(sd: StateDict) -> StateDict:
    """Wan-2.1 layout -> ``AutoencoderKLQwenImage`` keys."""
    return _rename(sd, _module_pairs(*_plan(sd)), RESNET_PARTS)


def vae_from_diffusers(sd: StateDict) -> StateDict:
    """The exact inverse (Wan-2.1 names), for writing fixture files."""
    pairs = [(dst, src, res) for src, dst, res in _module_pairs(*_plan(sd))]
    return _rename(sd, pairs, [(b, a) for a, b in RESNET_PARTS])


def vae_config(shapes: Shapes) -> dict[str, Any]:
    """``AutoencoderKLQwenImage`` config from diffusers-layout shapes (latent statistics: Qwen-Image defaults)."""
    what = "Qwen-Image VAE"
    enc, dec = _plan(shapes)
    if "attn" in enc:
        raise ConversionError(f"{what}: attention blocks in the encoder (attn_scales) are not supported")
    base, channels = _shape(shapes, "encoder.conv_in.weight", what)[:2]
    levels, temporal = [[]], []
    for i, kind in enumerate(enc):
        if kind == "res":
            levels[-1].append(_shape(shapes, f"encoder.down_blocks.{i}.conv2.weight", what)[0])
        else:
            temporal.append(f"encoder.down_blocks.{i}.time_conv.weight" in shapes)
            levels.append([])
    counts = {len(level) for level in levels}
    if len(counts) != 1 or not levels[0]:
        raise ConversionError(f"{what}: uneven residual blocks per level ({[len(x) for x in levels]})")
    outs = [level[-1] // base for level in levels]
    return {"base_dim": base, "z_dim": _shape(shapes, "post_quant_conv.weight", what)[0], "dim_mult": outs,
            "num_res_blocks": counts.pop(), "attn_scales": [], "temperal_downsample": temporal,
            "input_channels": channels}



# ---------------------------------------------------------------------------------------------- loader
def load_vae(path: str | Path, *, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKLQwenImage

    from webui.models.dit.loaders import _read, _strict

    path = Path(path)
    try:
        sd = vae_to_diffusers(_read(path, dtype))
        config = vae_config({k: v.shape for k, v in sd.items()})
    except ConversionError as exc:
        raise DitLoadError(path, f"{exc}: not a usable Qwen-Image VAE (qwen_image_vae.safetensors)") from None
    return _strict(lambda: AutoencoderKLQwenImage(**config), sd, "Qwen-Image VAE", path)
