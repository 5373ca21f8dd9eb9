"""LoRA file formats -> one ``LayerPatch`` per adapted layer.  Pure tensor math; no model access.

A LoRA state dict is a flat ``{key: tensor}``.  Every key is ``<layer name><suffix>``; the suffix says
which part of which adapter format it is (``.lora_down.weight``, ``.hada_w1_a``, ``.lokr_w2`` ...).
``parse_state_dict`` groups keys by layer name and builds one patch object per layer:

==========  ===============================================  =======================================
class       keys (per layer)                                 delta (before ``scale`` = alpha/rank)
==========  ===============================================  =======================================
LoraPatch   lora_down/lora_up (+lora_mid: CP/Tucker conv),    up @ down  (mid: einsum over the core)
            lora_A/lora_B (peft), .lora.down/.lora.up
LohaPatch   hada_w1_a/b, hada_w2_a/b (+hada_t1/t2 Tucker)     (w1a @ w1b) * (w2a @ w2b)
LokrPatch   lokr_w1 | lokr_w1_a/b, lokr_w2 | lokr_w2_a/b      kron(w1, w2)
            (+lokr_t2 Tucker)
FullPatch   diff (+diff_b)                                    diff
==========  ===============================================  =======================================

Any of them may carry a DoRA magnitude (kohya/LyCORIS ``dora_scale`` or peft ``lora_magnitude_vector``);
then the delta for a pristine weight ``W`` is ``m * (W + dW) / ||W + dW|| - W`` (weight-decomposed).  The
norm is taken per output row for peft magnitudes (``[out]``, conv ``[1, out, 1, 1]``) and for
``dora_scale`` shaped ``[out, 1, ...]`` (LyCORIS ``wd_on_out``), per input column for ``dora_scale`` shaped
``[1, in, ...]`` (LyCORIS ``apply_dora_scale``, A1111 ``apply_weight_decompose``).
The user's multiplier is applied to that whole delta, as A1111 and LyCORIS do.

``alpha`` missing means ``alpha == rank`` (scale 1).  All math runs in float32.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import torch

__all__ = [
    "FORMAT_SUFFIXES", "FullPatch", "LayerPatch", "LoraError", "LohaPatch", "LokrPatch", "LoraFormatError",
    "LoraPatch", "ParsedLora", "parse_state_dict",
]


class LoraError(ValueError):
    """A LoRA that cannot be loaded or applied; the message names the file and says why."""


class LoraFormatError(LoraError):
    """A LoRA file whose keys or shapes cannot be used; the message names the file/layer and the problem."""


# suffix -> role; longest suffix wins (".lora.down.weight" before ".down.weight").
FORMAT_SUFFIXES: Mapping[str, str] = MappingProxyType({
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",  # old diffusers attention-processor files
    ".alpha": "alpha", ".dora_scale": "dora_scale",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".diff": "diff", ".diff_b": "diff_b",
})
# Recognised but not supported: say so instead of calling them unknown.
UNSUPPORTED_SUFFIXES: Mapping[str, str] = MappingProxyType({
    ".oft_blocks": "OFT", ".oft_diag": "OFT", ".oft_R": "BOFT", ".on_input": "IA3",
    ".a1.weight": "GLoRA", ".b1.weight": "GLoRA", ".w_norm": "norm-layer LyCORIS", ".b_norm": "norm-layer LyCORIS",
})
_SUFFIX_RE = re.compile("(" + "|".join(map(re.escape, sorted(FORMAT_SUFFIXES, key=len, reverse=True))) + ")$")
_UNSUPPORTED_RE = re.compile("(" + "|".join(map(re.escape, UNSUPPORTED_SUFFIXES)) + ")$")


def _f32(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Rebuild a conv kernel from a Tucker core ``[r1, r2, kh, kw]`` and factors ``wa [r1, out]``,
    ``wb [r2, in]`` -> ``[out, in, kh, kw]`` (LyCORIS ``rebuild_tucker``)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, wa, wb)


@dataclass(frozen=True, eq=False)
class LayerPatch:
    """The adapter of one layer.  ``delta(W)`` is what gets added to the pristine weight ``W`` at
    multiplier 1; ``bias_delta`` (or None) what gets added to its bias."""

    name: str  # the layer's key in the file (prefix before the format suffix)
    alpha: float | None = None
    magnitude: torch.Tensor | None = None  # DoRA
    magnitude_axis: str = "out"  # "out": one magnitude per output row; "in": per input column
    bias_diff: torch.Tensor | None = None
    kind: ClassVar[str] = "?"

    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        rank = self.rank
        if self.alpha is None or not rank:
            return 1.0
        return float(self.alpha) / rank

    def flat_shape(self) -> tuple[int, int]:
        """``(out_features, numel of one output row)`` of the weight this patch fits, from shapes only."""
        raise NotImplementedError

    def raw_delta(self, device: torch.device | None = None) -> torch.Tensor:
        """The low-rank product in float32, before ``scale``; any layout with the right element count."""
        raise NotImplementedError

    def fits(self, shape: torch.Size | tuple[int, ...]) -> bool:
        out, row = self.flat_shape()
        return len(shape) >= 2 and shape[0] == out and math.prod(shape[1:]) == row

    def delta(self, orig: torch.Tensor) -> torch.Tensor:
        """Float32 delta for the pristine weight ``orig`` (float32, on the compute device)."""
        d = self.raw_delta(orig.device).reshape(orig.shape) * self.scale
        if self.magnitude is not None:
            d = self._decompose(orig, d)
        return d

    def bias_delta(self, orig: torch.Tensor) -> torch.Tensor | None:
        if self.bias_diff is None:
            return None
        return _f32(self.bias_diff, orig.device).reshape(orig.shape)

    def _decompose(self, orig: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        merged = orig + d
        m = _f32(self.magnitude, orig.device)
        if self.magnitude_axis == "out":  # one norm per output row: peft, LyCORIS wd_on_out ([out, 1, ...])
            norm = _flat(merged).norm(dim=1).reshape(orig.shape[0], *[1] * (orig.dim() - 1))
        else:  # one norm per input column: LyCORIS functional / A1111 ([1, in, 1, ...])
            cols = merged.transpose(0, 1)
            norm = _flat(cols).norm(dim=1).reshape(cols.shape[0], *[1] * (orig.dim() - 1)).transpose(0, 1)
        return merged * (m.reshape(norm.shape) / norm.clamp_min(torch.finfo(torch.float32).tiny)) - orig

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors of the patch (for size accounting)."""
        out = {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return out


@dataclass(frozen=True, eq=False)
class LoraPatch(LayerPatch):
    down: torch.Tensor = field(default=None)  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor = field(default=None)  # [out, r] or [out, r, 1, 1]
    mid: torch.Tensor | None = None  # [r, r, kh, kw] (CP/Tucker LoCon)
    kind: ClassVar[str] = "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def flat_shape(self) -> tuple[int, int]:
        row = math.prod(self.down.shape[1:]) if self.mid is None else self.down.shape[1] * math.prod(self.mid.shape[2:])
        return self.up.shape[0], row

    def raw_delta(self, device=None):
        up, down = _flat(_f32(self.up, device)), _flat(_f32(self.down, device))
        if self.mid is None:
            return up @ down
        return torch.einsum("i j ..., p i, j r -> p r ...", _f32(self.mid, device), up, down)


@dataclass(frozen=True, eq=False)
class LohaPatch(LayerPatch):
    w1a: torch.Tensor = field(default=None)
    w1b: torch.Tensor = field(default=None)
    w2a: torch.Tensor = field(default=None)
    w2b: torch.Tensor = field(default=None)
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind: ClassVar[str] = "loha"

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def flat_shape(self) -> tuple[int, int]:
        if self.t1 is not None:
            return self.w1a.shape[1], self.w1b.shape[1] * math.prod(self.t1.shape[2:])
        return self.w1a.shape[0], self.w1b.shape[1]

    def raw_delta(self, device=None):
        w1a, w1b, w2a, w2b = (_f32(t, device) for t in (self.w1a, self.w1b, self.w2a, self.w2b))
        if self.t1 is not None and self.t2 is not None:
            return _tucker(_f32(self.t1, device), w1a, w1b) * _tucker(_f32(self.t2, device), w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)


@dataclass(frozen=True, eq=False)
class LokrPatch(LayerPatch):
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind: ClassVar[str] = "lokr"

    @property
    def rank(self) -> int | None:
        # LyCORIS: alpha only scales decomposed factors; two full factors mean scale 1.
        if self.w1b is not None:
            return self.w1b.shape[0]
        if self.w2b is not None:
            return self.w2b.shape[0]
        return None

    def _w1_shape(self) -> tuple[int, int]:
        return tuple(self.w1.shape) if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])

    def _w2_flat_shape(self) -> tuple[int, int]:
        if self.w2 is not None:
            return self.w2.shape[0], math.prod(self.w2.shape[1:])
        if self.t2 is not None:
            return self.w2a.shape[1], self.w2b.shape[1] * math.prod(self.t2.shape[2:])
        return self.w2a.shape[0], self.w2b.shape[1]

    def flat_shape(self) -> tuple[int, int]:
        (o1, i1), (o2, i2) = self._w1_shape(), self._w2_flat_shape()
        return o1 * o2, i1 * i2

    def raw_delta(self, device=None):
        w1 = _f32(self.w1, device) if self.w1 is not None else _f32(self.w1a, device) @ _f32(self.w1b, device)
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        elif self.t2 is not None:
            w2 = _tucker(_f32(self.t2, device), _f32(self.w2a, device), _f32(self.w2b, device))
        else:
            w2 = _f32(self.w2a, device) @ _f32(self.w2b, device)
        # kron over the flattened kernels equals the 4-D kron with w1 broadcast over the kernel dims.
        return torch.kron(w1, _flat(w2))


