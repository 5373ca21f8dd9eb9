"""LoRAs for the DiT families (Flux.1, SD3/3.5, Qwen-Image): which family a file is for, and the original
(BFL / SAI) layer names -> the diffusers transformer's modules.  Pure: names, shapes and tensor slicing.

Formats (layer names; the adapter suffixes are ``formats``' business):

* diffusers / peft / ai-toolkit: ``transformer.<diffusers module>`` (``transformer.transformer_blocks.0.attn.to_q``,
  ``transformer.single_transformer_blocks.3.proj_mlp``); ComfyUI writes the same names under
  ``diffusion_model.`` (Qwen-Image), kohya flattens them (``lora_unet_transformer_blocks_0_attn_to_q``,
  ``lora_transformer_...``).  These need no conversion: ``KeyMap`` indexes the transformer's own module names.
* Flux BFL names: kohya ``lora_unet_double_blocks_0_img_attn_qkv``, ComfyUI/BFL
  ``diffusion_model.double_blocks.0.img_attn.qkv``.  BFL fuses q/k/v (``qkv``) and, in single blocks,
  q/k/v + the MLP input (``linear1``) into one Linear; diffusers has separate modules.  A fused delta
  ``B @ A`` splits by output rows, ``(B @ A)[rows] == B[rows] @ A``, so each diffusers module gets a patch
  with the rows of ``B`` it owns (the same ``A``, rank and alpha).  ``final_layer.adaLN_modulation.1`` is
  ``[shift; scale]`` in BFL and ``[scale; shift]`` in diffusers (``norm_out.linear``): its rows are swapped.
* SD3 SAI names (kohya sd3): ``lora_unet_joint_blocks_0_x_block_attn_qkv``, ``..._context_block_mlp_fc1``.

Text encoders: ``lora_te1_`` is CLIP-L for both; kohya writes T5 as ``lora_te3_`` (``KeyMap`` finds the T5
encoder wherever the pipeline keeps it: ``text_encoder_2`` in Flux, ``text_encoder_3`` in SD3).
"""
from __future__ import annotations

import re
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, Sequence

import torch

from webui.models.lora.formats import _SUFFIX_RE, FullPatch, LayerPatch, LoraFormatError, LoraPatch
from webui.types import Arch

__all__ = [
    "DIT_ARCHES", "DIT_PREFIXES", "ORIGINAL_LAYERS", "convert_dit_patches", "dit_lora_arch", "split_rows",
]

DIT_ARCHES = frozenset({Arch.FLUX, Arch.SD3, Arch.QWEN_IMAGE})
# Prefixes in front of a denoiser layer name (longest first); what follows is a (flat or dotted) module name.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "lora_unet_",
                "lora_transformer_")
TEXT_PREFIXES = ("lora_te", "text_encoder")

Rows = Callable[[int, int], tuple[tuple[int, int], ...]]  # (out, in) of the fused layer -> row ranges per target


def _qkv(out: int, inp: int, n: int = 3) -> tuple[tuple[int, int], ...]:
    if out != n * inp:
        raise LoraFormatError(f"fused qkv layer has {out} output rows; expected 3 x {inp}")
    return tuple((i * inp, (i + 1) * inp) for i in range(n))


def _qkv_mlp(out: int, inp: int) -> tuple[tuple[int, int], ...]:
    if out <= 3 * inp:
        raise LoraFormatError(f"fused linear1 layer has {out} output rows; expected 3 x {inp} + the MLP width")
    return _qkv(3 * inp, inp) + ((3 * inp, out),)


