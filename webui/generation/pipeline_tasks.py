"""Which diffusers pipeline runs which task on a loaded model, built as a view over its components.

Every task pipeline comes from the loaded model's base pipeline through diffusers ``from_pipe``: the UNet,
VAE, text encoders and tokenizers are the same objects (zero extra memory, LoRA patches and VAE choice
apply everywhere), so switching tabs never reloads a checkpoint.  Views are kept per loaded model (a small
dict on ``LoadedModel.task_pipes``) because ``from_pipe`` re-inspects signatures each time.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from webui.types import Arch, RequestError, Variant

TASKS = ("txt2img", "img2img", "inpaint", "edit")

# (family, task, with ControlNet) -> diffusers pipeline class name
_SD, _XL = "sd", "sdxl"
TASK_PIPELINES: dict[tuple[str, str, bool], str] = {
    (_SD, "txt2img", False): "StableDiffusionPipeline",
    (_SD, "img2img", False): "StableDiffusionImg2ImgPipeline",
    (_SD, "inpaint", False): "StableDiffusionInpaintPipeline",
    (_SD, "edit", False): "StableDiffusionInstructPix2PixPipeline",
    (_SD, "txt2img", True): "StableDiffusionControlNetPipeline",
    (_SD, "img2img", True): "StableDiffusionControlNetImg2ImgPipeline",
    (_SD, "inpaint", True): "StableDiffusionControlNetInpaintPipeline",
    (_XL, "txt2img", False): "StableDiffusionXLPipeline",
    (_XL, "img2img", False): "StableDiffusionXLImg2ImgPipeline",
    (_XL, "inpaint", False): "StableDiffusionXLInpaintPipeline",
    (_XL, "edit", False): "StableDiffusionXLInstructPix2PixPipeline",
    (_XL, "txt2img", True): "StableDiffusionXLControlNetPipeline",
    (_XL, "img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline",
    (_XL, "inpaint", True): "StableDiffusionXLControlNetInpaintPipeline",
}
# DiT families (webui.generation.dit): "edit" = Flux Kontext / Qwen-Image-Edit with reference image(s);
# "edit_multi" = Qwen-Image-Edit with several references (the Plus pipeline)
_SD3, _FLUX, _QWEN = "sd3", "flux", "qwen_image"
TASK_PIPELINES.update({
    (_SD3, "txt2img", False): "StableDiffusion3Pipeline",
    (_SD3, "img2img", False): "StableDiffusion3Img2ImgPipeline",
    (_FLUX, "txt2img", False): "FluxPipeline",
    (_FLUX, "img2img", False): "FluxImg2ImgPipeline",
    (_FLUX, "edit", False): "FluxKontextPipeline",
    (_QWEN, "txt2img", False): "QwenImagePipeline",
    (_QWEN, "img2img", False): "QwenImageImg2ImgPipeline",
    (_QWEN, "edit", False): "QwenImageEditPipeline",
    (_QWEN, "edit_multi", False): "QwenImageEditPlusPipeline",
})
# Models whose pipeline is not their Arch's default (Chroma and Flux.1 Fill are Arch.FLUX: same latents, VAE,
# previews and LoRA keys as Flux.1), by the loaded model's pipeline class: task -> class.
FAMILY_TASKS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "ChromaPipeline": MappingProxyType({"txt2img": "ChromaPipeline", "img2img": "ChromaImg2ImgPipeline"}),
    # Fill: txt2img = inpaint under a full mask (webui.generation.dit_fill)
    "FluxFillPipeline": MappingProxyType({"txt2img": "FluxFillPipeline", "inpaint": "FluxFillPipeline"}),
})
FAMILY_LABELS: Mapping[str, str] = MappingProxyType({"ChromaPipeline": "Chroma", "FluxFillPipeline": "Flux.1 Fill"})
_FAMILY = {Arch.SD1: _SD, Arch.SD2: _SD, Arch.SDXL: _XL, Arch.SDXL_REFINER: _XL,
           Arch.SD3: _SD3, Arch.FLUX: _FLUX, Arch.QWEN_IMAGE: _QWEN}


def task_for(variant: Variant, *, has_image: bool, has_mask: bool) -> str:
    """The task a job needs on a checkpoint of ``variant``.

    Instruction-edit (instruct-pix2pix) checkpoints only edit; 9-channel inpaint checkpoints always run the
    inpaint pipeline (txt2img on them = inpaint a blank image under a full mask, as A1111 does).
    """
    if variant is Variant.INSTRUCT_PIX2PIX:
        if not has_image:
            raise RequestError("this is an instruction-edit (instruct-pix2pix) checkpoint: it edits an input image. "
                               "Use the img2img / edit tab, or pick another checkpoint for txt2img.")
        if has_mask:
            raise RequestError("instruction-edit (instruct-pix2pix) checkpoints do not take a mask: use img2img / edit")
        return "edit"
    if variant is Variant.INPAINT:
        return "inpaint"
    if has_mask:
        return "inpaint"
    return "img2img" if has_image else "txt2img"


def base_pipeline_class(model: Any) -> str:
    """The diffusers class a loaded model was built as (DiT components say it; UNet models: "")."""
    return str(getattr(model.components, "pipeline_class", "") or "")


def pipeline_class_name(arch: Arch, task: str, *, controlnet: bool = False, base: str = "") -> str:
    """``base``: the loaded model's own pipeline class (``base_pipeline_class``), for ``FAMILY_TASKS``."""
    tasks = FAMILY_TASKS.get(base)
    if tasks is not None:
        name = None if controlnet else tasks.get(task)
        if name is None:
            extra = " with ControlNet" if controlnet else ""
            raise RequestError(f"{task}{extra} is not available for {FAMILY_LABELS[base]} models "
                               f"(they do: {', '.join(tasks)})")
        return name
    family = _FAMILY.get(arch)
    if arch is Arch.SDXL_REFINER and task == "txt2img":
        raise RequestError("the SDXL refiner only refines images: use it in img2img, or pick an SDXL base model")
    name = TASK_PIPELINES.get((family, task, controlnet)) if family else None
    if name is None:
        extra = " with ControlNet" if controlnet else ""
        raise RequestError(f"{task}{extra} is not available for {arch.value} models")
    return name


def task_pipeline(model: Any, task: str, controlnet: Any = None) -> Any:
    """The pipeline for ``task`` over ``model``'s components (``controlnet``: a ControlNetModel/Multi...)."""
    import diffusers

    name = pipeline_class_name(model.arch, task, controlnet=controlnet is not None, base=base_pipeline_class(model))
    base = model.pipe
    if type(base).__name__ == name and controlnet is None:
        return base
    key = (name, id(controlnet) if controlnet is not None else None)
    views = model.task_pipes
    pipe = views.get(key)
    if pipe is None:
        extra = {"controlnet": controlnet} if controlnet is not None else {}
        pipe = getattr(diffusers, name).from_pipe(base, **extra)
        pipe.set_progress_bar_config(disable=True)
        if controlnet is not None:  # a view pins its ControlNet in memory: keep one ControlNet view at a time
            for old in [k for k in views if k[1] is not None]:
                del views[old]
        views[key] = pipe
    return pipe