@dataclass(frozen=True, eq=False)
class FullPatch(LayerPatch):
    diff: torch.Tensor = field(default=None)
    kind: ClassVar[str] = "full"

    def flat_shape(self) -> tuple[int, int]:
        return self.diff.shape[0], math.prod(self.diff.shape[1:])

    def raw_delta(self, device=None):
        return _f32(self.diff, device)


@dataclass(frozen=True)
class ParsedLora:
    patches: Mapping[str, LayerPatch]  # layer name in the file -> patch
    ignored: tuple[str, ...] = ()  # keys that belong to no known format
    unsupported: tuple[str, ...] = ()  # "layer (OFT)" for recognised but unsupported adapters

    @property
    def format(self) -> str:
        kinds = {p.kind for p in self.patches.values()}
        dora = any(p.magnitude is not None for p in self.patches.values())
        conv = any(isinstance(p, LoraPatch) and p.down.dim() == 4 and (p.mid is not None or p.down.shape[2] > 1)
                   for p in self.patches.values())
        base = "+".join(sorted(kinds)) or "none"
        if base == "lora" and conv:
            base = "locon"
        return f"{base}+dora" if dora else base


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers >= 0.34 stores the peft ``LoraConfig`` per component in ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, field_name = key.rpartition(".")
        out.setdefault(component, {})[field_name] = value
    return out


