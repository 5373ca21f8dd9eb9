"""LoRA layer names -> modules of the loaded model.

The map is built from the model's own ``named_modules()``, never from a hard-coded list, so it follows
whatever layout the installed diffusers/transformers produce (transformers 5 names ``CLIPTextModel``
modules without the ``text_model.`` prefix that ``CLIPTextModelWithProjection`` still has).

Every patchable module (Linear/Conv) is indexed under its "flat" name: the dotted name with ``.`` -> ``_``,
which is how kohya spells layers (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``).
Text-encoder names drop a leading ``text_model_`` on both sides.  UNet modules are also indexed under
their ldm/sgm names (``input_blocks_4_1_...``, ``middle_block_1_...``, ``output_blocks_2_1_conv``), which
kohya uses for SDXL and older SD1 trainers used too; that alias table is derived from the UNet's block
structure (resnets/attentions/down- and upsamplers per block), so it holds for any layer count.  The same
walk gives each UNet layer its A1111 "LoRA Block Weight" block id (``IN04``, ``M00``, ``OUT03``).

File prefixes: kohya ``lora_unet_``/``lora_te_``/``lora_te1_``/``lora_te2_``/``lora_te3_``; diffusers/peft
``unet.``, ``transformer.``, ``text_encoder.``, ``text_encoder_2.``, ``text_encoder_3.``; ldm/ComfyUI
``diffusion_model.``.  Old diffusers attention-processor names (``attn1.processor.to_q_lora``) are folded onto
the module they patch.

DiT models (Flux, SD3, Qwen-Image) have a ``transformer`` component instead of a ``unet``: the two are one
role (the denoiser), so a ``unet`` name (``lora_unet_``, ``diffusion_model.``) resolves in the transformer when
the model has no UNet, and the other way round.  kohya's T5 (``lora_te3_``) resolves in whichever text
encoder is a T5 (``text_encoder_2`` in Flux, ``text_encoder_3`` in SD3).  BFL/SAI names with fused layers
are converted to diffusers names when the file is loaded (``dit_keymap``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping

from torch import nn

__all__ = ["COMPONENT_ALIASES", "DENOISERS", "KeyMap", "PATCHABLE", "Target", "ldm_layout", "split_name"]

PATCHABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
COMPONENTS = ("unet", "transformer", "te1", "te2", "te3")
DENOISERS = ("unet", "transformer")
COMPONENT_ALIASES = MappingProxyType({
    "unet": "unet", "transformer": "transformer", "te1": "te1", "te2": "te2", "te3": "te3", "te": "te1",
    "text_encoder": "te1", "text_encoder_2": "te2", "text_encoder_3": "te3",
})
# Pipeline components a LoRA never patches: passing ``pipe.components`` as it is works.
IGNORED_COMPONENTS = frozenset({"vae", "scheduler", "tokenizer", "tokenizer_2", "feature_extractor",
                                "safety_checker", "image_encoder"})
# file prefix -> component (longest first where one is a prefix of another)
FILE_PREFIXES = (
    ("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te1"),
    ("lora_transformer_", "transformer"), ("unet.", "unet"), ("transformer.", "transformer"),
    ("text_encoder_2.", "te2"), ("text_encoder_3.", "te3"), ("text_encoder.", "te1"),
    ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"), ("base_model.model.", "transformer"),
)
_UNET_HINT = re.compile(r"^(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block|conv_in|"
                        r"conv_out|time_embed)")
_DIT_HINT = re.compile(r"^(?:transformer_blocks|single_transformer_blocks)[._]")
_T5_PROBE = "encoder.block.0.layer.0.SelfAttention.q"  # a T5 encoder's first attention layer
# diffusers ResnetBlock2D child -> ldm ResBlock child
RESNET_LDM = MappingProxyType({"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                               "conv_shortcut": "skip_connection"})
EMBED_LDM = MappingProxyType({"linear_1": "0", "linear_2": "2"})


@dataclass(frozen=True)
class Target:
    component: str  # "unet" | "transformer" | "te1" | "te2" | "te3"
    module: str  # dotted module name inside that component
    block: str | None  # LoRA Block Weight id: "BASE" (text encoders), "IN00".."OUT11"/"M00", None = no block


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _strip_text_model(flat: str) -> str:
    return flat[len("text_model_"):] if flat.startswith("text_model_") else flat


def split_name(name: str) -> tuple[str, str] | None:
    """A layer name from a LoRA file -> ``(component, flat module name)``; None if it names no UNet/CLIP layer.

    >>> split_name("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    ('te1', 'encoder_layers_0_self_attn_q_proj')
    """
    for prefix, component in FILE_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            break
    else:
        if _DIT_HINT.match(name):
            component, rest = "transformer", name
        elif _UNET_HINT.match(name):
            component, rest = "unet", name
        else:
            return None
    flat = _flat(rest)
    if "_processor_" in flat:  # diffusers attention processors: attn1.processor.to_out_lora -> attn1.to_out.0
        flat = flat.replace("_processor_", "_")
        if flat.endswith("_to_out"):
            flat += "_0"
    if component not in DENOISERS:
        flat = _strip_text_model(flat)
    return component, flat


def ldm_layout(unet: nn.Module) -> list[tuple[str, str, str | None, Mapping[str, str]]]:
    """``(diffusers container, ldm container, block id, child renames)`` for a diffusers UNet2DConditionModel,
    derived from its blocks.  Empty for a module without that structure."""
    if not all(hasattr(unet, a) for a in ("down_blocks", "up_blocks", "mid_block")):
        return []
    items: list[tuple[str, str, str | None, Mapping[str, str]]] = [
        ("conv_in", "input_blocks.0.0", "IN00", {}),
        ("time_embedding", "time_embed", None, EMBED_LDM),
        ("add_embedding", "label_emb.0", None, EMBED_LDM),
        ("conv_out", "out.2", None, {}),
    ]
    n = 1
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or ()
        for j in range(len(block.resnets)):
            items.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", f"IN{n:02d}", RESNET_LDM))
            if j < len(attentions):
                items.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", f"IN{n:02d}", {}))
            n += 1
        if getattr(block, "downsamplers", None):
            items.append((f"down_blocks.{i}.downsamplers.0", f"input_blocks.{n}.0", f"IN{n:02d}", {"conv": "op"}))
            n += 1
    mid = unet.mid_block
    if mid is not None:
        mid_attn = getattr(mid, "attentions", None) or ()
        for j in range(len(mid.resnets)):
            items.append((f"mid_block.resnets.{j}", f"middle_block.{2 * j}", "M00", RESNET_LDM))
            if j < len(mid_attn):
                items.append((f"mid_block.attentions.{j}", f"middle_block.{2 * j + 1}", "M00", {}))
    m = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or ()
        count = len(block.resnets)
        for j in range(count):
            items.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{m}.0", f"OUT{m:02d}", RESNET_LDM))
            if j < len(attentions):
                items.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{m}.1", f"OUT{m:02d}", {}))
            if j == count - 1 and getattr(block, "upsamplers", None):
                slot = 2 if j < len(attentions) else 1
                items.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{m}.{slot}", f"OUT{m:02d}", {}))
            m += 1
    return items


def _layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, sub in module.named_modules():
        if isinstance(sub, PATCHABLE):
            yield name, sub


class KeyMap:
    """Index of the patchable layers of ``{component: module}`` by every name a LoRA file may use."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        comps: dict[str, nn.Module] = {}
        for key, module in modules.items():
            if module is None or key in IGNORED_COMPONENTS:
                continue
            canon = COMPONENT_ALIASES.get(key)
            if canon is None:
                raise ValueError(f"unknown model component {key!r}; use one of {', '.join(COMPONENTS)}")
            comps[canon] = module
        self._modules = MappingProxyType(comps)
        self._index: dict[str, dict[str, str | None]] = {}
        self._blocks: dict[str, dict[str, str | None]] = {}
        self._layers: dict[str, dict[str, nn.Module]] = {}
        for comp, module in comps.items():
            layers = dict(_layers(module))
            self._layers[comp] = layers
            index: dict[str, str | None] = {}
            for name in layers:
                flat = _flat(name) if comp in DENOISERS else _strip_text_model(_flat(name))
                _add(index, flat, name)
            blocks: dict[str, str | None] = {}
            if comp == "unet":
                for container, ldm, block, renames in ldm_layout(module):
                    try:
                        sub = module.get_submodule(container)
                    except AttributeError:
                        continue
                    for child, _layer in _layers(sub):
                        first, _, tail = child.partition(".")
                        child_ldm = renames.get(first, first) + ("." + tail if tail else "") if child else ""
                        full = f"{container}.{child}" if child else container
                        _add(index, _flat(f"{ldm}.{child_ldm}" if child_ldm else ldm), full)
                        blocks[full] = block
            self._index[comp] = index
            self._blocks[comp] = blocks
        # where names of another component live in this model: the denoiser under either name, T5 anywhere
        self._redirect = {a: b for a, b in (("unet", "transformer"), ("transformer", "unet")) if b in comps}
        t5 = next((c for c in ("te3", "te2", "te1") if _T5_PROBE in self._layers.get(c, {})), None)
        if t5 is not None:
            self._redirect.setdefault("te3", t5)

    @property
    def components(self) -> Mapping[str, nn.Module]:
        return self._modules

    def layers(self, component: str) -> Mapping[str, nn.Module]:
        return MappingProxyType(self._layers.get(component, {}))

    def resolve(self, name: str) -> Target | None:
        """The module a LoRA layer name patches, or None when this model has no such layer."""
        split = split_name(name)
        if split is None:
            return None
        component, flat = split
        if component not in self._index:
            component = self._redirect.get(component, component)
        module = self._index.get(component, {}).get(flat)
        if module is None:
            return None
        block = "BASE" if component not in DENOISERS else self._blocks[component].get(module)
        return Target(component, module, block)

    def module(self, target: Target) -> nn.Module:
        return self._layers[target.component][target.module]


def _add(index: dict[str, str | None], flat: str, name: str) -> None:
    """Index ``flat`` -> ``name``; two different modules with one flat name make it ambiguous (None)."""
    if flat in index and index[flat] != name:
        index[flat] = None
    else:
        index[flat] = name