def _swap(out: int, inp: int) -> tuple[tuple[int, int], ...]:
    if out % 2:
        raise LoraFormatError(f"shift/scale layer has an odd number of rows ({out})")
    return ((out // 2, out), (0, out // 2))  # BFL/SAI [shift; scale] -> diffusers [scale; shift]


def _swap_if_two(out: int, inp: int) -> tuple[tuple[int, int], ...] | None:
    return _swap(out, inp) if out == 2 * inp else None  # SD3's last context block is a final-layer-style norm


# (regex over the flat name, (diffusers module template, ...), row split or None)
_FLUX_DOUBLE = {
    "img_attn_qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), _qkv),
    "img_attn_proj": (("attn.to_out.0",), None),
    "img_mlp_0": (("ff.net.0.proj",), None), "img_mlp_2": (("ff.net.2",), None),
    "img_mod_lin": (("norm1.linear",), None),
    "txt_attn_qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), _qkv),
    "txt_attn_proj": (("attn.to_add_out",), None),
    "txt_mlp_0": (("ff_context.net.0.proj",), None), "txt_mlp_2": (("ff_context.net.2",), None),
    "txt_mod_lin": (("norm1_context.linear",), None),
}
_FLUX_SINGLE = {
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), _qkv_mlp),
    "linear2": (("proj_out",), None),
    "modulation_lin": (("norm.linear",), None),
}
_FLUX_TOP = {
    "img_in": (("x_embedder",), None), "txt_in": (("context_embedder",), None),
    "time_in_in_layer": (("time_text_embed.timestep_embedder.linear_1",), None),
    "time_in_out_layer": (("time_text_embed.timestep_embedder.linear_2",), None),
    "vector_in_in_layer": (("time_text_embed.text_embedder.linear_1",), None),
    "vector_in_out_layer": (("time_text_embed.text_embedder.linear_2",), None),
    "guidance_in_in_layer": (("time_text_embed.guidance_embedder.linear_1",), None),
    "guidance_in_out_layer": (("time_text_embed.guidance_embedder.linear_2",), None),
    "final_layer_linear": (("proj_out",), None),
    "final_layer_adaLN_modulation_1": (("norm_out.linear",), _swap),
}
_SD3_JOINT = {
    "x_block_attn_qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), _qkv),
    "x_block_attn_proj": (("attn.to_out.0",), None),
    "x_block_attn2_qkv": (("attn2.to_q", "attn2.to_k", "attn2.to_v"), _qkv),
    "x_block_attn2_proj": (("attn2.to_out.0",), None),
    "x_block_mlp_fc1": (("ff.net.0.proj",), None), "x_block_mlp_fc2": (("ff.net.2",), None),
    "x_block_adaLN_modulation_1": (("norm1.linear",), None),
    "context_block_attn_qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), _qkv),
    "context_block_attn_proj": (("attn.to_add_out",), None),
    "context_block_mlp_fc1": (("ff_context.net.0.proj",), None),
    "context_block_mlp_fc2": (("ff_context.net.2",), None),
    "context_block_adaLN_modulation_1": (("norm1_context.linear",), _swap_if_two),
}
_SD3_TOP = {
    "x_embedder_proj": (("pos_embed.proj",), None), "context_embedder": (("context_embedder",), None),
    "t_embedder_mlp_0": (("time_text_embed.timestep_embedder.linear_1",), None),
    "t_embedder_mlp_2": (("time_text_embed.timestep_embedder.linear_2",), None),
    "y_embedder_mlp_0": (("time_text_embed.text_embedder.linear_1",), None),
    "y_embedder_mlp_2": (("time_text_embed.text_embedder.linear_2",), None),
    "final_layer_linear": (("proj_out",), None),
    "final_layer_adaLN_modulation_1": (("norm_out.linear",), _swap),
}


def _table() -> tuple[tuple[re.Pattern, Arch, str, Mapping], ...]:
    out = []
    for arch, block, diffusers, layers in ((Arch.FLUX, "double_blocks", "transformer_blocks", _FLUX_DOUBLE),
                                           (Arch.FLUX, "single_blocks", "single_transformer_blocks", _FLUX_SINGLE),
                                           (Arch.SD3, "joint_blocks", "transformer_blocks", _SD3_JOINT)):
        alt = "|".join(sorted(layers, key=len, reverse=True))
        out.append((re.compile(rf"{block}_(\d+)_({alt})"), arch, diffusers + ".{0}.", layers))
    return tuple(out)


