"""Tiny random-weight Stable Diffusion models, written in the real on-disk formats.

Used by ``launch.py --demo`` (noise-making demo models) and by the test fixtures.  Each model keeps its
architecture's key names, block structure, layer counts and head counts (from the bundled config in
``webui/configs``); only widths shrink, to multiples of 32 and of the head count.  Models are built with
``from_config`` under a fixed seed, every constant parameter (norm weights, biases) is perturbed so that a
wrong key mapping cannot go unnoticed, and weights are rounded to the file's dtype so a loaded model equals
``build_components()`` bit for bit.  Single files are written in ldm/A1111 layout by ``ldm_layout``.

Sizes (fp16 files): SD1.5 ~19 MB, SD2 ~105 MB, SDXL ~163 MB, SDXL refiner ~90 MB, VAE ~13 MB.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from webui import configs
from webui.models import ldm_layout as ldm

CLIP_L = {"hidden_size": 48, "intermediate_size": 192}  # 12 heads, 12 layers (bundled)
OPENCLIP_H = {"hidden_size": 64, "intermediate_size": 256}  # 16 heads, 23 (+1 unused) layers
OPENCLIP_BIGG = {"hidden_size": 80, "intermediate_size": 320, "projection_dim": 80}  # 20 heads, 32 layers
TINY_VAE = {"block_out_channels": [32, 64, 96, 96], "sample_size": 64}
XL_ADD_DIM = 256  # addition_time_embed_dim stays real: the pipeline sizes its time ids from it

# Per bundled config: overrides of widths only.  Shortcut pattern kept (level widths change where real ones do).
TINY: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {"unet": {"block_out_channels": [64, 32, 64, 64], "cross_attention_dim": 48, "sample_size": 8},
             "text_encoder": CLIP_L, "vae": TINY_VAE},
    "sd2": {"unet": {"block_out_channels": [160, 320, 160, 160], "cross_attention_dim": 64, "sample_size": 8},
            "text_encoder": OPENCLIP_H, "vae": TINY_VAE},
    "sdxl_base": {"unet": {"block_out_channels": [32, 320, 160], "cross_attention_dim": 128, "sample_size": 8,
                           "projection_class_embeddings_input_dim": 80 + 6 * XL_ADD_DIM},
                  "text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG, "vae": TINY_VAE},
    "sdxl_refiner": {"unet": {"block_out_channels": [64, 96, 192, 192], "cross_attention_dim": 80, "sample_size": 8,
                              "projection_class_embeddings_input_dim": 80 + 5 * XL_ADD_DIM},
                     "text_encoder_2": OPENCLIP_BIGG, "vae": TINY_VAE},
}
TINY["sd15_inpaint"] = TINY["sd15"]
TINY["sd2_v"] = TINY["sd2"]
TINY["sdxl_inpaint"] = TINY["sdxl_base"]

_TEXT_PREFIX = {  # (config key family, component) -> where ldm files keep it
    ("sd1", "text_encoder"): "cond_stage_model.transformer.",
    ("sd2", "text_encoder"): "cond_stage_model.model.",
    ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.",
    ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
    ("refiner", "text_encoder_2"): "conditioner.embedders.0.model.",
}


def _family(key: str) -> str:
    return {"sd15": "sd1", "sd15_inpaint": "sd1", "sd2": "sd2", "sd2_v": "sd2", "sdxl_refiner": "refiner"}.get(key, "sdxl")


def tiny_config(key: str, component: str, **overrides: Any) -> dict[str, Any]:
    """The bundled config of ``key`` with the tiny widths (and ``overrides``) applied."""
    config = configs.load_config(key, component)
    config.update(copy.deepcopy(TINY[key].get(component, {})))
    config.update(overrides)
    return config


def _finish(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Perturb constant parameters, round to the file dtype (values stay fp32), eval mode."""
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.05)
            param.copy_(param.to(dtype).float())
    return model.eval().requires_grad_(False)


