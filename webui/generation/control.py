"""ControlNet units -> what a diffusers ControlNet pipeline call needs (``prepare_control``).

Per enabled unit: its image (or the img2img input), the preprocessor at the processor resolution (or the
"pixel perfect" one), the map fitted to exactly ``width`` x ``height`` with the unit's resize mode, the
model from ``ControlNetLoader`` (arch-checked, cached), and sd-webui-controlnet's infotext entry.

Control modes, as sd-webui-controlnet defines them (``soft_injection`` / ``cfg_injection``):

- Balanced: residuals x weight, on both CFG branches.
- My prompt is more important: residuals additionally scaled per block from 0.825^12 (first block) up to 1
  (middle block), on both branches.
- ControlNet is more important: the same soft scales, and control on the conditional branch only.

diffusers' ``guess_mode`` is exactly the third mode (its ``logspace(-1, 0, n+1)`` scales equal 0.825^(n-i)
on SD1/SD2's 13 residuals), but it is pipeline-wide.  So when every unit is "ControlNet is more important"
we pass ``guess_mode=True``; when modes need per-unit soft scales, ``UnitControlNets`` (a
``MultiControlNetModel`` subclass) applies them per unit, and zeroes the unconditional half for
"ControlNet is more important" units when the caller says CFG is on (``do_cfg``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.models.controlnets.controlnet import ControlNetOutput
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

from webui.models.t2i_adapter import is_t2i_adapter
from webui.image_requests import CONTROL_MODES, RESIZE_AND_FILL, RESIZE_CROP_AND_RESIZE, RESIZE_JUST_RESIZE
from webui.types import Arch, RequestError

BALANCED, PROMPT_MORE, CONTROL_MORE = CONTROL_MODES
RESIZE_NAMES = {RESIZE_JUST_RESIZE: "Just Resize", RESIZE_CROP_AND_RESIZE: "Crop and Resize",
                RESIZE_AND_FILL: "Resize and Fill"}


@dataclass(frozen=True)
class ControlConditioning:
    """``pipe(image=images | control_image=images, **kwargs)`` on a pipeline built with ``controlnet``."""

    controlnet: Any  # ControlNetModel, MultiControlNetModel or UnitControlNets
    images: list[Image.Image]  # one control map per unit, exactly width x height
    kwargs: dict[str, Any]
    maps: tuple[Image.Image, ...] = ()  # the maps to show the user
    infotext: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- geometry
def pixel_perfect_resolution(image_size: tuple[int, int], width: int, height: int, resize_mode: int) -> int:
    """sd-webui-controlnet's pixel perfect: the processor resolution at which the map needs no resampling
    when fitted to ``width`` x ``height`` (scale to cover; to fit for Resize and Fill)."""
    raw_w, raw_h = image_size
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if resize_mode == RESIZE_AND_FILL else max(k_h, k_w)
    return int(round(k * min(raw_w, raw_h)))


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if (array.shape[1], array.shape[0]) == (width, height):
        return array
    shrink = width * height < array.shape[0] * array.shape[1]
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def fit_map(image: Image.Image, width: int, height: int, resize_mode: int) -> Image.Image:
    """A control map fitted to exactly ``width`` x ``height``: stretched (Just Resize), scaled to cover and
    centre-cropped (Crop and Resize) or scaled to fit and padded with the median border colour (Resize and
    Fill), as sd-webui-controlnet does."""
    array = np.asarray(image.convert("RGB"))
    raw_h, raw_w = array.shape[:2]
    if resize_mode == RESIZE_JUST_RESIZE:
        return Image.fromarray(_resize(array, width, height))
    if resize_mode == RESIZE_AND_FILL:
        k = min(width / raw_w, height / raw_h)
        new_w, new_h = max(1, min(width, round(raw_w * k))), max(1, min(height, round(raw_h * k)))
        borders = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]], axis=0)
        out = np.tile(np.median(borders, axis=0).astype(np.uint8)[None, None], (height, width, 1))
        top, left = (height - new_h) // 2, (width - new_w) // 2
        out[top:top + new_h, left:left + new_w] = _resize(array, new_w, new_h)
        return Image.fromarray(out)
    k = max(width / raw_w, height / raw_h)
    new_w, new_h = max(width, round(raw_w * k)), max(height, round(raw_h * k))
    scaled = _resize(array, new_w, new_h)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return Image.fromarray(np.ascontiguousarray(scaled[top:top + height, left:left + width]))


# ---------------------------------------------------------------------------------------------- modes
def soft_scales(count: int, *, device: Any = None, dtype: Any = None) -> torch.Tensor:
    """Per-residual scales of the soft modes: 10^-1 ... 10^0 over ``count`` residuals (mid block last);
    for SD1/SD2's 13 residuals these are sd-webui-controlnet's 0.825^(12-i)."""
    return torch.logspace(-1, 0, count, device=device, dtype=dtype)


class UnitControlNets(MultiControlNetModel):
    """ControlNets with a control mode per unit: ``soft[i]`` scales unit i's residuals per block,
    ``cond_only[i]`` zeroes them on the unconditional half of a CFG batch (``cfg``)."""

    def __init__(self, controlnets: Sequence[Any], *, soft: Sequence[bool], cond_only: Sequence[bool], cfg: bool):
        super().__init__(list(controlnets))
        self.soft, self.cond_only, self.cfg = tuple(soft), tuple(cond_only), bool(cfg)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                class_labels=None, timestep_cond=None, attention_mask=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, guess_mode=False, return_dict=True):
        down_sum = mid_sum = None
        for i, (image, scale, net) in enumerate(zip(controlnet_cond, conditioning_scale, self.nets)):
            down, mid = net(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                            controlnet_cond=image, conditioning_scale=scale, class_labels=class_labels,
                            timestep_cond=timestep_cond, attention_mask=attention_mask,
                            added_cond_kwargs=added_cond_kwargs, cross_attention_kwargs=cross_attention_kwargs,
                            guess_mode=guess_mode, return_dict=False)
            down = list(down)
            if not guess_mode and self.soft[i]:  # in guess_mode the net applied these scales itself
                scales = soft_scales(len(down) + 1, device=mid.device, dtype=mid.dtype)
                down = [d * scales[j] for j, d in enumerate(down)]
                mid = mid * scales[-1]
            if not guess_mode and self.cond_only[i] and self.cfg and sample.shape[0] % 2 == 0:
                keep = torch.ones(sample.shape[0], 1, 1, 1, device=mid.device, dtype=mid.dtype)
                keep[: sample.shape[0] // 2] = 0  # diffusers batches [unconditional, conditional]
                down = [d * keep for d in down]
                mid = mid * keep
            if down_sum is None:
                down_sum, mid_sum = down, mid
            else:
                down_sum = [x + y for x, y in zip(down_sum, down)]
                mid_sum = mid_sum + mid
        if not return_dict:
            return down_sum, mid_sum
        return ControlNetOutput(down_block_res_samples=tuple(down_sum), mid_block_res_sample=mid_sum)


def combine(models: Sequence[Any], modes: Sequence[str], *, do_cfg: bool | None) -> tuple[Any, bool]:
    """(the ``controlnet`` for the pipeline, pipeline-wide ``guess_mode``) for units with ``modes``."""
    if all(m == CONTROL_MORE for m in modes):
        guess = True
    elif all(m == BALANCED for m in modes):
        guess = False
    else:
        return UnitControlNets(models, soft=[m != BALANCED for m in modes], cond_only=[m == CONTROL_MORE for m in modes],
                   cfg=bool(do_cfg)), False
    return (models[0] if len(models) == 1 else MultiControlNetModel(list(models))), guess


# ---------------------------------------------------------------------------------------------- units
def _fmt(value: float) -> str:
    return f"{float(value):g}" if float(value) != int(value) else f"{float(value):.1f}"


def unit_infotext(unit: Any, *, module: str, title: str, resolution: int, a: float | None, b: float | None) -> str:
    """sd-webui-controlnet's ``ControlNet N`` value."""
    fields = [("Module", module), ("Model", title), ("Weight", _fmt(unit.weight)),
              ("Resize Mode", RESIZE_NAMES.get(unit.resize_mode, str(unit.resize_mode))),
              ("Processor Res", str(resolution)), ("Threshold A", _fmt(-1 if a is None else a)),
              ("Threshold B", _fmt(-1 if b is None else b)), ("Guidance Start", _fmt(unit.guidance_start)),
              ("Guidance End", _fmt(unit.guidance_end)), ("Pixel Perfect", str(bool(unit.pixel_perfect))),
              ("Control Mode", unit.control_mode)]
    return ", ".join(f"{k}: {v}" for k, v in fields)


