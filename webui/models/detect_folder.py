"""What a diffusers folder is, from ``model_index.json`` and its components' configs (no weights read).

``detect_diffusers_folder``: the pipeline class gives the architecture (``DIFFUSERS_PIPELINES``; DiT folders go
to ``webui.models.dit.detect.folder_facts``), ``unet/config.json`` the variant (in_channels) and the SD1/SD2
split (linear projection), the scheduler config the prediction type.  Incomplete copies raise
``BrokenModelFile`` naming the missing file.  ``webui.models.detect.detect_path`` calls it for folders.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

from webui.models.detect import BrokenModel, Detection, _confirm, _variant
from webui.models.dit.detect import DIT_PIPELINES
from webui.models.dit.detect import folder_facts as dit_folder_facts
from webui.models.header_facts import FAMILY_BY_ARCH, PREDICTION_WORDS
from webui.models.safetensors_header import BrokenModelFile
from webui.types import Arch, ModelKind, Variant

# diffusers pipeline class -> (arch if the class fixes it, variant if the class fixes it)
DIFFUSERS_PIPELINES = MappingProxyType({
    "StableDiffusionPipeline": (None, None), "StableDiffusionImg2ImgPipeline": (None, None),
    "StableDiffusionInpaintPipeline": (None, Variant.INPAINT),
    "StableDiffusionInstructPix2PixPipeline": (None, Variant.INSTRUCT_PIX2PIX),
    "StableDiffusionDepth2ImgPipeline": (Arch.SD2, Variant.DEPTH),
    "StableDiffusionXLPipeline": (Arch.SDXL, None), "StableDiffusionXLImg2ImgPipeline": (Arch.SDXL, None),
    "StableDiffusionXLInpaintPipeline": (Arch.SDXL, Variant.INPAINT),
    "StableDiffusionXLInstructPix2PixPipeline": (Arch.SDXL, Variant.INSTRUCT_PIX2PIX),
    # DiT families (Flux.1 / Kontext, SD3/3.5, Qwen-Image / -Edit): see webui.models.dit.detect.DIT_PIPELINES
    **{name: (arch, variant) for name, (arch, variant, _family) in DIT_PIPELINES.items()},
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
    if name in DIT_PIPELINES:
        try:
            dit = dit_folder_facts(folder, index)
        except ValueError as exc:
            raise BrokenModelFile(folder, str(exc)) from None
        return Detection(kind=dit.kind, arch=dit.arch, variant=dit.variant, family=dit.family,
                         details={**details, **dit.details})
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
