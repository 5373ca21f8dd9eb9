"""Offline loading of DiT models: diffusers folders, single transformer files and the split layout parts.

* ``load_dit_folder``: a diffusers folder (Flux / Kontext / SD3 / Qwen-Image / -Edit): each component from its
  own subfolder, local files only, safetensors unless ``allow_pickle``, complete weights (the loading report is
  checked: ``from_pretrained`` silently initialises missing weights at random).
* ``load_transformer_file``: a Flux (BFL or diffusers layout) or SD3 (Stability or diffusers layout) file;
  configs derived from shapes (``configs``), keys converted by our own tables (``convert``), strict loading.
  SD3 files may also carry ``text_encoders.*`` and ``first_stage_model.*``: asked-for parts come back too.
* ``load_text_encoder_file`` / ``load_vae_file``: split CLIP-L / CLIP-G / T5 files and 16-channel VAEs.
* ``clip_tokenizer`` (bundled vocab) and ``t5_tokenizer`` (a folder the user provides).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from webui import configs as sd_configs
from webui.models.dit import configs, convert
from webui.models.dit.components import DitComponents, DitLoadError
from webui.models.dit.detect import DIT_PIPELINES, EMBEDDED_TEXT_ENCODERS, VAE_PREFIXES
from webui.models.gguf_header import GGUF_SUFFIXES
from webui.types import Arch, Variant

StateDict = dict[str, torch.Tensor]
_MODEL_LIBRARIES = ("diffusers", "transformers")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
# text encoder role -> (transformers class, needs text_projection)
TEXT_ENCODER_CLASSES = {"clip_l": ("CLIPTextModel", False), "clip_l_proj": ("CLIPTextModelWithProjection", True),
                        "clip_g": ("CLIPTextModelWithProjection", True), "t5xxl": ("T5EncoderModel", False)}


def _strict(factory: Any, weights: StateDict, component: str, path: Path) -> torch.nn.Module:
    from webui.models.ldm_convert import ConversionError as LdmConversionError
    from webui.models.loaders import instantiate

    try:
        return instantiate(factory, weights, component)
    except (LdmConversionError, convert.ConversionError) as exc:
        raise DitLoadError(path, f"{exc}: the file is incomplete or not a {component} file") from None


def _read(path: Path, dtype: torch.dtype) -> StateDict:
    from webui.models.loaders import ModelLoadError, read_state_dict

    try:
        return read_state_dict(path, dtype=dtype)
    except ModelLoadError as exc:
        raise DitLoadError(path, exc.reason) from None


def _take(state: StateDict, prefix: str) -> StateDict:
    keys = [k for k in state if k.startswith(prefix)]
    return {k[len(prefix):]: state.pop(k) for k in keys}


# ---------------------------------------------------------------------------------------------- transformer
def _shapes(state: StateDict) -> dict[str, tuple[int, ...]]:
    """Logical shapes: a GGUF-quantized tensor's ``quant_shape``, not the shape of its bytes."""
    return {k: tuple(getattr(v, "quant_shape", v.shape)) for k, v in state.items()}


# family -> (single-file layout -> diffusers keys, its inverse, config from single-file-layout shapes);
# the family is the detection's config_key where it has its own table (Chroma), else the Arch
TRANSFORMER_TABLES: Mapping[Any, tuple[Any, Any, Any]] = MappingProxyType({
    "chroma": (convert.chroma_to_diffusers, convert.chroma_from_diffusers, configs.chroma_config),
    Arch.FLUX: (convert.flux_to_diffusers, convert.flux_from_diffusers, configs.flux_config),
    Arch.SD3: (convert.sd3_to_diffusers, convert.sd3_from_diffusers, configs.sd3_config),
})


def _transformer(sd: StateDict, arch: Arch, fmt: str, path: Path, config_key: str = "",
                 dtype: torch.dtype | None = None) -> torch.nn.Module:
    import diffusers

    table = TRANSFORMER_TABLES.get(config_key) or TRANSFORMER_TABLES.get(arch)
    if table is None:
        raise DitLoadError(path, f"single {arch.value} transformer files cannot be loaded yet: use its "
                                 "diffusers folder in models/Stable-diffusion")
    to_diffusers, from_diffusers, make_config = table
    try:
        original = from_diffusers(sd) if fmt == "diffusers" else sd
        weights = sd if fmt == "diffusers" else to_diffusers(sd)
        config = make_config(_shapes(original))
    except convert.ConversionError as exc:
        raise DitLoadError(path, f"{exc}: the file is incomplete or not a {arch.value} transformer") from None
    cls = getattr(diffusers, config.pop("_class_name"))
    if path.suffix.lower() in GGUF_SUFFIXES:  # quantized layers stay quantized
        from webui.models.dit.gguf_loader import build_quantized

        return build_quantized(cls, config, weights, dtype=dtype or torch.float32, path=path,
                               component=f"{arch.value} transformer")
    return _strict(lambda: cls.from_config(config), weights, f"{arch.value} transformer", path)


