"""T2I-Adapter units in txt2img: the adapter features of each unit's control map, added to the UNet's encoder.

A T2I-Adapter runs once per job on its control map and yields one feature map per UNet level (SDXL: plus the
middle block).  The UNet adds them inside its down blocks when called with ``down_intrablock_additional_residuals``
(what diffusers' ``StableDiffusion[XL]AdapterPipeline`` passes).  Those pipelines take no
``callback_on_step_end`` (so no progress, previews, Interrupt/Skip or prompt schedule) and the SD 1.x one has
no ``adapter_conditioning_factor``; so the ordinary txt2img pipeline runs over a view whose ``unet`` is an
``AdapterUNet``: the same UNet object, called with the features of the units active at the current step.

- weight: features x weight (diffusers' ``adapter_conditioning_scale``); several units are summed, unit by
  unit, as ``MultiAdapter`` sums them;
- guidance start/end: a unit is active at step i when ``start <= i/N`` and ``(i+1)/N <= end`` (the ControlNet
  rule; with start 0 it equals the SDXL pipeline's ``adapter_conditioning_factor = end``);
- control mode: only Balanced (the others are noted and run as Balanced);
- txt2img only: img2img/inpaint (and ControlNets in the same job) are refused with what to do instead; the
  hires-fix second pass runs without the adapters (noted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from webui.models.t2i_adapter import is_t2i_adapter
from webui.types import RequestError

BALANCED = "Balanced"


@dataclass(frozen=True)
class AdapterConditioning:
    """The T2I-Adapter units of a txt2img job (no ``controlnet``: the hires pass runs them not)."""

    adapters: tuple[Any, ...]  # T2IAdapter per unit
    images: tuple[Image.Image, ...]  # control map per unit, exactly width x height
    weights: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    maps: tuple[Image.Image, ...] = ()
    infotext: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    names: tuple[str, ...] = ()  # the units' model names, for messages


def adapter_input(image: Image.Image, in_channels: int) -> torch.Tensor:
    """A control map as diffusers' adapter pipelines feed it: (1, C, H, W) in [0, 1]; grey for 1 channel."""
    array = np.asarray(image.convert("L" if in_channels == 1 else "RGB"), dtype=np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array.transpose(2, 0, 1).copy())[None]


def unit_features(adapter: Any, image: Image.Image) -> list[torch.Tensor]:
    """The adapter's feature maps for one control map (batch 1)."""
    param = next(adapter.parameters())
    with torch.no_grad():
        return list(adapter(adapter_input(image, adapter.config.in_channels).to(param.device, param.dtype)))


def active_units(step: int, total: int, starts: Sequence[float], ends: Sequence[float]) -> tuple[bool, ...]:
    """Which units act at 0-based ``step`` of ``total`` (the ControlNet pipelines' guidance window rule)."""
    total = max(int(total), 1)
    return tuple(not (step / total < s or (step + 1) / total > e) for s, e in zip(starts, ends))


