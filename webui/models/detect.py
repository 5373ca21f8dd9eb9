"""What is this file?  Pure detection over safetensors headers (keys, shapes, metadata; never tensors).

``read_header`` reads the 8-byte length and the JSON header and validates them against the file size.
``detect`` runs every detector in ``DETECTORS`` (a registry, not an if-chain), keeps every outcome for
diagnostics and picks the match with the best explicit priority.  A detector returns a ``Match``, returns
``None`` ("not mine"), or raises ``BrokenModel`` ("mine, but broken").

Architecture comes from key *structure* first (tiny test fixtures share it with real files and only have
smaller widths), then real-sized widths confirm it: a disagreement is reported in ``details["warnings"]``.
Structural facts are matched against declarative tables (``TEXT_ENCODER_LAYOUTS``, ``UNET_SPECS``).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from webui.types import Arch, ModelKind, Prediction, Variant

__all__ = [
    "BrokenModel", "BrokenModelFile", "Detection", "Detector", "DETECTORS", "Match", "SafetensorsHeader",
    "TensorInfo", "default_prediction", "detect", "detect_path", "read_header",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Pickles are never unpickled here: their kind comes from the extension (or the folder they sit in).
PICKLE_KINDS = MappingProxyType({
    ".ckpt": ModelKind.CHECKPOINT, ".pt": ModelKind.EMBEDDING, ".bin": ModelKind.EMBEDDING,
    ".pth": ModelKind.UPSCALER,
})
DTYPE_BYTES = MappingProxyType({
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
})
VARIANT_BY_IN_CHANNELS = MappingProxyType({
    4: Variant.NORMAL, 9: Variant.INPAINT, 8: Variant.INSTRUCT_PIX2PIX, 5: Variant.DEPTH,
})
FAMILY_BY_ARCH = MappingProxyType({
    Arch.SD1: "SD 1.5", Arch.SD2: "SD 2.x", Arch.SDXL: "SDXL", Arch.SDXL_REFINER: "SDXL Refiner",
    Arch.UNKNOWN: "",
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
# Checkpoint text-encoder layouts; the first whose prefixes are all present wins.
TEXT_ENCODER_LAYOUTS = (
    (Arch.SDXL, ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")),
    (Arch.SDXL_REFINER, ("conditioner.embedders.0.model.",)),
    (Arch.SD2, ("cond_stage_model.model.",)),
    (Arch.SD1, ("cond_stage_model.transformer.",)),
)


class BrokenModel(Exception):
    """Raised by a detector: the file is of its kind, but unusable (incomplete, inconsistent)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokenModelFile(ValueError):
    """A model file that cannot be used; ``str()`` names the file, the problem and what to do."""

    def __init__(self, path: os.PathLike | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Match:
    kind: ModelKind
    arch: Arch = Arch.UNKNOWN
    variant: Variant = Variant.NORMAL
    prediction: Prediction | None = None
    family: str = ""
    details: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, kw_only=True)
class Detection(Match):
    """What a file is.  ``message`` explains an UNKNOWN result; ``details`` carries format facts,
    ``warnings``, ``unsupported`` (why it cannot be used although recognised) and ``outcomes``
    (what every detector said)."""

    message: str = ""

    @property
    def unsupported(self) -> str | None:
        return self.details.get("unsupported")


@dataclass(frozen=True)
class Detector:
    name: str
    priority: int  # lower wins when several detectors match the same header
    looks_for: str  # shown in the "unknown file" message
    probe: Callable[[SafetensorsHeader], Match | None]