def load_transformer_file(path: str | Path, *, arch: Arch, details: Mapping[str, Any], dtype: torch.dtype,
                          family: str = "", want: tuple[str, ...] = ()) -> dict[str, torch.nn.Module]:
    """``{"transformer": ..., <part>: ...}`` for the parts of ``want`` (clip_l, clip_g, t5xxl, vae) the file
    carries (SD3 single files); ``details`` is the detection's (``format``, ``prefix``)."""
    path = Path(path)
    if path.suffix.lower() in GGUF_SUFFIXES:  # city96/ComfyUI-GGUF transformer (webui.models.dit.gguf_loader)
        from webui.models.dit.gguf_loader import read_gguf_state

        state = read_gguf_state(path)
    else:
        state = _read(path, dtype)
    out: dict[str, torch.nn.Module] = {}
    for part in want:
        if part == "vae":
            prefix = next((p for p in VAE_PREFIXES[1:] if any(k.startswith(p + "decoder.") for k in state)), None)
            if prefix is not None:
                out["vae"] = _vae(_take(state, prefix), family or arch.value, path)
        elif part in EMBEDDED_TEXT_ENCODERS:
            sd = _take(state, EMBEDDED_TEXT_ENCODERS[part])
            if sd:
                role = "clip_l_proj" if part == "clip_l" and arch is Arch.SD3 else part
                out[part] = _text_encoder(sd, role, path)
    prefix = str(details.get("prefix", ""))
    sd = _take(state, prefix) if prefix else state
    for leftover in ("text_encoders.", "first_stage_model.", "vae."):  # parts not asked for
        _take(sd, leftover)
    out["transformer"] = _transformer(sd, arch, str(details.get("format", "")), path,
                                      str(details.get("config_key", "")), dtype)
    return out


# ---------------------------------------------------------------------------------------------- parts
def _text_encoder(sd: StateDict, role: str, path: Path) -> torch.nn.Module:
    import transformers

    class_name, projection = TEXT_ENCODER_CLASSES[role]
    if class_name.startswith("CLIP"):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        sd.pop("embeddings.position_ids", None)
        if not projection:
            sd.pop("text_projection.weight", None)
        elif "text_projection.weight" not in sd:
            raise DitLoadError(path, "this CLIP text encoder has no text_projection.weight, which SD3 needs: use the "
                                     "clip_l.safetensors / clip_g.safetensors made for SD3")
        try:
            config = transformers.CLIPTextConfig(**configs.clip_config({k: v.shape for k, v in sd.items()}))
        except convert.ConversionError as exc:
            raise DitLoadError(path, str(exc)) from None
        if projection:  # transformers 5: CLIPTextModelWithProjection keeps the text_model. prefix, CLIPTextModel not
            sd = {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "lm_head"))}
        if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
            sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
        sd.setdefault("encoder.embed_tokens.weight", sd.get("shared.weight"))
        try:
            config = transformers.T5Config(**configs.t5_config({k: v.shape for k, v in sd.items() if v is not None}))
        except convert.ConversionError as exc:
            raise DitLoadError(path, str(exc)) from None
    cls = getattr(transformers, class_name)
    return _strict(lambda: cls(config), sd, f"{role} text encoder", path)


def _vae(sd: StateDict, family: str, path: Path) -> torch.nn.Module:
    from webui.models.loaders import vae_from_ldm

    from webui.models.ldm_convert import ConversionError as LdmConversionError

    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    try:
        return vae_from_ldm(sd, configs.vae_base("flux" if family.lower().startswith("flux") else "sd3"))
    except (LdmConversionError, KeyError) as exc:
        raise DitLoadError(path, f"not a usable 16-channel VAE ({exc})") from None


def load_text_encoder_file(path: str | Path, role: str, *, dtype: torch.dtype) -> torch.nn.Module:
    """A split text encoder file (HF transformers key names); ``role`` in ``TEXT_ENCODER_CLASSES``."""
    path = Path(path)
    return _text_encoder(_read(path, dtype), role, path)


def load_vae_file(path: str | Path, family: str, *, dtype: torch.dtype) -> torch.nn.Module:
    """A 16-channel VAE file (ldm or diffusers layout) with the latent statistics of ``family`` (flux / sd3)."""
    path = Path(path)
    state = _read(path, dtype)
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p + "decoder.") for k in state)), None)
    if prefix is None:
        raise DitLoadError(path, "no VAE weights (decoder.*) in this file")
    return _vae(_take(state, prefix), family, path)


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(sd_configs.TOKENIZER_DIR / "vocab.json"), str(sd_configs.TOKENIZER_DIR / "merges.txt"),
                         model_max_length=77, pad_token=pad_token)