def _peft_alpha(name: str, rank: int, configs: Mapping[str, Mapping[str, Any]]) -> float | None:
    for component in sorted(configs, key=len, reverse=True):
        if not name.startswith(component + "."):
            continue
        cfg, module = configs[component], name[len(component) + 1:]
        alpha = cfg.get("lora_alpha")
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?({pattern})", module):
                alpha = value
        if alpha is None:
            return None
        return float(alpha) * (rank ** 0.5 if cfg.get("use_rslora") else 1.0)  # rsLoRA: alpha / sqrt(r)
    return None


_BUILDERS = MappingProxyType({  # role that marks the format -> (class, {role: field})
    "hada_w1_a": (LohaPatch, {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
                              "hada_t1": "t1", "hada_t2": "t2"}),
    "lokr": (LokrPatch, {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2",
                         "lokr_w2_a": "w2a", "lokr_w2_b": "w2b", "lokr_t2": "t2"}),
    "down": (LoraPatch, {"down": "down", "up": "up", "mid": "mid"}),
    "diff": (FullPatch, {"diff": "diff"}),
})
_REQUIRED = MappingProxyType({
    LohaPatch: ("w1a", "w1b", "w2a", "w2b"), LoraPatch: ("down", "up"), FullPatch: ("diff",),
})