def _text_model(config: dict[str, Any]) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if "WithProjection" in config["architectures"][0] else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def build_components(key: str, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.nn.Module]:
    """The diffusers/transformers models a tiny ``key`` checkpoint holds (what the loader must reproduce).

    Each component is seeded on its own (``seed``, ``seed + 1``...), so SD1 and its inpaint variant share
    text encoder and VAE.  SD2's text encoder is returned with the 23 layers diffusers uses.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out: dict[str, torch.nn.Module] = {}
    torch.manual_seed(seed)
    out["unet"] = _finish(UNet2DConditionModel.from_config(tiny_config(key, "unet")), dtype)
    for offset, name in enumerate(("text_encoder", "text_encoder_2"), start=1):
        if name in configs.components(key):
            torch.manual_seed(seed + offset)
            out[name] = _finish(_text_model(tiny_config(key, name)), dtype)
    torch.manual_seed(seed + 3)
    out["vae"] = _finish(AutoencoderKL.from_config(tiny_config(key, "vae")), dtype)
    return out


def _ddpm_buffers() -> dict[str, torch.Tensor]:
    """The schedule tensors SD1/SD2 ldm checkpoints carry (and loaders must ignore)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas[:-1]])
    variance = betas * (1 - prev) / (1 - alphas)
    buffers = {"betas": betas, "alphas_cumprod": alphas, "alphas_cumprod_prev": prev,
               "sqrt_alphas_cumprod": alphas.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas).sqrt(),
               "log_one_minus_alphas_cumprod": (1 - alphas).log(), "sqrt_recip_alphas_cumprod": alphas.rsqrt(),
               "sqrt_recipm1_alphas_cumprod": (1 / alphas - 1).sqrt(), "posterior_variance": variance,
               "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
               "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas),
               "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas)}
    return {k: v.float() for k, v in buffers.items()}