class AdapterUNet(torch.nn.Module):
    """The pipeline's UNet with adapter residuals: ``forward`` adds the weighted features of the active units
    (repeated to the batch) as ``down_intrablock_additional_residuals``; everything else is the wrapped UNet's
    (attributes are looked up on it)."""

    def __init__(self, unet: Any, features: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]):
        super().__init__()
        self.unet = unet
        self.unit_features = [list(f) for f in features]
        self.weights = tuple(float(w) for w in weights)
        self.active = tuple(True for _ in self.weights)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def residuals(self, batch: int, like: torch.Tensor) -> list[torch.Tensor] | None:
        total = None
        for on, weight, features in zip(self.active, self.weights, self.unit_features):
            if not on:
                continue
            scaled = [weight * f for f in features]
            total = scaled if total is None else [a + b for a, b in zip(total, scaled)]
        if total is None:
            return None
        return [t.to(device=like.device, dtype=like.dtype).repeat(batch, 1, 1, 1) for t in total]

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        residuals = self.residuals(sample.shape[0], sample)
        if residuals is not None:
            kwargs["down_intrablock_additional_residuals"] = residuals
        return self.unet(sample, timestep, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- units
def adapter_conditioning(models: Sequence[Any], images: Sequence[Image.Image], *, names: Sequence[str],
                         weights: Sequence[float], starts: Sequence[float], ends: Sequence[float],
                         modes: Sequence[str], maps: Sequence[Image.Image], infotext: dict[str, str],
                         img2img: bool) -> AdapterConditioning:
    """The job's units when at least one is a T2I-Adapter (``prepare_control``); RequestError when the job
    mixes them with ControlNets or is not txt2img."""
    adapters = [n for n, m in zip(names, models) if is_t2i_adapter(m)]
    others = [n for n, m in zip(names, models) if not is_t2i_adapter(m)]
    if others:
        raise RequestError(f"T2I-Adapter units ({', '.join(adapters)}) cannot be combined with ControlNet units "
                           f"({', '.join(others)}) in one job: use only T2I-Adapters or only ControlNets "
                           "(disable the other units)")
    if img2img:
        raise RequestError(f"T2I-Adapter units ({', '.join(adapters)}) work in txt2img only (diffusers has no "
                           "img2img/inpaint adapter pipeline): use a ControlNet of the same kind in img2img/inpaint, "
                           "or run the T2I-Adapter unit in txt2img")
    notes = [f"T2I-Adapter unit {name}: control mode {mode!r} is not available for T2I-Adapters; ran as Balanced"
             for name, mode in zip(names, modes) if mode != BALANCED]
    return AdapterConditioning(adapters=tuple(models), images=tuple(images), weights=tuple(map(float, weights)),
                               starts=tuple(map(float, starts)), ends=tuple(map(float, ends)), maps=tuple(maps),
                               infotext=dict(infotext), notes=tuple(notes), names=tuple(names))


def check_features(features: Sequence[Sequence[torch.Tensor]], names: Sequence[str]) -> None:
    """Units are summed level by level: their feature maps must have the same shapes."""
    shapes = [[tuple(t.shape) for t in f] for f in features]
    if any(s != shapes[0] for s in shapes):
        raise RequestError(f"T2I-Adapters {', '.join(names)} give feature maps of different sizes ({shapes}); "
                           "use adapters of one kind together")


def adapter_plan(model: Any, request: Any, cond: AdapterConditioning) -> Any:
    """The txt2img ``SamplingPlan`` with ``cond``'s adapters (see the module docstring)."""
    from webui.generation.pipeline_tasks import task_for, task_pipeline
    from webui.generation.runner import SamplingPlan

    if getattr(request, "ip_adapters", ()):
        raise RequestError("T2I-Adapter units cannot be combined with IP-Adapter reference images in one job yet: "
                           "disable the IP-Adapter unit or use a ControlNet")
    if task_for(model.components.variant, has_image=False, has_mask=False) != "txt2img":
        raise RequestError("T2I-Adapter units need a normal txt2img checkpoint; this is an inpaint checkpoint: "
                           "pick a non-inpaint checkpoint or use a ControlNet")
    base = task_pipeline(model, "txt2img")
    features = [unit_features(a, image) for a, image in zip(cond.adapters, cond.images)]
    check_features(features, cond.names)
    unet = AdapterUNet(base.unet, features, cond.weights)
    pipe = type(base).from_pipe(base, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    steps = request.steps

    def start_batch(_batch: int, _seeds: list[int], noise: torch.Tensor) -> dict[str, Any]:
        unet.active = active_units(0, steps, cond.starts, cond.ends)
        return {"latents": noise}

    def after_step(pipe_: Any, step: int, _tensors: dict[str, Any]) -> dict[str, Any]:
        timesteps = getattr(pipe_.scheduler, "timesteps", None)
        total = len(timesteps) if timesteps is not None and len(timesteps) else steps
        unet.active = active_units(step + 1, total, cond.starts, cond.ends)
        return {}

    return SamplingPlan(pipe=pipe, call_kwargs={"width": request.width, "height": request.height},
                        batch_kwargs=start_batch, on_step=after_step, infotext=dict(cond.infotext),
                        extra_images=tuple(cond.maps), control=cond)


def job_notes(cond: Any, request: Any) -> list[str]:
    """Notes for the user about the adapters of this job (control modes, hires fix)."""
    if not isinstance(cond, AdapterConditioning):
        return []
    notes = list(cond.notes)
    if getattr(request, "enable_hr", False):
        notes.append("hires fix: the second pass runs without the T2I-Adapter units (no img2img adapter pipeline)")
    return notes