def is_tokenizer_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def t5_tokenizer(folder: str | Path) -> Any:
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise DitLoadError(folder, f"cannot read the T5 tokenizer ({str(exc).splitlines()[0]}): copy tokenizer_2/ "
                                   "of the FLUX.1-dev repository here (tokenizer.json or spiece.model, "
                                   "tokenizer_config.json)") from None
    tokenizer.model_max_length = 512  # Flux's T5 length; SD3 passes its own max_length
    return tokenizer


# ---------------------------------------------------------------------------------------------- folders
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DitLoadError(path.parent, f"{path.name} is missing: incomplete diffusers folder") from None
    except (OSError, ValueError) as exc:
        raise DitLoadError(path, f"not valid JSON ({exc})") from None


def _check_report(folder: Path, info: Mapping[str, Any]) -> None:
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.endswith("position_ids"))
    problems = [f"{len(items)} {label} (e.g. {', '.join(map(str, items[:4]))})"
                for label, items in (("missing", missing), ("wrong shape", mismatched), ("unexpected", unexpected))
                if items]
    if problems:
        raise DitLoadError(folder, "weights do not match the config: " + "; ".join(problems))


def _load_component(folder: Path, library: str, class_name: str, dtype: torch.dtype, allow_pickle: bool) -> Any:
    import importlib

    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise DitLoadError(folder, f"unknown component class {library}.{class_name}") from None
    if folder.name.startswith(("tokenizer", "processor")) or class_name.endswith(("Tokenizer", "Processor")):
        try:
            return cls.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise DitLoadError(folder, f"cannot load the {class_name}: {str(exc).splitlines()[0]}") from None
    if not (folder / "config.json").is_file():
        raise DitLoadError(folder, "missing (no config.json): the diffusers folder is incomplete")
    dtype_arg = {"torch_dtype": dtype} if library == "diffusers" else {"dtype": dtype}
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=not allow_pickle,
                                          output_loading_info=True, **dtype_arg)
    except (OSError, ValueError, RuntimeError) as exc:
        hint = "" if allow_pickle else " (only .safetensors weights are read; --allow-pickle allows .bin)"
        raise DitLoadError(folder, f"cannot load {class_name}: {str(exc).splitlines()[0]}{hint}") from None
    _check_report(folder, info)
    return model.eval().requires_grad_(False)


def load_dit_folder(path: str | Path, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                    family: str = "") -> DitComponents:
    path = Path(path)
    index = _read_json(path / "model_index.json")
    name = str(index.get("_class_name", ""))
    if name not in DIT_PIPELINES:
        raise DitLoadError(path, f"diffusers pipeline {name or '(none)'} is not a supported DiT pipeline")
    arch, variant, default_family = DIT_PIPELINES[name]
    loaded: dict[str, Any] = {}
    scheduler_config: dict[str, Any] | None = None
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        if component == "scheduler":
            scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
            scheduler_config.setdefault("_class_name", spec[1])
            continue
        library = spec[0] if spec[0] in _MODEL_LIBRARIES else "transformers"
        loaded[component] = _load_component(path / component, library, spec[1], dtype, allow_pickle)
    if "transformer" not in loaded:
        raise DitLoadError(path, "model_index.json lists no transformer: incomplete diffusers folder")
    known = {f for f in DitComponents.__dataclass_fields__} - {"vae"}
    return DitComponents(
        **{k: v for k, v in loaded.items() if k in known},
        vae=loaded.get("vae"), scheduler_config=scheduler_config or dict(configs.SCHEDULERS["sd3"]),
        pipeline_class=_base_pipeline(name), arch=arch, variant=variant, config_key="diffusers", source=path,
        family=family or default_family, parts={k: str(path / k) for k in loaded},
    )


def _base_pipeline(name: str) -> str:
    """The txt2img (or edit) class of a folder saved from an img2img view."""
    return {"FluxImg2ImgPipeline": "FluxPipeline", "StableDiffusion3Img2ImgPipeline": "StableDiffusion3Pipeline",
            "ChromaImg2ImgPipeline": "ChromaPipeline"}.get(name, name)


PIPELINE_FOR = {(Arch.FLUX, Variant.NORMAL): "FluxPipeline", (Arch.FLUX, Variant.EDIT): "FluxKontextPipeline",
                (Arch.FLUX, Variant.INPAINT): "FluxFillPipeline", (Arch.SD3, Variant.NORMAL): "StableDiffusion3Pipeline"}