ORIGINAL_LAYERS = _table()  # (pattern over the flat name, family, diffusers container, {layer: (modules, rows)})
_TOP = MappingProxyType({Arch.FLUX: _FLUX_TOP, Arch.SD3: _SD3_TOP})

# Structural facts over flat layer names -> family (first match wins); widths decide the rest.
_ARCH_MARKERS = (  # anchored at the start: a UNet has "..._transformer_blocks_0_attn2_..." too
    (re.compile(r"^(?:double_blocks_\d+_(?:img|txt)_|single_blocks_\d+_(?:linear[12]|modulation))"), Arch.FLUX),
    (re.compile(r"^single_transformer_blocks_\d+_"), Arch.FLUX),
    (re.compile(r"^joint_blocks_\d+_(?:x|context)_block_"), Arch.SD3),
    (re.compile(r"^transformer_blocks_\d+_(?:img|txt)_(?:mlp|mod)_"), Arch.QWEN_IMAGE),
    (re.compile(r"^transformer_blocks_\d+_attn2_|^pos_embed_proj$"), Arch.SD3),
    (re.compile(r"^(?:time_text_embed_guidance_embedder_|x_embedder$)"), Arch.FLUX),
)
_JOINT = re.compile(r"^transformer_blocks_\d+_(?:attn_(?:to_q|add_[qkv]_proj|to_add_out)|ff_context_|norm1_context)")
_TO_Q = re.compile(r"^transformer_blocks_(\d+)_attn_to_q$")
# Real hidden widths: SD3 medium / 3.5 medium 1536, SD3.5 large 2432.  Flux and Qwen-Image are both 3072 with
# the same joint-attention names; Qwen-Image has 60 blocks, Flux 19 double blocks.
HIDDEN_ARCH = MappingProxyType({1536: Arch.SD3, 2432: Arch.SD3})
FLUX_DOUBLE_BLOCKS = 19
_METADATA_ARCH = (("flux", Arch.FLUX), ("qwen", Arch.QWEN_IMAGE), ("stable-diffusion-v3", Arch.SD3),
                  ("sd3", Arch.SD3))


def strip_prefix(name: str) -> str:
    for prefix in DIT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _flat(name: str) -> str:
    return strip_prefix(name).replace(".", "_")


