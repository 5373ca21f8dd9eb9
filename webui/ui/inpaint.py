"""Inpaint tab: paint a mask over the input image (Gradio ``ImageEditor``) or upload one, then generate.

The editor's value (``{"background", "layers", "composite"}``, PIL) and the optional uploaded mask become
(image, mask) in ``img2img_requests.inpaint_request`` (via ``webui.generation.masks``); everything else —
prompt row, sampling parameters, LoRA stack, results, Interrupt / Skip, send-to — is shared with the
img2img tab (``webui/ui/img2img.py``).  API: ``/inpaint`` (``editor``, ``mask`` + the img2img names).
"""
from __future__ import annotations

from typing import Any, Mapping

import gradio as gr

from webui.image_requests import MASKED_CONTENT_NAMES, SOFT_INPAINT_SETTINGS, Img2ImgRequest
from webui.types import Variant
from webui.ui.common import Registry
from webui.ui.img2img import (checkpoint_variant, control_requests, render_parameters, render_results,
                              render_toprow, wire_generation)
from webui.ui.img2img_requests import (IMG2IMG_FIELDS, INPAINT_AREAS, INPAINT_FIELDS, MASK_MODES, SOFT_INPAINT_FIELDS,
                                       inpaint_request)

SECTION = "inpaint"
BRUSH_COLOR = ("#ffffff", 0.8)  # painted = change; slightly see-through so the image stays visible
FIELDS = {**IMG2IMG_FIELDS, **INPAINT_FIELDS, **SOFT_INPAINT_FIELDS}
SOFT_INPAINT_HELP = ("Blends original and inpainted content by the mask's opacity: a high **Mask blur** (e.g. 16+) "
                     "gives it room. Works with normal and inpaint checkpoints, whole picture or only masked; "
                     "not with DiT models.")


def inpaint_hint(variant: Variant | None) -> str:
    if variant is Variant.INSTRUCT_PIX2PIX:
        return ("**Instruction-edit checkpoint**: it does not take a mask. Use the img2img / edit tab, or pick "
                "another checkpoint for inpainting.")
    if variant is Variant.INPAINT:
        return ("**Inpaint checkpoint** (9-channel): it sees the unmasked image, so a denoising strength up to "
                "1.0 and any masked content work well.")
    return ("Paint over the part to change. With a normal checkpoint keep *Masked content: original* and a "
            "denoising strength around 0.75, or use *fill* / *latent noise* with 1.0 to replace it entirely.")


def render(ctx: Any) -> dict[str, Any]:
    c = render_toprow(SECTION)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320, elem_id=f"{SECTION}_settings"):
            c["editor"] = gr.ImageEditor(
                label="Image and mask (paint over the part to change)", type="pil", image_mode="RGBA",
                format="png", sources=["upload", "clipboard"], transforms=(), elem_id="inpaint_editor", height=480,
                brush=gr.Brush(default_size="auto", colors=[BRUSH_COLOR], default_color=BRUSH_COLOR,
                               color_mode="fixed"),
                eraser=gr.Eraser(default_size="auto"),
                layers=gr.LayerOptions(allow_additional_layers=False, layers=["Mask"]))
            with gr.Accordion("Upload a mask (optional)", open=False, elem_id="inpaint_mask_upload"):
                c["mask"] = gr.Image(label="Mask: white = change (added to the painted strokes)", type="pil",
                                     image_mode=None, format="png", sources=["upload", "clipboard"],
                                     elem_id="inpaint_mask", height=240)
            c["mask_blur"] = gr.Slider(0, 64, value=4, step=1, precision=0, label="Mask blur",
                                       elem_id="inpaint_mask_blur")
            with gr.Row():
                c["inpainting_mask_invert"] = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask mode",
                                                       elem_id="inpaint_mask_mode", min_width=200)
                c["inpainting_fill"] = gr.Radio(list(MASKED_CONTENT_NAMES), value=MASKED_CONTENT_NAMES[1],
                                                label="Masked content", elem_id="inpaint_masked_content",
                                                min_width=200)
            with gr.Row():
                c["inpaint_full_res"] = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="Inpaint area",
                                                 elem_id="inpaint_area", min_width=200)
                c["inpaint_full_res_padding"] = gr.Slider(0, 256, value=32, step=4, precision=0,
                                                          label="Only masked padding, pixels",
                                                          elem_id="inpaint_full_res_padding", min_width=200)
            c.update(render_soft_inpainting())
            c.update(render_parameters(ctx, SECTION, hint=inpaint_hint(checkpoint_variant(ctx))))
        with gr.Column(scale=1, min_width=320, elem_id=f"{SECTION}_results"):
            c.update(render_results(SECTION))
    return c


def render_soft_inpainting() -> dict[str, Any]:
    """A1111's "Soft inpainting" accordion: an on/off box and its six sliders (A1111 ranges and elem_ids)."""
    c: dict[str, Any] = {}
    with gr.Accordion("Soft inpainting", open=False, elem_id="soft_inpainting"):
        c["soft_inpainting"] = gr.Checkbox(False, label="Soft inpainting", elem_id="soft_inpainting_enabled")
        gr.Markdown(SOFT_INPAINT_HELP)
        for spec in SOFT_INPAINT_SETTINGS:
            c[f"soft_{spec.name}"] = gr.Slider(spec.low, spec.high, value=spec.default, step=spec.step,
                                               label=spec.label, info=spec.info, elem_id=f"soft_{spec.name}")
    return c


def build_inpaint(values: Mapping[str, Any], options: Mapping[str, Any]) -> Img2ImgRequest:
    controlnet, ip_adapters = control_requests(values, SECTION)
    return inpaint_request(values, options=options, controlnet=controlnet, ip_adapters=ip_adapters)


def editor_image(value: Any) -> Any:
    """The editor's uploaded image (for "use the input image size"), None when there is none."""
    from webui.generation.masks import editor_to_image_and_mask

    return editor_to_image_and_mask(value)[0] if value else None


def wire(ctx: Any, registry: Registry, blocks: gr.Blocks) -> None:
    c = registry.section(SECTION)
    wire_generation(ctx, registry, SECTION, sources={"editor": c["editor"], "mask": c["mask"]}, build=build_inpaint,
                    size_source=c["editor"], size_of=editor_image, extra=FIELDS)
    checkpoint = registry.get("models.checkpoint")
    if checkpoint is not None:
        checkpoint.change(lambda: inpaint_hint(checkpoint_variant(ctx)), outputs=[c["model_hint"]],
                          api_visibility="private", queue=False, show_progress="hidden")