def _build(name: str, roles: dict[str, torch.Tensor], alpha: float | None) -> LayerPatch | None:
    if "hada_w1_a" in roles or "hada_w2_a" in roles:
        marker = "hada_w1_a"
    elif any(r.startswith("lokr_") for r in roles):
        marker = "lokr"
    elif "down" in roles or "up" in roles:
        marker = "down"
    elif "diff" in roles:
        marker = "diff"
    else:
        return None
    cls, fields = _BUILDERS[marker]
    kwargs = {fields[r]: t for r, t in roles.items() if r in fields}
    role_of = {f: r for r, f in fields.items()}
    missing = [role_of[f] for f in _REQUIRED.get(cls, ()) if kwargs.get(f) is None]
    if cls is LokrPatch:
        for side in ("w1", "w2"):
            if side not in kwargs and not (f"{side}a" in kwargs and f"{side}b" in kwargs):
                missing.append(f"lokr_{side} (or lokr_{side}_a + lokr_{side}_b)")
    if missing:
        raise LoraFormatError(f"layer {name!r} is incomplete: {', '.join(missing)} missing")
    magnitude, axis = roles.get("magnitude"), "out"  # peft: [out] (linear) or [1, out, 1, 1] (conv)
    if magnitude is None and (magnitude := roles.get("dora_scale")) is not None:
        # kohya/LyCORIS: [out, 1, ...] when decomposed per output, [1, in, ...] when per input
        axis = "out" if magnitude.shape[0] == magnitude.numel() else "in"
    patch = cls(name=name, alpha=alpha, magnitude=magnitude, magnitude_axis=axis, bias_diff=roles.get("diff_b"),
                **kwargs)
    if cls is LoraPatch and patch.down.shape[0] != _flat(patch.up).shape[1]:
        raise LoraFormatError(f"layer {name!r}: rank {patch.down.shape[0]} in down but {patch.up.shape[1]} in up")
    return patch


def parse_state_dict(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                     ) -> ParsedLora:
    """Group ``state_dict`` keys by layer and build a ``LayerPatch`` for each layer.

    Raises ``LoraFormatError`` for a layer with missing parts; keys of no known format are returned in
    ``ignored``, recognised-but-unsupported adapters (OFT, IA3, ...) in ``unsupported``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    ignored: list[str] = []
    unsupported: dict[str, str] = {}
    for key, tensor in state_dict.items():
        m = _SUFFIX_RE.search(key)
        if m is None:
            u = _UNSUPPORTED_RE.search(key)
            if u is not None:
                unsupported[key[: u.start()]] = UNSUPPORTED_SUFFIXES[u.group(1)]
            else:
                ignored.append(key)
            continue
        groups.setdefault(key[: m.start()], {})[FORMAT_SUFFIXES[m.group(1)]] = tensor
    peft_cfg = _peft_alphas(metadata or {})
    patches: dict[str, LayerPatch] = {}
    for name, roles in groups.items():
        alpha_t = roles.pop("alpha", None)
        alpha = float(alpha_t.float().item()) if alpha_t is not None and alpha_t.numel() == 1 else None
        if alpha is not None and alpha == 0:
            alpha = None  # kohya/LyCORIS: alpha 0 means "alpha = rank"
        if name in unsupported:
            continue
        patch = _build(name, roles, alpha)
        if patch is None:
            ignored.extend(f"{name}.{r}" for r in roles)
            continue
        if patch.alpha is None and peft_cfg and patch.rank:
            peft_alpha = _peft_alpha(name, patch.rank, peft_cfg)
            if peft_alpha is not None:
                patch = replace(patch, alpha=peft_alpha)
        patches[name] = patch
    return ParsedLora(patches=patches, ignored=tuple(sorted(ignored)),
                      unsupported=tuple(f"{k} ({v})" for k, v in sorted(unsupported.items())))

