"""Bundled diffusers configs for the architectures we load offline, plus the shared CLIP BPE tokenizer.

Layout: ``configs/<key>/{model_index.json, unet/config.json, vae/config.json, text_encoder*/config.json,
scheduler/scheduler_config.json, tokenizer*/tokenizer_config.json}``; the BPE vocabulary lives once in
``configs/tokenizer/{vocab.json, merges.txt}`` and each ``tokenizer*/tokenizer_config.json`` only says how
to set it up (pad token, max length).  The values are the public releases' own configs (runwayml SD 1.5,
stabilityai SD 2.1 / 2.1-base, SDXL base/refiner 1.0, diffusers' SDXL inpainting 0.1).

The loader takes from here only what tensor shapes cannot reveal (head counts, activations, scheduler
settings); widths and layer counts always come from the checkpoint itself.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from webui.types import Arch, Prediction, Variant

CONFIG_ROOT = Path(__file__).resolve().parent
TOKENIZER_DIR = CONFIG_ROOT / "tokenizer"

SD15 = "sd15"
SD15_INPAINT = "sd15_inpaint"
SD2 = "sd2"
SD2_V = "sd2_v"
SDXL_BASE = "sdxl_base"
SDXL_INPAINT = "sdxl_inpaint"
SDXL_REFINER = "sdxl_refiner"
CONFIG_KEYS = (SD15, SD15_INPAINT, SD2, SD2_V, SDXL_BASE, SDXL_INPAINT, SDXL_REFINER)

# (arch, variant) -> config folder; SD2 picks its folder by prediction type below.  Variants that only
# change the UNet's input channels (inpaint on SD2, instruct-pix2pix) reuse the base folder: the loader
# reads in_channels from the weights anyway.
_KEY_BY_ARCH_VARIANT = {
    (Arch.SD1, Variant.NORMAL): SD15,
    (Arch.SD1, Variant.INPAINT): SD15_INPAINT,
    (Arch.SD1, Variant.INSTRUCT_PIX2PIX): SD15,
    (Arch.SD2, Variant.NORMAL): SD2,
    (Arch.SD2, Variant.INPAINT): SD2,
    (Arch.SDXL, Variant.NORMAL): SDXL_BASE,
    (Arch.SDXL, Variant.INPAINT): SDXL_INPAINT,
    (Arch.SDXL_REFINER, Variant.NORMAL): SDXL_REFINER,
}


def config_key(arch: Arch, variant: Variant = Variant.NORMAL, prediction: Prediction | None = None) -> str:
    """The bundled config folder for an architecture; raises ``KeyError`` with the supported list."""
    arch, variant = Arch(arch), Variant(variant)
    if arch is Arch.SD2 and variant is Variant.NORMAL and prediction is not None:
        return SD2_V if Prediction(prediction) is Prediction.V_PREDICTION else SD2
    try:
        return _KEY_BY_ARCH_VARIANT[(arch, variant)]
    except KeyError:
        supported = ", ".join(f"{a.value}/{v.value}" for a, v in _KEY_BY_ARCH_VARIANT)
        raise KeyError(f"no bundled config for {arch.value}/{variant.value} (supported: {supported})") from None


def config_dir(key: str) -> Path:
    if key not in CONFIG_KEYS:
        raise KeyError(f"unknown bundled config {key!r}; known: {', '.join(CONFIG_KEYS)}")
    return CONFIG_ROOT / key


def components(key: str) -> tuple[str, ...]:
    """Names of the pipeline components this config folder has (e.g. no text_encoder for the refiner)."""
    index = load_json(config_dir(key) / "model_index.json")
    return tuple(name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
                 and value[0] is not None)


def load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_config(key: str, component: str) -> dict[str, Any]:
    """A fresh copy of one component's config (``unet``, ``vae``, ``text_encoder``, ``scheduler``, ...)."""
    folder = config_dir(key)
    if component == "model_index":
        return load_json(folder / "model_index.json")
    name = {"scheduler": "scheduler_config.json"}.get(component)
    if name is None:
        name = "tokenizer_config.json" if component.startswith("tokenizer") else "config.json"
    path = folder / component / name
    if not path.is_file():
        raise KeyError(f"bundled config {key!r} has no {component!r} (looked for {path})")
    return load_json(path)


def make_tokenizer(key: str, component: str = "tokenizer") -> Any:
    """A ``CLIPTokenizer`` built from the shared vocab with this architecture's settings (pad token...)."""
    from transformers import CLIPTokenizer

    settings = load_config(key, component)
    settings.pop("tokenizer_class", None)
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), **settings)


def export_diffusers_config_dir(key: str, dest: Path) -> Path:
    """Write a complete diffusers config folder (with the vocab copied into each tokenizer folder).

    Only for tools that want a ``from_single_file(config=...)``-style folder; our loader does not need it.
    """
    dest = Path(dest)
    shutil.copytree(config_dir(key), dest, dirs_exist_ok=True)
    for component in components(key):
        if component.startswith("tokenizer"):
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(TOKENIZER_DIR / name, dest / component / name)
    return dest