# ---------------------------------------------------------------------------- header model + structural facts
@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True, kw_only=True)
class SafetensorsHeader:
    """Keys, dtypes and shapes of a safetensors file plus its ``__metadata__`` strings."""

    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)
    path: Path | None = None
    _sorted: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_sorted", tuple(sorted(self.tensors)))

    def has_prefix(self, prefix: str) -> bool:
        i = bisect_left(self._sorted, prefix)
        return i < len(self._sorted) and self._sorted[i].startswith(prefix)

    def keys_with_prefix(self, prefix: str) -> list[str]:
        i, out = bisect_left(self._sorted, prefix), []
        while i < len(self._sorted) and self._sorted[i].startswith(prefix):
            out.append(self._sorted[i])
            i += 1
        return out

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                    path: Path | None = None) -> "SafetensorsHeader":
        """Build a header from ``{key: (dtype, shape)}`` or ``{key: shape}`` (F32), e.g. a stripped corpus."""
        tensors = {}
        for key, value in shapes.items():
            if isinstance(value, TensorInfo):
                tensors[key] = value
            elif len(value) == 2 and isinstance(value[0], str):
                tensors[key] = TensorInfo(value[0], tuple(value[1]))
            else:
                tensors[key] = TensorInfo("F32", tuple(value))
        return cls(tensors=tensors, metadata=dict(metadata or {}), path=path)


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


