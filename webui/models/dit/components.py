"""``DitComponents``: the loaded parts of one DiT model, and the diffusers pipeline built over them.

Shared read-only by every pipeline view (``from_pipe``); the model manager's RAM cache counts every
``nn.Module`` field.  ``build_dit_pipeline`` fills the pipeline class's constructor from the fields of the same
name (``transformer``, ``text_encoder_2``, ``processor``...), a fresh scheduler and the chosen VAE.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from webui.types import Arch, Prediction, Variant


class DitLoadError(Exception):
    """A DiT model or one of its parts cannot be loaded; ``str()`` names the file/folder and what to do."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True, kw_only=True)
class DitComponents:
    transformer: Any
    vae: Any | None
    text_encoder: Any | None = None
    tokenizer: Any | None = None
    text_encoder_2: Any | None = None
    tokenizer_2: Any | None = None
    text_encoder_3: Any | None = None
    tokenizer_3: Any | None = None
    processor: Any | None = None  # Qwen-Image-Edit: the Qwen2-VL processor
    scheduler_config: dict[str, Any]
    pipeline_class: str  # diffusers class name: FluxPipeline, StableDiffusion3Pipeline, ...
    arch: Arch
    variant: Variant = Variant.NORMAL
    prediction: Prediction | None = None  # flow matching: no epsilon / v choice
    zero_terminal_snr: bool = False
    config_key: str = ""  # flux-dev | flux-schnell | sd3 | qwen-image | diffusers
    source: Path | None = None
    family: str = ""
    parts: Mapping[str, str] = field(default_factory=dict)  # role -> file it was loaded from


def make_scheduler(scheduler_config: Mapping[str, Any]) -> Any:
    import diffusers

    return getattr(diffusers, scheduler_config["_class_name"]).from_config(dict(scheduler_config))


def build_dit_pipeline(components: DitComponents, *, vae: Any | None = None) -> Any:
    """A ready diffusers pipeline; ``vae`` replaces the model's own (the user's VAE choice)."""
    import diffusers

    where = components.source or Path(components.config_key or "model")
    vae = vae if vae is not None else components.vae
    if vae is None:
        raise DitLoadError(where, "no VAE: put the 16-channel VAE of this family (Flux: ae.safetensors, SD3: "
                                  "its VAE) in models/VAE and select it")
    cls = getattr(diffusers, components.pipeline_class)
    kwargs: dict[str, Any] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if name == "scheduler":
            kwargs[name] = make_scheduler(components.scheduler_config)
        elif name == "vae":
            kwargs[name] = vae
        elif hasattr(components, name):
            kwargs[name] = getattr(components, name)
        elif param.default is inspect.Parameter.empty:
            kwargs[name] = None  # image_encoder / feature_extractor: not used here
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