def dit_lora_arch(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None) -> Arch | None:
    """The DiT family of a LoRA file from its keys (and shapes): ``FLUX``/``SD3``/``QWEN_IMAGE``,
    ``UNKNOWN`` for a transformer LoRA whose family its layers do not show, None for a non-DiT LoRA."""
    layers: dict[str, Sequence[int]] = {}
    for key, shape in shapes.items():
        m = _SUFFIX_RE.search(key)
        if m is None or key.startswith(TEXT_PREFIXES):
            continue
        base = key[: m.start()]
        if m.group(1) in (".lora_down.weight", ".lora_A.weight", ".lora.down.weight"):
            layers[_flat(base)] = shape
        else:
            layers.setdefault(_flat(base), ())
    for pattern, arch in _ARCH_MARKERS:
        if any(pattern.search(flat) for flat in layers):
            return arch
    dit = any(_JOINT.search(flat) for flat in layers) or any(
        k.startswith(("transformer.", "lora_transformer_")) for k in shapes)
    if not dit:
        return None
    text = " ".join((metadata or {}).get(k, "") for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    named = next((arch for marker, arch in _METADATA_ARCH if marker in text), None)
    if named is not None:
        return named
    for flat, shape in layers.items():
        if (m := _TO_Q.search(flat)) and len(shape) == 2:
            if shape[1] in HIDDEN_ARCH:
                return HIDDEN_ARCH[shape[1]]
            if shape[1] == 3072 and int(m.group(1)) >= FLUX_DOUBLE_BLOCKS:
                return Arch.QWEN_IMAGE
    return Arch.UNKNOWN  # e.g. attention-only 3072-wide blocks 0..18: Flux or Qwen-Image; the key match decides


def split_rows(patch: LayerPatch, name: str, rows: Iterable[tuple[int, int]]) -> LayerPatch:
    """The patch of the output ``rows`` (ranges, concatenated in order) of ``patch``'s delta.

    A plain LoRA keeps its low rank (rows of ``up``; same ``down``, rank and alpha), any other adapter is
    materialised as a ``FullPatch`` of those rows (its scale applied).  DoRA magnitudes and bias diffs are
    per output row and follow the rows; a per-input-column magnitude spans every row and cannot be split."""
    rows = tuple(rows)

    def take(t: torch.Tensor) -> torch.Tensor:
        parts = [t[a:b] for a, b in rows]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    if patch.magnitude is not None and patch.magnitude_axis != "out":
        raise LoraFormatError(f"layer {patch.name!r}: a DoRA magnitude per input column cannot be split over "
                              f"the separate diffusers layers of a fused layer")
    # per-row magnitudes: peft [out] / [1, out, 1, 1], LyCORIS [out, 1]
    magnitude = take(patch.magnitude.reshape(-1)) if patch.magnitude is not None else None
    bias = take(patch.bias_diff.reshape(-1)) if patch.bias_diff is not None else None
    if type(patch) is LoraPatch and patch.mid is None:
        up = patch.up.reshape(patch.up.shape[0], -1)
        return LoraPatch(name=name, alpha=patch.alpha, magnitude=magnitude, magnitude_axis="out", bias_diff=bias,
                         down=patch.down, up=take(up))
    out, row = patch.flat_shape()
    full = patch.raw_delta().reshape(out, row) * patch.scale
    return FullPatch(name=name, magnitude=magnitude, magnitude_axis="out", bias_diff=bias, diff=take(full))


def _targets(flat: str, arch: Arch | None) -> tuple[tuple[str, ...], Rows | None] | None:
    for pattern, _family, container, layers in ORIGINAL_LAYERS:
        m = pattern.fullmatch(flat)
        if m is not None:
            modules, rows = layers[m.group(2)]
            return tuple(container.format(m.group(1)) + mod for mod in modules), rows
    top = _TOP.get(arch) if arch is not None else None  # top-level names differ per family: the file's decides
    return top.get(flat) if top is not None else None


def convert_dit_patches(patches: Mapping[str, LayerPatch], arch: Arch | None,
                        ) -> tuple[dict[str, LayerPatch], tuple[str, ...]]:
    """Rename BFL/SAI-named layers to ``transformer.<diffusers module>`` and split fused ones; every other
    layer keeps its name.  Returns the patches and warnings (layers that could not be split)."""
    out: dict[str, LayerPatch] = {}
    warnings: list[str] = []
    for name, patch in patches.items():
        if name.startswith(TEXT_PREFIXES):
            out[name] = patch
            continue
        hit = _targets(_flat(name), arch)
        if hit is None:
            out[name] = patch
            continue
        modules, rows = hit
        out_rows, in_row = patch.flat_shape()
        try:
            ranges = rows(out_rows, in_row) if rows is not None else None
        except LoraFormatError as exc:
            raise LoraFormatError(f"layer {name!r}: {exc}") from None
        if ranges is None:
            out["transformer." + modules[0]] = patch
            continue
        try:
            pieces = [(modules[0], ranges)] if len(modules) == 1 else [(m, (r,)) for m, r in zip(modules, ranges)]
            for module, rr in pieces:
                out["transformer." + module] = split_rows(patch, "transformer." + module, rr)
        except LoraFormatError as exc:
            warnings.append(f"{exc}; skipped")
    return out, tuple(warnings)