# ---------------------------------------------------------------------------- reading headers
def read_header(path: os.PathLike | str) -> SafetensorsHeader:
    """Read and validate the safetensors header of ``path`` without touching tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BrokenModelFile(path, "file is empty (0 bytes); re-download it")
            if size < 8:
                raise BrokenModelFile(
                    path, f"file is truncated: expected at least 8 bytes, found {size}; re-download it")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise BrokenModelFile(
                    path, f"header length {length} is not sane (limit {MAX_HEADER_BYTES}): "
                    "this is not a safetensors file or it is corrupted; re-download it")
            if 8 + length > size:
                raise BrokenModelFile(
                    path, f"file is truncated: expected at least {8 + length} bytes, found {size}; re-download it")
            raw = f.read(length)
    except OSError as exc:
        raise BrokenModelFile(path, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BrokenModelFile(
            path, f"header is not valid JSON ({exc}): not a safetensors file, or it is corrupted") from None
    return parse_header(obj, path=path, file_size=size, header_length=length)


def parse_header(obj: Any, *, path: Path | None = None, file_size: int | None = None,
                 header_length: int = 0) -> SafetensorsHeader:
    """Validate a decoded header object; with ``file_size``, check the data offsets against it."""
    where = path if path is not None else "<header>"
    if not isinstance(obj, dict):
        raise BrokenModelFile(where, "header is not a JSON object: not a safetensors file")
    raw_meta = obj.get("__metadata__") or {}
    if not isinstance(raw_meta, dict):
        raise BrokenModelFile(where, "header __metadata__ is not an object")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw_meta.items()}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for key, info in obj.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                    and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise BrokenModelFile(where, f"tensor {key!r} has a malformed header entry: {info!r}") from None
        itemsize = DTYPE_BYTES.get(dtype)
        if itemsize is not None and (end - begin) != math.prod(shape) * itemsize:
            raise BrokenModelFile(where, f"tensor {key!r} ({dtype} {list(shape)}) needs "
                                  f"{math.prod(shape) * itemsize} bytes but its offsets span {end - begin}")
        tensors[key] = TensorInfo(dtype, shape)
        data_end = max(data_end, end)
    if file_size is not None and 8 + header_length + data_end > file_size:
        raise BrokenModelFile(where, f"file is truncated: expected {8 + header_length + data_end} bytes, "
                              f"found {file_size}; re-download it")
    return SafetensorsHeader(tensors=tensors, metadata=metadata, path=path)


# ---------------------------------------------------------------------------- shared helpers
def _metadata_arch(metadata: Mapping[str, str]) -> Arch | None:
    text = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    return next((arch for marker, arch in METADATA_ARCH if marker in text), None)


def _family(arch: Arch, metadata: Mapping[str, str], fields: tuple[str, ...]) -> str:
    if arch is Arch.SDXL:
        text = " ".join(metadata.get(k, "") for k in fields)
        for name, pattern in SDXL_DERIVATIVES:
            if pattern.search(text):
                return name
    return FAMILY_BY_ARCH[arch]


def _prediction(header: SafetensorsHeader) -> Prediction | None:
    if "v_pred" in header.tensors:
        return Prediction.V_PREDICTION
    word = header.metadata.get("modelspec.prediction_type", "").strip().lower()
    if word in PREDICTION_WORDS:
        return PREDICTION_WORDS[word]
    if "768-v" in header.metadata.get("modelspec.architecture", ""):  # "stable-diffusion-v2-768-v"
        return Prediction.V_PREDICTION
    return None


def _confirm(arch: Arch, width: int | None, what: str, warnings: list[str]) -> None:
    width_arch = CONTEXT_WIDTH_ARCH.get(width) if width else None
    if width_arch is not None and arch is not Arch.UNKNOWN and width_arch is not arch:
        warnings.append(f"key layout says {arch.value} but {what} width {width} says {width_arch.value}")


def default_prediction(detection: Detection) -> Prediction:
    """Policy when a file does not say: SD 2.x txt2img files are usually the 768-v model, so v-prediction;
    SD 2.x inpaint/depth and everything else epsilon.  A user override always beats this."""
    if detection.prediction is not None:
        return detection.prediction
    if detection.arch is Arch.SD2 and detection.variant is Variant.NORMAL:
        return Prediction.V_PREDICTION
    return Prediction.EPSILON


def _variant(in_channels: int | None, where: str) -> Variant:
    if in_channels is None:
        raise BrokenModel(f"{where} has no input convolution (input_blocks.0.0.weight): incomplete file")
    try:
        return VARIANT_BY_IN_CHANNELS[in_channels]
    except KeyError:
        raise BrokenModel(f"UNet takes {in_channels} input channels; supported are 4 (normal), 9 (inpaint), "
                          "8 (instruct-pix2pix) and 5 (depth)") from None


# ---------------------------------------------------------------------------- detectors
def _probe_checkpoint(h: SafetensorsHeader) -> Match | None:
    unet = "model.diffusion_model."
    if not h.has_prefix(unet):
        return None
    for marker, family in DIT_MARKERS:
        if h.has_prefix(unet + marker):
            return Match(kind=ModelKind.CHECKPOINT, family=family,
                         details={"unsupported": f"{family} checkpoints are not supported (only SD 1.x/2.x/SDXL)"})
    facts = ldm_unet_facts(h, unet)
    variant = _variant(facts.in_channels, "checkpoint")
    te_arch = next((a for a, prefixes in TEXT_ENCODER_LAYOUTS if all(h.has_prefix(p) for p in prefixes)), None)
    unet_arch = arch_from_unet(facts)
    warnings: list[str] = []
    if te_arch and unet_arch and te_arch is not unet_arch:
        warnings.append(f"text encoder keys say {te_arch.value} but the UNet layout says {unet_arch.value}")
    arch = te_arch or unet_arch or CONTEXT_WIDTH_ARCH.get(facts.context_width or 0) or Arch.UNKNOWN
    _confirm(arch, facts.context_width, "cross-attention", warnings)
    details: dict[str, Any] = {
        "format": "ldm", "in_channels": facts.in_channels, "context_width": facts.context_width,
        "has_text_encoder": te_arch is not None, "has_vae": h.has_prefix("first_stage_model."),
        "ztsnr": "ztsnr" in h.tensors, "warnings": warnings,
    }
    if arch is Arch.UNKNOWN:
        details["unsupported"] = f"UNet layout not recognised ({facts.describe()})"
    return Match(kind=ModelKind.CHECKPOINT, arch=arch, variant=variant, prediction=_prediction(h),
                 family=_family(arch, h.metadata, FAMILY_FIELDS_SELF), details=details)


def _probe_dit(h: SafetensorsHeader) -> Match | None:
    for marker, family in DIT_MARKERS:
        if h.has_prefix(marker):
            return Match(kind=ModelKind.CHECKPOINT, family=family,
                         details={"unsupported": f"{family} models are not supported (only SD 1.x/2.x/SDXL)"})
    return None


def _probe_controlnet(h: SafetensorsHeader) -> Match | None:
    if "lora_controlnet" in h.tensors:
        return Match(kind=ModelKind.CONTROLNET, details={"format": "control-lora",
                     "unsupported": "Control-LoRA files are not supported; use a full ControlNet"})
    if h.has_prefix("control_model."):
        facts, fmt = ldm_unet_facts(h, "control_model."), "ldm"
    elif h.has_prefix("input_hint_block.") and h.has_prefix("zero_convs."):
        facts, fmt = ldm_unet_facts(h, ""), "ldm"
    elif h.has_prefix("controlnet_cond_embedding."):
        facts, fmt = diffusers_unet_facts(h, ""), "diffusers"
    else:
        return None
    if facts.in_channels is None:
        raise BrokenModel("ControlNet has no input convolution: incomplete file")
    warnings: list[str] = []
    arch = arch_from_unet(facts) or CONTEXT_WIDTH_ARCH.get(facts.context_width or 0) or Arch.UNKNOWN
    _confirm(arch, facts.context_width, "cross-attention", warnings)
    return Match(kind=ModelKind.CONTROLNET, arch=arch, family=FAMILY_BY_ARCH[arch],
                 details={"format": fmt, "context_width": facts.context_width, "warnings": warnings})


def _probe_vae(h: SafetensorsHeader) -> Match | None:
    for prefix in ("", "first_stage_model."):
        for fmt, enc, dec in (("ldm", "encoder.down.", "decoder.up."),
                              ("diffusers", "encoder.down_blocks.", "decoder.up_blocks.")):
            if h.has_prefix(prefix + enc) or h.has_prefix(prefix + dec):
                return _vae_match(h, prefix, fmt, enc, dec)
    return None


def _vae_match(h: SafetensorsHeader, prefix: str, fmt: str, enc: str, dec: str) -> Match:
    if not h.has_prefix(prefix + dec):
        raise BrokenModel(f"VAE has encoder weights ({prefix}{enc}*) but no decoder ({prefix}{dec}*)")
    conv_in = h.tensors.get(prefix + "decoder.conv_in.weight")
    if conv_in is None or conv_in.ndim != 4:
        raise BrokenModel(f"VAE has no {prefix}decoder.conv_in.weight: incomplete file")
    latent = conv_in.shape[1]
    details: dict[str, Any] = {"format": fmt, "latent_channels": latent, "has_encoder": h.has_prefix(prefix + enc)}
    if latent != 4:
        details["unsupported"] = f"{latent}-channel VAE (SD3/Flux style); SD 1.x/2.x/SDXL use 4 latent channels"
    arch = _metadata_arch(h.metadata) or Arch.UNKNOWN  # SD and SDXL VAEs have identical shapes
    return Match(kind=ModelKind.VAE, arch=arch, family=FAMILY_BY_ARCH[arch], details=details)


def _probe_lora(h: SafetensorsHeader) -> Match | None:
    facts = lora_facts(h)
    if facts is None:
        return None
    if facts.unpaired:
        raise BrokenModel(f"LoRA layer {facts.unpaired[0]!r} is missing its other half "
                          f"({len(facts.unpaired)} incomplete layers): incomplete or corrupted file")
    details: dict[str, Any] = {
        "format": facts.format, "parts": facts.parts, "layers": facts.layers, "rank": facts.rank,
        "context_width": facts.context_width, "te_width": facts.te_width, "warnings": [],
        "candidates": facts.candidates(),  # archs the key layout allows, for a mismatch check when arch is unknown
    }
    if "dit" in facts.parts:
        details["unsupported"] = "LoRA for a transformer (DiT) model such as Flux/SD3; not supported"
        return Match(kind=ModelKind.LORA, details=details)
    arch = facts.structural_arch() or _metadata_arch(h.metadata) or facts.width_arch() or Arch.UNKNOWN
    _confirm(arch, facts.context_width, "cross-attention", details["warnings"])
    if arch in (Arch.SD1, Arch.SD2) and facts.te_width in (768, 1024):
        _confirm(arch, facts.te_width, "text-encoder", details["warnings"])
    return Match(kind=ModelKind.LORA, arch=arch, family=_family(arch, h.metadata, FAMILY_FIELDS_BASE),
                 details=details)


def _probe_embedding(h: SafetensorsHeader) -> Match | None:
    t = h.tensors
    if "clip_l" in t or "clip_g" in t:
        if not ("clip_l" in t and "clip_g" in t):
            raise BrokenModel("SDXL embedding needs both clip_l and clip_g vectors; one is missing")
        if t["clip_l"].shape[:1] != t["clip_g"].shape[:1]:
            raise BrokenModel(f"SDXL embedding has {t['clip_l'].shape[0]} clip_l vectors but "
                              f"{t['clip_g'].shape[0]} clip_g vectors")
        return Match(kind=ModelKind.EMBEDDING, arch=Arch.SDXL, family="SDXL",
                     details={"format": "sdxl", "vectors": t["clip_l"].shape[0]})
    key = "emb_params" if "emb_params" in t else next(iter(h.keys_with_prefix("string_to_param.")), None)
    fmt = "a1111"
    if key is None and len(t) == 1:  # diffusers-style single vector file: only trust real widths
        key, fmt = next(iter(t)), "single"
        if t[key].ndim not in (1, 2) or t[key].shape[-1] not in (768, 1024):
            return None
    if key is None:
        return None
    info = t[key]
    if info.ndim not in (1, 2):
        raise BrokenModel(f"embedding tensor {key!r} has shape {list(info.shape)}; expected [vectors, width]")
    width = info.shape[-1]
    arch = {768: Arch.SD1, 1024: Arch.SD2}.get(width, Arch.UNKNOWN)
    return Match(kind=ModelKind.EMBEDDING, arch=arch, family=FAMILY_BY_ARCH[arch],
                 details={"format": fmt, "vectors": info.shape[0] if info.ndim == 2 else 1, "width": width})


DETECTORS: Mapping[str, Detector] = MappingProxyType({d.name: d for d in (
    Detector("controlnet", 10, "control_model.*, input_hint_block.* or controlnet_cond_embedding.* keys",
             _probe_controlnet),
    Detector("checkpoint", 20, "model.diffusion_model.* keys (ldm/sgm single-file checkpoint)", _probe_checkpoint),
    Detector("dit", 25, "double_blocks.*/joint_blocks.* keys (Flux/SD3)", _probe_dit),
    Detector("vae", 30, "encoder.down.*/decoder.up.* (ldm) or encoder.down_blocks.* (diffusers) keys", _probe_vae),
    Detector("lora", 40, "lora_down/lora_up, lora_A/lora_B, hada_*, lokr_* or dora_scale keys", _probe_lora),
    Detector("embedding", 50, "emb_params, string_to_param.* or clip_l + clip_g keys", _probe_embedding),
)})


def detect(header: SafetensorsHeader, detectors: Mapping[str, Detector] = DETECTORS) -> Detection:
    """Run every detector; the best-priority match wins.  A "broken" verdict from a detector that ranks
    above every match raises ``BrokenModelFile``; no match at all gives kind UNKNOWN with a message."""
    outcomes: dict[str, str] = {}
    matches: list[tuple[Detector, Match]] = []
    broken: list[tuple[Detector, BrokenModel]] = []
    for det in sorted(detectors.values(), key=lambda d: (d.priority, d.name)):
        try:
            match = det.probe(header)
        except (BrokenModel, IndexError, KeyError, TypeError, ValueError) as exc:
            # a malformed shape (e.g. a 0-d tensor where a matrix belongs) is "broken" for its claimant
            exc = exc if isinstance(exc, BrokenModel) else BrokenModel(
                f"unexpected tensor layout for a {det.name} ({type(exc).__name__}: {exc})")
            outcomes[det.name] = f"broken: {exc.reason}"
            broken.append((det, exc))
            continue
        if match is None:
            outcomes[det.name] = f"no match (looks for {det.looks_for})"
        else:
            outcomes[det.name] = f"match: {match.kind.value} {match.arch.value}"
            matches.append((det, match))
    where = header.path if header.path is not None else "<header>"
    if broken and (not matches or broken[0][0].priority < matches[0][0].priority):
        raise BrokenModelFile(where, broken[0][1].reason)
    if not matches:
        sample = ", ".join(sorted(header.tensors)[:5]) or "no tensors"
        said = "; ".join(f"{name}: {text}" for name, text in outcomes.items())
        return Detection(kind=ModelKind.UNKNOWN, details={"outcomes": outcomes}, message=(
            f"not a model type this WebUI recognises ({len(header.tensors)} tensors, e.g. {sample}). "
            f"What each detector said: {said}"))
    det, m = matches[0]
    details = {**m.details, "detector": det.name, "outcomes": outcomes}
    return Detection(kind=m.kind, arch=m.arch, variant=m.variant, prediction=m.prediction, family=m.family,
                     details=details)


# ---------------------------------------------------------------------------- paths
def detect_path(path: os.PathLike | str, *, hint: ModelKind | None = None) -> Detection:
    """Detect a file or a diffusers folder.  Pickles (.ckpt/.pt/.bin/.pth) are never opened: their kind
    is ``hint`` (the folder they were found in) or comes from the extension."""
    path = Path(path)
    if path.is_dir():
        return detect_diffusers_folder(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return detect(read_header(path))
    if suffix in PICKLE_KINDS:
        if not path.is_file():
            raise BrokenModelFile(path, "file does not exist")
        return Detection(kind=hint or PICKLE_KINDS[suffix], details={"pickle": True},
                         message="pickle file: not inspected (it could run code when loaded)")
    return Detection(kind=ModelKind.UNKNOWN, message=f"unsupported file type {suffix or '(none)'}")


# diffusers pipeline class -> (arch if the class fixes it, variant if the class fixes it)
DIFFUSERS_PIPELINES = MappingProxyType({
    "StableDiffusionPipeline": (None, None), "StableDiffusionImg2ImgPipeline": (None, None),
    "StableDiffusionInpaintPipeline": (None, Variant.INPAINT),
    "StableDiffusionInstructPix2PixPipeline": (None, Variant.INSTRUCT_PIX2PIX),
    "StableDiffusionDepth2ImgPipeline": (Arch.SD2, Variant.DEPTH),
    "StableDiffusionXLPipeline": (Arch.SDXL, None), "StableDiffusionXLImg2ImgPipeline": (Arch.SDXL, None),
    "StableDiffusionXLInpaintPipeline": (Arch.SDXL, Variant.INPAINT),
    "StableDiffusionXLInstructPix2PixPipeline": (Arch.SDXL, Variant.INSTRUCT_PIX2PIX),
})


def _read_json(path: Path, folder: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BrokenModelFile(folder, f"diffusers folder has no {path.relative_to(folder)}: incomplete copy") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BrokenModelFile(folder, f"{path.relative_to(folder)} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BrokenModelFile(folder, f"{path.relative_to(folder)} is not a JSON object")
    return obj


def detect_diffusers_folder(folder: Path) -> Detection:
    """model_index.json ``_class_name`` -> arch; unet/config.json in_channels -> variant; scheduler
    ``prediction_type`` -> prediction.  SD1 vs SD2 by the UNet's linear projection (structure), then width."""
    index = _read_json(folder / "model_index.json", folder)
    name = str(index.get("_class_name", ""))
    details: dict[str, Any] = {"format": "diffusers", "pipeline": name, "warnings": []}
    if name not in DIFFUSERS_PIPELINES:
        details["unsupported"] = f"diffusers pipeline {name or '(no _class_name)'} is not supported"
        return Detection(kind=ModelKind.CHECKPOINT, details=details, message=details["unsupported"])
    arch, variant = DIFFUSERS_PIPELINES[name]
    unet = _read_json(folder / "unet" / "config.json", folder)
    width = unet.get("cross_attention_dim")
    width = width[0] if isinstance(width, list) and width else width
    in_channels = unet.get("in_channels")
    try:
        found = _variant(in_channels if isinstance(in_channels, int) else None, "unet/config.json")
    except BrokenModel as exc:
        raise BrokenModelFile(folder, exc.reason) from None
    if variant is not None and found is not variant:
        details["warnings"].append(f"{name} but unet in_channels {in_channels} means {found.value}")
    if arch is Arch.SDXL:
        te = index.get("text_encoder")
        if (te is None or te == [None, None]) and "text_encoder_2" in index:
            arch = Arch.SDXL_REFINER
    elif arch is None:
        arch = Arch.SD2 if unet.get("use_linear_projection") else Arch.SD1
    _confirm(arch, width if isinstance(width, int) else None, "cross-attention", details["warnings"])
    scheduler = folder / "scheduler" / "scheduler_config.json"
    word = str(_read_json(scheduler, folder).get("prediction_type", "")).lower() if scheduler.exists() else ""
    return Detection(kind=ModelKind.CHECKPOINT, arch=arch, variant=found, prediction=PREDICTION_WORDS.get(word),
                     family=FAMILY_BY_ARCH[arch], details=details)
