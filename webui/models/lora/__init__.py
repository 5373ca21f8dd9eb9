"""The LoRA engine: parse LoRA files, map their layers onto a loaded model, merge and restore.

Typical use on the worker thread::

    lora = load_lora(path, sha256=record_hash)            # LoadedLora (CPU tensors, arch, trigger words)
    patcher = LoraPatcher({"unet": unet, "te1": te, "te2": te2})   # one per loaded model
    report = patcher.apply([(lora, 0.8, 0.8), StackEntry(other, 1.0, 1.0, "MIDD")])
    ...generate...
    patcher.apply([])  # or patcher.restore(): weights are pristine again, bit for bit

Modules: ``formats`` (file keys -> per-layer patches and their deltas), ``keymap`` (layer names -> model
modules, built from the model's own module names), ``compat`` (architecture and key-match checks),
``blocks`` (per-block weights), ``loading`` (files -> ``LoadedLora``), ``patcher`` (merge/restore),
``dit_keymap`` (Flux/SD3/Qwen-Image LoRAs: family detection, BFL/SAI names -> diffusers, fused-layer splits).
DiT models are patched the same way: ``LoraPatcher({"transformer": pipe.transformer, "te1": ..., "te2": ...})``.
"""
from webui.models.lora.blocks import (
    BLOCK_LAYOUTS, SD_PRESETS, SDXL_PRESETS, BlockWeightError, block_multiplier, resolve_block_weights,
)
from webui.models.lora.compat import LoraArchMismatch, LoraNoMatch, MatchReport, check_lora, model_arch
from webui.models.lora.dit_keymap import DIT_ARCHES, convert_dit_patches, dit_lora_arch
from webui.models.lora.formats import (
    FullPatch, LayerPatch, LohaPatch, LokrPatch, LoraError, LoraFormatError, LoraPatch, ParsedLora,
    parse_state_dict,
)
from webui.models.lora.keymap import KeyMap, Target, split_name
from webui.models.lora.loading import LoadedLora, load_lora, lora_from_state_dict, trigger_words
from webui.models.lora.patcher import LoraPatcher, PatchReport, StackEntry

__all__ = [
    "BLOCK_LAYOUTS", "BlockWeightError", "DIT_ARCHES", "FullPatch", "KeyMap", "LayerPatch", "LoadedLora",
    "LohaPatch", "LokrPatch", "LoraArchMismatch", "LoraError", "LoraFormatError", "LoraNoMatch", "LoraPatch",
    "LoraPatcher", "MatchReport", "ParsedLora", "PatchReport", "SDXL_PRESETS", "SD_PRESETS", "StackEntry", "Target",
    "block_multiplier", "check_lora", "convert_dit_patches", "dit_lora_arch", "load_lora", "lora_from_state_dict",
    "model_arch", "parse_state_dict", "resolve_block_weights", "split_name", "trigger_words",
]
