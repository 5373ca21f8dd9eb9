"""Diffusers pipelines over loaded ``CheckpointComponents``: which class for which (arch, variant).

Pipelines are cheap views over shared, cached components; each gets a fresh scheduler because schedulers
keep per-run state.  No safety checker, no feature extractor, progress bars off.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from webui import configs
from webui.models.loaders import CheckpointComponents, ModelLoadError
from webui.types import Arch, Variant

# (arch, variant) -> diffusers pipeline class name; the refiner only does img2img.
_PIPELINES: dict[tuple[Arch, Variant], str] = {
    (Arch.SD1, Variant.NORMAL): "StableDiffusionPipeline",
    (Arch.SD1, Variant.INPAINT): "StableDiffusionInpaintPipeline",
    (Arch.SD1, Variant.INSTRUCT_PIX2PIX): "StableDiffusionInstructPix2PixPipeline",
    (Arch.SD2, Variant.NORMAL): "StableDiffusionPipeline",
    (Arch.SD2, Variant.INPAINT): "StableDiffusionInpaintPipeline",
    (Arch.SDXL, Variant.NORMAL): "StableDiffusionXLPipeline",
    (Arch.SDXL, Variant.INPAINT): "StableDiffusionXLInpaintPipeline",
    (Arch.SDXL_REFINER, Variant.NORMAL): "StableDiffusionXLImg2ImgPipeline",
}


def make_scheduler(scheduler_config: dict[str, Any]) -> Any:
    """A fresh scheduler from a config dict (schedulers keep per-run state: never share one)."""
    import diffusers

    return getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)


def build_pipeline(components: CheckpointComponents, *, vae: Any | None = None) -> Any:
    """A ready diffusers pipeline; ``vae`` replaces the checkpoint's own VAE (the user's VAE choice)."""
    import diffusers

    where = components.source or Path(components.config_key or "checkpoint")
    name = _PIPELINES.get((components.arch, components.variant))
    if name is None:
        raise ModelLoadError(where, f"no pipeline for {components.arch.value}/{components.variant.value}")
    vae = vae if vae is not None else components.vae
    if vae is None:
        raise ModelLoadError(where, "the checkpoint has no built-in VAE (first_stage_model.*): select a VAE file")
    kwargs: dict[str, Any] = dict(unet=components.unet, vae=vae, scheduler=make_scheduler(components.scheduler_config),
                                  text_encoder=components.text_encoder, tokenizer=components.tokenizer)
    if components.arch in (Arch.SDXL, Arch.SDXL_REFINER):
        index = configs.load_config(components.config_key, "model_index")
        kwargs.update(text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2,
                      force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
        if "requires_aesthetics_score" in index:
            kwargs["requires_aesthetics_score"] = index["requires_aesthetics_score"]
    else:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, name)(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
