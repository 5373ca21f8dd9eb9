"""Does this LoRA fit this model?  Checked before any weight is touched.

Three verdicts, each naming the file:
* wrong architecture (``LoraArchMismatch``): the LoRA's detected architecture belongs to another family
  than the model's (an SDXL LoRA on SD1 ...), or its matched layers have the wrong shapes (the same
  layer names exist in SD1 and SD2 with different widths);
* nothing matched (``LoraNoMatch``): zero of its layers exist in the model;
* partial match: a ``MatchReport`` with ``unmatched`` filled, which the patcher reports as a warning.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from torch import nn

from webui.models.lora.formats import LoraError
from webui.models.lora.keymap import KeyMap, Target
from webui.models.lora.loading import LoadedLora
from webui.models.lora.quantized import logical_shape
from webui.types import Arch

__all__ = [
    "ARCH_NAMES", "LoraArchMismatch", "LoraError", "LoraNoMatch", "MatchReport", "TRANSFORMER_ARCH", "check_lora",
    "model_arch", "same_family",
]

ARCH_NAMES = MappingProxyType({Arch.SD1: "SD 1.x", Arch.SD2: "SD 2.x", Arch.SDXL: "SDXL",
                               Arch.SDXL_REFINER: "SDXL Refiner", Arch.SD3: "SD3/SD3.5", Arch.FLUX: "Flux.1",
                               Arch.QWEN_IMAGE: "Qwen-Image", Arch.UNKNOWN: "an unknown architecture"})
_FAMILY = MappingProxyType({Arch.SD1: "sd", Arch.SD2: "sd", Arch.SDXL: "sdxl", Arch.SDXL_REFINER: "refiner",
                            Arch.SD3: "sd3", Arch.FLUX: "flux", Arch.QWEN_IMAGE: "qwen_image"})
_CONTEXT_ARCH = MappingProxyType({768: Arch.SD1, 1024: Arch.SD2, 2048: Arch.SDXL, 1280: Arch.SDXL_REFINER})
# diffusers transformer class -> architecture (Kontext / Qwen-Image-Edit share their family's class)
TRANSFORMER_ARCH = MappingProxyType({"FluxTransformer2DModel": Arch.FLUX, "SD3Transformer2DModel": Arch.SD3,
                                     "QwenImageTransformer2DModel": Arch.QWEN_IMAGE})


class LoraArchMismatch(LoraError):
    """The LoRA was made for another base architecture (or its layer shapes say so)."""


class LoraNoMatch(LoraError):
    """Not one layer of the LoRA exists in the loaded model."""


@dataclass(frozen=True)
class MatchReport:
    lora: str  # file name
    matched: Mapping[str, Target]  # layer name in the file -> module it patches
    unmatched: tuple[str, ...]  # layer names with no module in this model

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.unmatched)

    @property
    def warning(self) -> str | None:
        if not self.unmatched:
            return None
        shown = ", ".join(self.unmatched[:8]) + (" ..." if len(self.unmatched) > 8 else "")
        return (f"LoRA {self.lora}: {len(self.unmatched)} of {self.total} layers match nothing in this model "
                f"and are skipped: {shown}")


def model_arch(modules: Mapping[str, nn.Module]) -> Arch:
    """Architecture of a loaded model from its components: real cross-attention widths first, then structure
    (two text encoders => SDXL; a refiner has only the second one).  A DiT model by its transformer's class."""
    transformer = modules.get("transformer")
    if transformer is not None:
        return next((TRANSFORMER_ARCH[c.__name__] for c in type(transformer).__mro__
                     if c.__name__ in TRANSFORMER_ARCH), Arch.UNKNOWN)
    unet = modules.get("unet")
    config = getattr(unet, "config", None)
    width = getattr(config, "cross_attention_dim", None) if config is not None else None
    if isinstance(width, int) and width in _CONTEXT_ARCH:
        return _CONTEXT_ARCH[width]
    te1 = modules.get("te1", modules.get("text_encoder"))
    te2 = modules.get("te2", modules.get("text_encoder_2"))
    if te2 is not None:
        return Arch.SDXL if te1 is not None else Arch.SDXL_REFINER
    if config is not None and getattr(config, "addition_embed_type", None) == "text_time":
        return Arch.SDXL
    if unet is not None and hasattr(unet, "down_blocks"):
        return Arch.SD2 if getattr(config, "use_linear_projection", False) else Arch.SD1
    return Arch.UNKNOWN


def same_family(a: Arch, b: Arch) -> bool:
    """Whether a LoRA for ``a`` may go on a model of ``b``.  UNKNOWN fits anything (the key match decides);
    SD1 and SD2 share layer names, so the shape check tells them apart."""
    if Arch.UNKNOWN in (a, b):
        return True
    return _FAMILY.get(a) == _FAMILY.get(b)


def check_lora(lora: LoadedLora, keymap: KeyMap, arch: Arch) -> MatchReport:
    """Match every layer of ``lora`` to a module of the model; raise if it cannot be applied at all."""
    if not same_family(lora.arch, arch):
        raise LoraArchMismatch(
            f"LoRA {lora.label} was made for {ARCH_NAMES[lora.arch]} but the loaded model is {ARCH_NAMES[arch]}; "
            f"use a LoRA made for {ARCH_NAMES[arch]}, or load a {ARCH_NAMES[lora.arch]} checkpoint")
    matched: dict[str, Target] = {}
    unmatched: list[str] = []
    wrong_shape: list[str] = []
    for name, patch in lora.patches.items():
        target = keymap.resolve(name)
        if target is None:
            unmatched.append(name)
            continue
        shape = logical_shape(keymap.module(target).weight)  # GGUF: the values' shape, not the bytes'
        if not patch.fits(shape):
            wrong_shape.append(f"{name} (LoRA needs {list(patch.flat_shape())}, model has {list(shape)})")
            continue
        matched[name] = target
    if wrong_shape:
        raise LoraArchMismatch(
            f"LoRA {lora.label} ({ARCH_NAMES[lora.arch]}) does not fit the loaded {ARCH_NAMES[arch]} model: "
            f"{len(wrong_shape)} of {len(lora.patches)} layers have other shapes, e.g. {wrong_shape[0]}; "
            f"it was made for a different base model")
    if not matched:
        sample = ", ".join(sorted(lora.patches)[:3])
        raise LoraNoMatch(
            f"LoRA {lora.label}: none of its {len(lora.patches)} layers exist in the loaded {ARCH_NAMES[arch]} "
            f"model (e.g. {sample}); it is for another architecture or in a format this WebUI does not know")
    return MatchReport(lora=lora.label, matched=matched, unmatched=tuple(sorted(unmatched)))
