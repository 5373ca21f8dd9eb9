"""Load a diffusers model folder (``model_index.json`` + component subfolders) as ``CheckpointComponents``.

The folder carries its own configs, so nothing is derived here; we only insist on local files, on
safetensors (unless ``allow_pickle``), and on complete weights: ``from_pretrained`` of both diffusers and
transformers silently initialises missing weights at random, so the loading report is checked.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from webui import configs
from webui.types import Arch, Prediction, Variant

# Tensors old transformers saved that are buffers now; their presence is harmless.
_HARMLESS_UNEXPECTED = ("position_ids",)


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _weights_variant(folder: Path) -> str | None:
    """``"fp16"`` when a component folder only ships ``*.fp16.safetensors`` weights."""
    names = [p.name for p in folder.glob("*.safetensors")] + [p.name for p in folder.glob("*.safetensors.index.json")]
    if names and all(".fp16." in n for n in names):
        return "fp16"
    return None


def _check_report(path: Path, component: str, info: dict[str, Any]) -> None:
    from webui.models.loaders import ModelLoadError

    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.endswith(_HARMLESS_UNEXPECTED))
    problems = [f"{len(items)} {label} (e.g. {', '.join(map(str, items[:4]))})"
                for label, items in (("missing", missing), ("wrong shape", mismatched), ("unexpected", unexpected))
                if items]
    if problems:
        raise ModelLoadError(path / component, "weights do not match the config: " + "; ".join(problems))


def _load(cls: Any, path: Path, component: str, dtype: torch.dtype, allow_pickle: bool) -> Any:
    from webui.models.loaders import ModelLoadError

    folder = path / component
    if not (folder / "config.json").is_file():
        raise ModelLoadError(folder, "missing (no config.json); the diffusers folder is incomplete")
    try:
        model, info = cls.from_pretrained(
            str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=not allow_pickle,
            variant=_weights_variant(folder), output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        hint = "" if allow_pickle else " (only .safetensors weights are read; --allow-pickle allows .bin)"
        raise ModelLoadError(folder, f"cannot load {component}: {str(exc).splitlines()[0]}{hint}") from None
    _check_report(path, component, info)
    return model.eval().requires_grad_(False)


def _text_encoder_class(path: Path, component: str) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    architectures = _read_json(path / component / "config.json").get("architectures") or ["CLIPTextModel"]
    return CLIPTextModelWithProjection if "WithProjection" in architectures[0] else CLIPTextModel


def _arch_from_folder(path: Path, components: set[str]) -> Arch:
    """The folder's own model_index/configs say what it is (no guessing from names)."""
    if "text_encoder_2" in components:
        return Arch.SDXL if "text_encoder" in components else Arch.SDXL_REFINER
    width = _read_json(path / "unet" / "config.json").get("cross_attention_dim")
    return Arch.SD2 if width == 1024 else Arch.SD1


def load_diffusers_folder(
    path: str | Path,
    *,
    arch: Arch | None = None,
    variant: Variant | None = None,
    prediction: Prediction | None = None,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> Any:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from webui.models.loaders import CheckpointComponents, ModelLoadError

    path = Path(path)
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(path, "is a folder without model_index.json, so it is not a diffusers model folder")
    index = _read_json(index_path)
    present = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None and (path / k).is_dir()}
    arch = Arch(arch) if arch not in (None, Arch.UNKNOWN) else _arch_from_folder(path, present)
    unet = _load(UNet2DConditionModel, path, "unet", dtype, allow_pickle)
    if variant is None:
        variant = Variant.INPAINT if unet.config.in_channels == 9 else Variant.NORMAL
    variant = Variant(variant)
    try:
        key = configs.config_key(arch, variant, prediction)
    except KeyError as exc:
        raise ModelLoadError(path, exc.args[0]) from None
    loaded: dict[str, Any] = {}
    for name in ("text_encoder", "text_encoder_2"):
        if name in present:
            loaded[name] = _load(_text_encoder_class(path, name), path, name, dtype, allow_pickle)
            tokenizer = path / name.replace("text_encoder", "tokenizer")
            tok_name = tokenizer.name
            has_vocab = (tokenizer / "vocab.json").is_file() or (tokenizer / "tokenizer.json").is_file()
            loaded[tok_name] = (CLIPTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
                                if has_vocab else configs.make_tokenizer(key, tok_name))
    scheduler_path = path / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(scheduler_path) if scheduler_path.is_file() else configs.load_config(key, "scheduler")
    if prediction is not None:
        scheduler_config["prediction_type"] = Prediction(prediction).value
    return CheckpointComponents(
        unet=unet,
        vae=_load(AutoencoderKL, path, "vae", dtype, allow_pickle) if "vae" in present else None,
        text_encoder=loaded.get("text_encoder"),
        tokenizer=loaded.get("tokenizer"),
        text_encoder_2=loaded.get("text_encoder_2"),
        tokenizer_2=loaded.get("tokenizer_2"),
        scheduler_config=scheduler_config,
        arch=arch,
        variant=variant,
        prediction=Prediction(scheduler_config.get("prediction_type", "epsilon")),
        zero_terminal_snr=bool(scheduler_config.get("rescale_betas_zero_snr", False)),
        config_key=key,
        source=path,
    )