def ldm_checkpoint(key: str, models: dict[str, torch.nn.Module], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full single-file state dict in ldm/A1111 layout (fp32 values; cast when saving)."""
    family = _family(key)
    state = ldm.prefixed(ldm.unet_to_ldm(models["unet"].state_dict(), dict(models["unet"].config)),
                         "model.diffusion_model.")
    state.update(ldm.prefixed(ldm.vae_to_ldm(models["vae"].state_dict(), dict(models["vae"].config)),
                              "first_stage_model."))
    generator = torch.Generator().manual_seed(seed + 7)
    for name in ("text_encoder", "text_encoder_2"):
        if name not in models:
            continue
        prefix = _TEXT_PREFIX[(family, name)]
        weights = models[name].state_dict()
        if family == "sd2":  # OpenCLIP-H: 24 layers in the file (23 used), projection unused by SD2
            hidden = models[name].config.hidden_size
            extra = _text_model(tiny_config(key, name, num_hidden_layers=1))
            weights.update({k.replace("encoder.layers.0.", f"encoder.layers.{models[name].config.num_hidden_layers}."): v
                            for k, v in extra.state_dict().items() if k.startswith("encoder.layers.0.")})
            text = ldm.open_clip_to_ldm(weights, text_projection=torch.randn(hidden, hidden, generator=generator))
        elif prefix.endswith(".model."):
            text = ldm.open_clip_to_ldm(weights)
        else:
            text = ldm.clip_to_ldm(weights)
            text["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)  # real files carry it
        if prefix.endswith(".model."):
            text["logit_scale"] = torch.tensor(4.6052)
        state.update(ldm.prefixed(text, prefix))
    if family in ("sd1", "sd2"):
        state.update(_ddpm_buffers())
    if family == "sd1":  # the pruned SD1.5 release keeps the EMA bookkeeping scalars
        state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)})
    return state


def save_safetensors(state: dict[str, torch.Tensor], path: Path, *, dtype: torch.dtype = torch.float16,
                     metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``state`` (floating tensors cast to ``dtype``) as a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() and v.numel() else v).contiguous() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)
    return path


def _write(directory: Path, name: str, key: str, *, seed: int, dtype: torch.dtype,
           markers: tuple[str, ...] = ()) -> Path:
    models = build_components(key, seed=seed, dtype=dtype)
    state = ldm_checkpoint(key, models, seed=seed)
    for marker in markers:  # NoobAI-style empty marker tensors
        state[marker] = torch.tensor([])
    return save_safetensors(state, Path(directory) / name, dtype=dtype)


# ---------------------------------------------------------------------------------------------- public writers
def write_sd15_checkpoint(directory: Path, name: str | None = None, *, inpaint: bool = False,
                          seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """SD1.5 (``tiny_sd15.safetensors``) or its 9-channel inpainting variant (``tiny_sd15_inpaint...``)."""
    name = name or f"tiny_sd15{'_inpaint' if inpaint else ''}.safetensors"
    return _write(directory, name, "sd15_inpaint" if inpaint else "sd15", seed=seed, dtype=dtype)


def write_sd15_pix2pix_checkpoint(directory: Path, name: str = "tiny_sd15_pix2pix.safetensors", *, seed: int = 0,
                                  dtype: torch.dtype = torch.float16) -> Path:
    """An instruction-edit (instruct-pix2pix) SD1.5: the UNet takes 8 channels (latents + image latents)."""
    from diffusers import UNet2DConditionModel

    models = build_components("sd15", seed=seed, dtype=dtype)
    torch.manual_seed(seed)
    models["unet"] = _finish(UNet2DConditionModel.from_config(tiny_config("sd15", "unet", in_channels=8)), dtype)
    return save_safetensors(ldm_checkpoint("sd15", models, seed=seed), Path(directory) / name, dtype=dtype)


def write_sd2_checkpoint(directory: Path, name: str | None = None, *, v_pred: bool = True, v_pred_marker: bool = False,
                         seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """SD2.x 768-v (``v_pred``) or 512-base; like the real files, the weights do not say which unless
    ``v_pred_marker`` adds the NoobAI-style ``v_pred`` key."""
    name = name or ("tiny_sd2v.safetensors" if v_pred else "tiny_sd2.safetensors")
    markers = ("v_pred",) if v_pred and v_pred_marker else ()
    return _write(directory, name, "sd2_v" if v_pred else "sd2", seed=seed, dtype=dtype, markers=markers)


def write_sdxl_checkpoint(directory: Path, name: str | None = None, *, inpaint: bool = False, vpred: bool = False,
                          seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """SDXL base (or 9-channel inpaint); ``vpred`` adds NoobAI's ``v_pred`` + ``ztsnr`` marker tensors."""
    name = name or f"tiny_sdxl{'_inpaint' if inpaint else ''}{'_vpred' if vpred else ''}.safetensors"
    markers = ("v_pred", "ztsnr") if vpred else ()
    return _write(directory, name, "sdxl_inpaint" if inpaint else "sdxl_base", seed=seed, dtype=dtype,
                  markers=markers)


def write_sdxl_refiner_checkpoint(directory: Path, name: str = "tiny_sdxl_refiner.safetensors", *, seed: int = 0,
                                  dtype: torch.dtype = torch.float16) -> Path:
    return _write(directory, name, "sdxl_refiner", seed=seed, dtype=dtype)


def write_vae(directory: Path, name: str | None = None, *, arch: str = "sd1", layout: str = "ldm", seed: int = 10,
              dtype: torch.dtype = torch.float32) -> Path:
    """A standalone VAE file: ``layout="ldm"`` (``encoder.down.*``, like vae-ft-mse-840000) or
    ``"diffusers"`` (``encoder.down_blocks.*``).  ``arch`` ("sd1"/"sdxl") only picks the bundled base."""
    from diffusers import AutoencoderKL

    name = name or f"tiny_{'sdxl_' if arch == 'sdxl' else ''}vae{'' if layout == 'ldm' else '_diffusers'}.safetensors"
    torch.manual_seed(seed)
    vae = _finish(AutoencoderKL.from_config(tiny_config("sdxl_base" if arch == "sdxl" else "sd15", "vae")), dtype)
    state = vae.state_dict() if layout == "diffusers" else ldm.vae_to_ldm(vae.state_dict(), dict(vae.config))
    return save_safetensors(state, Path(directory) / name, dtype=dtype)


def build_vae(*, arch: str = "sd1", seed: int = 10, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model ``write_vae`` with the same arguments writes."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _finish(AutoencoderKL.from_config(tiny_config("sdxl_base" if arch == "sdxl" else "sd15", "vae")), dtype)
