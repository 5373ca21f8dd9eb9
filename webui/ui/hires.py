"""Hires-fix accordion of the txt2img tab (layout only; conversion is ``requests.hires_fields``).

Widget names are the ``GenerationRequest`` field names (A1111's ``enable_hr``, ``hr_scale``...), so the
txt2img handler receives them with its other fields and API clients see the same names.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from webui.generation.samplers import sampler_names, schedule_names
from webui.types import GenerationRequest, RequestError
from webui.ui.requests import HIRES_FIELDS, HIRES_SAME, hires_fields

FIELDS = tuple(HIRES_FIELDS)


def upscaler_choices(ctx: Any) -> list[str]:
    from webui.generation.hires import LATENT_MODES
    from webui.generation.upscale_job import upscaler_entries

    try:
        models = [e.name for e in upscaler_entries(ctx) if e.kind != "none"]
    except Exception:  # the tab must render even if a folder cannot be read
        models = ["Lanczos", "Nearest"]
    return [*LATENT_MODES, *models]


def render(ctx: Any) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hires_fix"):
        c["enable_hr"] = gr.Checkbox(False, label="Enable hires. fix", elem_id="txt2img_enable_hr")
        with gr.Row():
            c["hr_upscaler"] = gr.Dropdown(upscaler_choices(ctx), value="Latent", label="Upscaler",
                                           elem_id="txt2img_hr_upscaler", min_width=160)
            c["hr_second_pass_steps"] = gr.Slider(0, 150, value=0, step=1, precision=0,
                                                  label="Hires steps (0 = same as sampling steps)",
                                                  elem_id="txt2img_hires_steps", min_width=160)
            c["denoising_strength"] = gr.Slider(0.01, 1.0, value=0.7, step=0.01, label="Denoising strength",
                                                elem_id="txt2img_denoising_strength", min_width=160)
        with gr.Row():
            c["hr_scale"] = gr.Slider(1.0, 4.0, value=2.0, step=0.05, label="Upscale by",
                                      elem_id="txt2img_hr_scale", min_width=160)
            c["hr_resize_x"] = gr.Slider(0, 4096, value=0, step=8, precision=0, label="Resize width to",
                                         elem_id="txt2img_hr_resize_x", min_width=160)
            c["hr_resize_y"] = gr.Slider(0, 4096, value=0, step=8, precision=0, label="Resize height to",
                                         elem_id="txt2img_hr_resize_y", min_width=160)
        registry = ctx.samplers  # built-in + extension samplers and schedule types
        with gr.Row():
            c["hr_sampler_name"] = gr.Dropdown([f"{HIRES_SAME} sampler", *sampler_names(registry)],
                                               value=f"{HIRES_SAME} sampler", label="Hires sampling method",
                                               elem_id="txt2img_hr_sampler", min_width=160)
            c["hr_scheduler"] = gr.Dropdown([f"{HIRES_SAME} schedule", *schedule_names(registry)],
                                            value=f"{HIRES_SAME} schedule", label="Hires schedule type",
                                            elem_id="txt2img_hr_scheduler", min_width=160)
        c["hr_prompt"] = gr.Textbox("", label="Hires prompt (empty = same prompt)", lines=2,
                                    elem_id="txt2img_hr_prompt")
        c["hr_negative_prompt"] = gr.Textbox("", label="Hires negative prompt (empty = same)", lines=2,
                                             elem_id="txt2img_hr_negative_prompt")
    return c


def apply(request: GenerationRequest, values: dict[str, Any]) -> GenerationRequest:
    """The txt2img request with the accordion's fields (unchanged when hires fix is off)."""
    fields = hires_fields(values)
    if not fields:
        return request
    try:
        return request.with_changes(**fields)
    except TypeError as exc:
        raise RequestError(str(exc)) from None