def _thresholds(pre: Any, unit: Any) -> tuple[float | None, float | None]:
    """The threshold values the preprocessor runs with (None where it has no such parameter)."""
    from webui.generation.preprocessors import _value

    a = _value(pre.slider_a, unit.threshold_a) if pre.slider_a is not None else None
    b = _value(pre.slider_b, unit.threshold_b) if pre.slider_b is not None else None
    return a, b


def prepare_control(units: Sequence[Any], *, base_arch: Arch, width: int, height: int, init_image: Any = None,
                    loader: Any, preprocessors: Any = None, annotators_dir: Path | None = None,
                    do_cfg: bool | None = None) -> Any:
    """Conditioning for the enabled ``units``: a ``ControlConditioning``, an
    ``adapter_control.AdapterConditioning`` when the units are T2I-Adapters, or None when no unit is enabled.

    ``init_image``: the img2img input already fitted to the output size, used by units without an image.
    ``loader``: ``webui.models.controlnet.ControlNetLoader``; ``preprocessors``: a ``PreprocessorRegistry``
    (None: the built-ins).  ``do_cfg``: whether the pipeline runs classifier-free guidance (cfg_scale > 1);
    needed only for "ControlNet is more important" mixed with other modes (None: treated as off).
    """
    from webui.generation.image_prep import normalize_image
    from webui.generation.preprocessors import PreprocessorRegistry

    registry = preprocessors if preprocessors is not None else PreprocessorRegistry()
    models, images, maps, modes, info = [], [], [], [], {}
    scales, starts, ends, names = [], [], [], []
    for index, unit in enumerate(units):
        if not getattr(unit, "enabled", True):
            continue
        source = unit.image if unit.image is not None else init_image
        if source is None:
            raise RequestError(f"ControlNet unit {index} has no image: add a control image to the unit "
                               "(txt2img has no input image to fall back on)")
        source = normalize_image(source, label=f"ControlNet unit {index} image")
        pre = registry.get(unit.module)
        resolution = (pixel_perfect_resolution(source.size, width, height, unit.resize_mode)
                      if unit.pixel_perfect else int(unit.processor_res))
        model = loader.get(unit.model, base_arch)  # arch check before the (maybe slow) preprocessor
        try:
            detected = registry.run(pre.name, source, resolution=resolution, threshold_a=unit.threshold_a,
                                    threshold_b=unit.threshold_b, annotators_dir=annotators_dir)
        except RequestError as exc:
            raise RequestError(f"ControlNet unit {index}: {exc}") from None
        fitted = fit_map(detected, width, height, unit.resize_mode)
        a, b = _thresholds(pre, unit)
        title = loader.title(loader.record(unit.model)) if hasattr(loader, "title") else unit.model
        info[f"ControlNet {index}"] = unit_infotext(unit, module=pre.name, title=title,
                                                    resolution=resolution if pre.uses_resolution else -1, a=a, b=b)
        models.append(model)
        images.append(fitted)
        maps.append(fitted)
        modes.append(unit.control_mode)
        scales.append(float(unit.weight))
        starts.append(float(unit.guidance_start))
        ends.append(float(unit.guidance_end))
        names.append(unit.model)
    if not models:
        return None
    if any(is_t2i_adapter(m) for m in models):  # T2I-Adapter units (webui.generation.adapter_control)
        from webui.generation.adapter_control import adapter_conditioning

        return adapter_conditioning(models, images, names=names, weights=scales, starts=starts, ends=ends,
                                    modes=modes, maps=maps, infotext=info, img2img=init_image is not None)
    controlnet, guess = combine(models, modes, do_cfg=do_cfg)
    single = not isinstance(controlnet, MultiControlNetModel)
    kwargs = {
        "controlnet_conditioning_scale": scales[0] if single else scales,
        "control_guidance_start": starts[0] if single else starts,
        "control_guidance_end": ends[0] if single else ends,
        "guess_mode": guess,
    }
    return ControlConditioning(controlnet=controlnet, images=images, kwargs=kwargs, maps=tuple(maps), infotext=info)

