"""Facts read from a safetensors header's keys, shapes and metadata; no verdicts (``detect`` decides).

Structure: ``ldm_unet_facts`` / ``diffusers_unet_facts`` measure a UNet (levels, transformer depth,
context width, ...) for ``arch_from_unet`` to match against the declarative ``UNET_SPECS``;
``text_encoder_arch`` matches checkpoint CLIP key prefixes against ``TEXT_ENCODER_LAYOUTS``; ``lora_facts``
groups adapter tensors into layers and reads their format, adapted parts, rank, widths and block-layout
markers.  Metadata: ``metadata_arch``, ``arch_family`` (SDXL derivatives) and ``header_prediction``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from webui.models.safetensors_header import SafetensorsHeader, TensorInfo
from webui.types import Arch, Prediction


# ---------------------------------------------------------------------------- metadata: arch, family, prediction
FAMILY_BY_ARCH = MappingProxyType({
    Arch.SD1: "SD 1.5", Arch.SD2: "SD 2.x", Arch.SDXL: "SDXL", Arch.SDXL_REFINER: "SDXL Refiner",
    Arch.SD3: "SD3", Arch.FLUX: "Flux", Arch.QWEN_IMAGE: "Qwen-Image", Arch.UNKNOWN: "",
})
# SDXL derivatives, told apart only by what the file's metadata says (never by its file name).
SDXL_DERIVATIVES = (
    ("NoobAI", re.compile(r"noob", re.I)),
    ("Illustrious", re.compile(r"illustrious", re.I)),
    ("Pony", re.compile(r"(?<![a-z])pony(?!tail)", re.I)),
)
# Metadata fields that describe the model itself (checkpoints) or the base it was trained on (LoRAs).
FAMILY_FIELDS_SELF = ("modelspec.architecture", "modelspec.title", "ss_base_model_version", "ss_sd_model_name")
FAMILY_FIELDS_BASE = ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name")
METADATA_ARCH = (  # substring of modelspec.architecture / ss_base_model_version -> arch (first wins)
    ("xl-v1-refiner", Arch.SDXL_REFINER), ("sdxl_refiner", Arch.SDXL_REFINER),
    ("stable-diffusion-xl", Arch.SDXL), ("sdxl", Arch.SDXL),
    ("stable-diffusion-v2", Arch.SD2), ("sd_v2", Arch.SD2), ("sd_2", Arch.SD2),
    ("stable-diffusion-v1", Arch.SD1), ("sd_v1", Arch.SD1), ("sd_1", Arch.SD1),
)
PREDICTION_WORDS = MappingProxyType({
    "epsilon": Prediction.EPSILON, "eps": Prediction.EPSILON,
    "v": Prediction.V_PREDICTION, "v_prediction": Prediction.V_PREDICTION,
    "v-prediction": Prediction.V_PREDICTION, "vpred": Prediction.V_PREDICTION,
})


def metadata_arch(metadata: Mapping[str, str]) -> Arch | None:
    """The arch named by ``modelspec.architecture`` / ``ss_base_model_version``, if any."""
    text = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    return next((arch for marker, arch in METADATA_ARCH if marker in text), None)


def arch_family(arch: Arch, metadata: Mapping[str, str], fields: tuple[str, ...]) -> str:
    """Display family of ``arch``; for SDXL, a derivative named in the metadata ``fields`` wins."""
    if arch is Arch.SDXL:
        text = " ".join(metadata.get(k, "") for k in fields)
        for name, pattern in SDXL_DERIVATIVES:
            if pattern.search(text):
                return name
    return FAMILY_BY_ARCH[arch]


def header_prediction(header: SafetensorsHeader) -> Prediction | None:
    """Prediction type the file states (a ``v_pred`` key or its metadata); ``None`` when it does not say."""
    if "v_pred" in header.tensors:
        return Prediction.V_PREDICTION
    word = header.metadata.get("modelspec.prediction_type", "").strip().lower()
    if word in PREDICTION_WORDS:
        return PREDICTION_WORDS[word]
    if "768-v" in header.metadata.get("modelspec.architecture", ""):  # "stable-diffusion-v2-768-v"
        return Prediction.V_PREDICTION
    return None


# ---------------------------------------------------------------------------- checkpoint structure: CLIP + UNet
# Checkpoint text-encoder layouts; the first whose prefixes are all present wins.
TEXT_ENCODER_LAYOUTS = (
    (Arch.SDXL, ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")),
    (Arch.SDXL_REFINER, ("conditioner.embedders.0.model.",)),
    (Arch.SD2, ("cond_stage_model.model.",)),
    (Arch.SD1, ("cond_stage_model.transformer.",)),
)


def text_encoder_arch(h: SafetensorsHeader) -> Arch | None:
    """Arch of the first ``TEXT_ENCODER_LAYOUTS`` entry whose key prefixes are all present."""
    return next((a for a, prefixes in TEXT_ENCODER_LAYOUTS if all(h.has_prefix(p) for p in prefixes)), None)


CONTEXT_WIDTH_ARCH = MappingProxyType({768: Arch.SD1, 1024: Arch.SD2, 2048: Arch.SDXL, 1280: Arch.SDXL_REFINER})
DIT_MARKERS = (("double_blocks.", "Flux"), ("single_blocks.", "Flux"), ("joint_blocks.", "SD3"))


@dataclass(frozen=True)
class UNetFacts:
    in_channels: int | None
    model_channels: int | None
    levels: int  # resolution levels (downsamplers + 1)
    context_width: int | None  # input width of the first attn2.to_k
    adm_in: int | None  # label_emb / add_embedding input width (SDXL "vector" conditioning)
    linear_proj: bool | None  # transformer proj_in is Linear (SD2/SDXL) rather than a 1x1 conv (SD1)
    max_depth: int  # most transformer blocks in one encoder attention

    def describe(self) -> str:
        return (f"in_channels={self.in_channels}, model_channels={self.model_channels}, levels={self.levels}, "
                f"context_width={self.context_width}, adm_in={self.adm_in}, linear_proj={self.linear_proj}, "
                f"max_depth={self.max_depth}")


@dataclass(frozen=True)
class UNetSpec:  # ComfyUI-style declarative family description, matched against UNetFacts
    arch: Arch
    levels: int
    adm: bool
    max_depth: int
    linear_proj: bool | None = None


UNET_SPECS = (
    UNetSpec(Arch.SDXL, levels=3, adm=True, max_depth=10),
    UNetSpec(Arch.SDXL_REFINER, levels=4, adm=True, max_depth=4),
    UNetSpec(Arch.SD2, levels=4, adm=False, max_depth=1, linear_proj=True),
    UNetSpec(Arch.SD1, levels=4, adm=False, max_depth=1, linear_proj=False),
)


def arch_from_unet(f: UNetFacts) -> Arch | None:
    for spec in UNET_SPECS:
        if (spec.levels == f.levels and spec.adm == (f.adm_in is not None) and spec.max_depth == f.max_depth
                and spec.linear_proj in (None, f.linear_proj)):
            return spec.arch
    return None


def _unet_facts(h: SafetensorsHeader, prefix: str, conv_in: str, adm: str, block: str,
                down: re.Pattern, attn: re.Pattern) -> UNetFacts:
    conv = h.tensors.get(prefix + conv_in)
    conv = conv if conv is not None and conv.ndim == 4 else None
    downs, depth, width, linear = set(), 0, None, None
    for key in h.keys_with_prefix(prefix + block):
        rest = key[len(prefix):]
        if m := down.match(rest):
            downs.add(m.group(1))
        elif m := attn.match(rest):
            tail = m.group("tail")
            if m.group("t") is not None:
                depth = max(depth, int(m.group("t")) + 1)
            if width is None and tail.endswith("attn2.to_k.weight"):
                width = h.tensors[key].shape[-1]
            if linear is None and tail == "proj_in.weight":
                linear = h.tensors[key].ndim == 2
    adm_info = h.tensors.get(prefix + adm)
    return UNetFacts(conv.shape[1] if conv else None, conv.shape[0] if conv else None, len(downs) + 1, width,
                     adm_info.shape[-1] if adm_info is not None else None, linear, depth)


_LDM_DOWN = re.compile(r"input_blocks\.(\d+)\.0\.op\.weight$")
_LDM_ATTN = re.compile(r"input_blocks\.\d+\.1\.(?:transformer_blocks\.(?P<t>\d+)\.)?(?P<tail>.*)$")
_DIFFUSERS_DOWN = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.weight$")
_DIFFUSERS_ATTN = re.compile(r"down_blocks\.\d+\.attentions\.\d+\.(?:transformer_blocks\.(?P<t>\d+)\.)?(?P<tail>.*)$")


def ldm_unet_facts(h: SafetensorsHeader, prefix: str) -> UNetFacts:
    return _unet_facts(h, prefix, "input_blocks.0.0.weight", "label_emb.0.0.weight", "input_blocks.",
                       _LDM_DOWN, _LDM_ATTN)


def diffusers_unet_facts(h: SafetensorsHeader, prefix: str) -> UNetFacts:
    return _unet_facts(h, prefix, "conv_in.weight", "add_embedding.linear_1.weight", "down_blocks.",
                       _DIFFUSERS_DOWN, _DIFFUSERS_ATTN)


# ---------------------------------------------------------------------------- LoRA structure
# LoRA layer suffix -> role.  A "layer" (base name) groups the tensors of one adapted module.
ADAPTER_SUFFIXES = MappingProxyType({
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up", "_lora.down.weight": "down", "_lora.up.weight": "up",
    ".lora_mid.weight": "mid", ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b", ".hada_t1": "hada_t1", ".hada_t2": "hada_t2", ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b", ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2", ".dora_scale": "dora_scale",
    ".lora_magnitude_vector": "dora_scale", ".diff": "diff", ".diff_b": "diff_b",  # peft DoRA; LyCORIS full
})
_ADAPTER_RE = re.compile("(" + "|".join(map(re.escape, sorted(ADAPTER_SUFFIXES, key=len, reverse=True))) + ")$")
LORA_PARTS = (  # layer-name prefix -> which model part it adapts
    ("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"),
    ("lora_transformer_", "dit"), ("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"),
    ("transformer.", "dit"), ("diffusion_model.", "unet"),
)
_DIT_NAME = re.compile(r"(?:double_blocks|single_blocks|joint_blocks)[._]")
_UNET_NAME = re.compile(r"(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]")
# Structural markers over UNet layer names ('.' -> '_'): which family's block layout a layer exists in.
LORA_UNET_MARKERS = (
    (re.compile(r"(?:^|_)transformer_blocks_[1-9]"), "xl"),  # SDXL has 2/10 blocks per attention, SD1/2 one
    (re.compile(r"(?:^|_)up_blocks_0_attentions|(?:^|_)output_blocks_[0-2]_1_"), "xl"),
    (re.compile(r"(?:^|_)down_blocks_0_attentions|(?:^|_)input_blocks_[12]_1_|(?:^|_)up_blocks_3_attentions"
                r"|(?:^|_)output_blocks_(?:9|10|11)_1_"), "sd"),  # SD1/2 attend at the full-resolution level
)


@dataclass(frozen=True)
class LoraFacts:
    format: str
    parts: tuple[str, ...]
    layers: int
    rank: int | None
    context_width: int | None
    te_width: int | None
    te_layers: int | None
    markers: tuple[str, ...]
    proj_conv: bool | None
    unpaired: tuple[str, ...]

    def structural_arch(self) -> Arch | None:
        if "te1" in self.parts or "te2" in self.parts:
            return Arch.SDXL
        if "xl" in self.markers and "sd" not in self.markers:
            return Arch.SDXL_REFINER if self.context_width == 1280 else Arch.SDXL
        if "xl" not in self.markers:
            if self.te_layers:
                return Arch.SD2 if self.te_layers > 12 else Arch.SD1 if self.te_layers == 12 else None
            if self.proj_conv is not None and "sd" in self.markers:
                return Arch.SD1 if self.proj_conv else Arch.SD2
        return None

    def candidates(self) -> tuple[str, ...]:
        if "te1" in self.parts or "te2" in self.parts or ("xl" in self.markers and "sd" not in self.markers):
            return (Arch.SDXL.value, Arch.SDXL_REFINER.value) if "te1" not in self.parts else (Arch.SDXL.value,)
        if "sd" in self.markers or self.te_layers:
            return (Arch.SD1.value, Arch.SD2.value)
        return ()

    def width_arch(self) -> Arch | None:
        return CONTEXT_WIDTH_ARCH.get(self.context_width or 0) or {768: Arch.SD1, 1024: Arch.SD2}.get(
            self.te_width or 0)


def _part(base: str) -> str:
    if _DIT_NAME.search(base):
        return "dit"
    for prefix, part in LORA_PARTS:
        if base.startswith(prefix):
            return part
    return "unet" if _UNET_NAME.search(base) else "te" if "text_model" in base else "other"


def _in_width(g: Mapping[str, TensorInfo]) -> int | None:
    if "down" in g and g["down"].ndim >= 2:
        return g["down"].shape[1]
    if "hada_w1_b" in g:
        return g["hada_w1_b"].shape[-1]
    w1 = g.get("lokr_w1") or g.get("lokr_w1_b")
    w2 = g.get("lokr_w2") or g.get("lokr_w2_b")
    return w1.shape[1] * w2.shape[1] if w1 is not None and w2 is not None and w1.ndim >= 2 and w2.ndim >= 2 else None


def _problems(base: str, g: Mapping[str, TensorInfo]) -> str | None:
    needs = (("down", "up"), ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    for group in needs:
        present = [r for r in group if r in g]
        if present and len(present) != len(group):
            return f"{base} ({', '.join(r for r in group if r not in g)} missing)"
    if "down" in g and "up" in g and g["down"].shape[0] != g["up"].shape[1]:
        return f"{base} (rank {g['down'].shape[0]} in down but {g['up'].shape[1]} in up)"
    if any(r.startswith("lokr_w1") for r in g) != any(r.startswith("lokr_w2") for r in g):
        return f"{base} (lokr_w1/lokr_w2 pair incomplete)"
    return None


def lora_facts(h: SafetensorsHeader) -> LoraFacts | None:
    groups: dict[str, dict[str, TensorInfo]] = {}
    for key, info in h.tensors.items():
        if m := _ADAPTER_RE.search(key):
            groups.setdefault(key[: m.start()], {})[ADAPTER_SUFFIXES[m.group(1)]] = info
    if not groups:
        return None
    parts, markers, ranks, unpaired = set(), set(), Counter(), []
    ctx = te_width = te_layers = proj_conv = None
    for base, g in groups.items():
        part = _part(base)
        parts.add(part)
        if problem := _problems(base, g):
            unpaired.append(problem)
        if "down" in g:
            ranks[g["down"].shape[0]] += 1
        flat = base.replace(".", "_")
        if part == "unet":
            markers.update(tag for pattern, tag in LORA_UNET_MARKERS if pattern.search(flat))
            if ctx is None and re.search(r"attn2_(?:processor_)?to_k$", flat):
                ctx = _in_width(g)
            full = g.get("down") or g.get("diff")  # tensors that keep the layer's own rank (conv: 4-D)
            if proj_conv is None and flat.endswith("proj_in") and full is not None:
                proj_conv = full.ndim == 4
        elif part in ("te", "te1"):
            if te_width is None and flat.endswith("q_proj"):
                te_width = _in_width(g)
            if part == "te" and (m := re.search(r"layers_(\d+)", flat)):
                te_layers = max(te_layers or 0, int(m.group(1)) + 1)
    roles = {r for g in groups.values() for r in g}
    conv3 = any(g.get("down") is not None and g["down"].ndim == 4 and g["down"].shape[2] > 1 for g in groups.values())
    fmt = ("dora" if "dora_scale" in roles else "lokr" if any(r.startswith("lokr") for r in roles)
           else "full" if roles <= {"diff", "diff_b"}
           else "loha" if "hada_w1_a" in roles else "locon" if conv3
           else "peft" if any(k.endswith(".lora_A.weight") for k in h.tensors)
           else "diffusers" if any(k.endswith("lora.down.weight") for k in h.tensors) else "lora")
    return LoraFacts(fmt, tuple(sorted(parts)), len(groups), ranks.most_common(1)[0][0] if ranks else None, ctx,
                     te_width, te_layers, tuple(sorted(markers)), proj_conv, tuple(sorted(unpaired)))
