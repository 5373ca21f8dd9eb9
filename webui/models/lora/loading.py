"""Read a LoRA file into a ``LoadedLora``: parsed patches, metadata, architecture and trigger words.

Only safetensors are read by default.  A ``.pt``/``.ckpt``/``.bin`` LoRA is read only with
``allow_pickle=True`` and then through ``torch.load(weights_only=True)`` (no arbitrary code).
The architecture comes from ``webui.models.detect`` (the same verdict the catalog shows), which decides
from key structure first and real widths second (``lora_te1_``/``lora_te2_`` => SDXL, cross-attention
``to_k`` input width 768/1024/2048/1280 => SD1/SD2/SDXL/refiner).  DiT LoRAs (Flux, SD3, Qwen-Image) are
recognised by ``dit_keymap.dit_lora_arch``; their BFL/SAI-named layers are converted to diffusers names
(fused qkv / linear1 split by rows) right here, so the patcher only ever sees diffusers modules.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from webui.models import detect
from webui.models.lora.dit_keymap import convert_dit_patches, dit_lora_arch
from webui.models.lora.formats import LayerPatch, LoraFormatError, parse_state_dict
from webui.types import Arch, ModelKind

__all__ = ["LoadedLora", "load_lora", "lora_from_state_dict", "trigger_words"]

PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


@dataclass(frozen=True, eq=False)
class LoadedLora:
    """A parsed LoRA, ready for ``LoraPatcher``.  Tensors stay on the CPU in the file's dtype."""

    name: str
    patches: Mapping[str, LayerPatch]
    arch: Arch = Arch.UNKNOWN
    format: str = "lora"
    path: Path | None = None
    sha256: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    trigger_words: tuple[str, ...] = ()
    ignored_keys: tuple[str, ...] = ()  # keys of no known adapter format
    unsupported: tuple[str, ...] = ()  # adapters recognised but not supported (OFT, IA3, ...)
    warnings: tuple[str, ...] = ()

    @property
    def identity(self) -> str:
        """What identifies this LoRA's content: its sha256, else its path, else its name."""
        return self.sha256 or (str(self.path) if self.path is not None else self.name)

    @property
    def label(self) -> str:
        """How messages name it: the file name when there is one."""
        return self.path.name if self.path is not None else self.name

    @property
    def nbytes(self) -> int:  # split fused layers share tensors (and views of them): count each storage once
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for p in self.patches.values() for t in p.tensors().values()}
        return sum(storages.values())


def trigger_words(metadata: Mapping[str, str], limit: int = 10) -> tuple[str, ...]:
    """``modelspec.trigger_phrase`` (comma-separated) first, then the most frequent training tags from
    kohya's ``ss_tag_frequency`` (``{dataset: {tag: count}}``), most frequent first, at most ``limit``."""
    words: list[str] = []
    phrase = metadata.get("modelspec.trigger_phrase") or ""
    words.extend(w.strip() for w in phrase.split(",") if w.strip())
    raw = metadata.get("ss_tag_frequency")
    if raw:
        counts: Counter[str] = Counter()
        try:
            datasets = json.loads(raw)
        except ValueError:
            datasets = {}
        for tags in datasets.values() if isinstance(datasets, dict) else ():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)) and str(tag).strip():
                        counts[str(tag).strip()] += int(n)
        for tag, _n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if tag not in words:
                words.append(tag)
    return tuple(words[:limit])


def _arch_from_tensors(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[Arch, list[str]]:
    """Run the shared header detector over the tensors' keys and shapes (the DiT family check first)."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    dit = dit_lora_arch(shapes, metadata)
    if dit is not None:
        return dit, []
    header = detect.SafetensorsHeader.from_shapes(shapes, metadata=metadata)
    try:
        found = detect.detect(header)
    except detect.BrokenModelFile as exc:
        raise LoraFormatError(exc.reason) from None
    warnings = list(found.details.get("warnings", ()))
    if found.kind is not ModelKind.LORA:
        return Arch.UNKNOWN, warnings
    if found.details.get("unsupported"):
        raise LoraFormatError(found.details["unsupported"])
    return found.arch, warnings


def lora_from_state_dict(state_dict: Mapping[str, torch.Tensor], *, name: str,
                         metadata: Mapping[str, str] | None = None, path: Path | None = None,
                         sha256: str | None = None) -> LoadedLora:
    """Parse an in-memory LoRA state dict (what ``load_lora`` does after reading the file)."""
    metadata = dict(metadata or {})
    label = path.name if path is not None else name
    try:
        parsed = parse_state_dict(state_dict, metadata)
        if not parsed.patches:
            detail = f"; unsupported adapters: {', '.join(parsed.unsupported[:3])}" if parsed.unsupported else ""
            raise LoraFormatError(f"no LoRA/LoCon/LoHa/LoKr/DoRA layers found ({len(state_dict)} keys){detail}")
        arch, warnings = _arch_from_tensors(state_dict, metadata)
        patches, converted = convert_dit_patches(parsed.patches, arch)
        warnings.extend(converted)
    except LoraFormatError as exc:
        raise LoraFormatError(f"LoRA {label}: {exc}") from None
    if parsed.unsupported:
        warnings.append(f"{len(parsed.unsupported)} layers use unsupported adapters and are skipped: "
                        f"{', '.join(parsed.unsupported[:5])}")
    return LoadedLora(name=name, patches=patches, arch=arch, format=parsed.format, path=path, sha256=sha256,
                      metadata=metadata, trigger_words=trigger_words(metadata), ignored_keys=parsed.ignored,
                      unsupported=parsed.unsupported, warnings=tuple(warnings))


def load_lora(path: str | Path, *, name: str | None = None, sha256: str | None = None,
              allow_pickle: bool = False) -> LoadedLora:
    """Read and parse a LoRA file (tensors on the CPU).  ``sha256`` is the catalog's hash, if known."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise LoraFormatError(f"LoRA {path}: file does not exist")
    metadata: dict[str, str] = {}
    if suffix in detect.SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise LoraFormatError(f"LoRA {path}: cannot be read as safetensors ({exc}); re-download it") from None
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraFormatError(f"LoRA {path}: pickled {suffix} files are not loaded (they can run code); "
                                  f"convert it to .safetensors or enable pickled LoRAs in the settings")
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state_dict, dict):
            raise LoraFormatError(f"LoRA {path}: does not contain a state dict")
        state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    else:
        raise LoraFormatError(f"LoRA {path}: unsupported file type {suffix or '(none)'}; use .safetensors")
    return lora_from_state_dict(state_dict, name=name or path.stem, metadata=metadata, path=path, sha256=sha256)
