"""PNG info tab: drop an image -> its generation parameters; "Send to txt2img" fills that tab.

Reading and parsing are ``webui.io.metadata``'s job (A1111 infotext in the PNG ``parameters`` chunk and
the other formats it knows); this module only shows the result and moves the fields across.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from webui.io.metadata import control_units_from_infotext, infotext_to_request_fields, parse_infotext, read_infotext
from webui.ui import send_to
from webui.ui.common import Registry, status_html
from webui.ui.control_requests import unit_indices, unit_setting_names, unit_values_from_infotext
from webui.ui.requests import HIRES_FIELDS, txt2img_field_values

SECTION = "png_info"
TARGET = "txt2img"


def render(ctx: Any) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            # filepath + image_mode=None: Gradio hands over the uploaded file untouched, metadata included
            c["image"] = gr.Image(label="Source image", type="filepath", image_mode=None,
                                  sources=["upload", "clipboard"], elem_id="pnginfo_image", height=420)
        with gr.Column(scale=1, min_width=300):
            c["text"] = gr.Textbox(label="Parameters", lines=6, interactive=False, buttons=["copy"],
                                   elem_id="pnginfo_text")
            c["params"] = gr.JSON(label="Parsed", elem_id="pnginfo_params")
            c["send_txt2img"] = gr.Button("Send to txt2img", variant="primary", elem_id="pnginfo_send_txt2img")
            c.update(send_to.render_buttons("pnginfo", ("img2img", "inpaint")))  # wired by send_to.wire
            c["status"] = gr.HTML("", label="Status", elem_id="pnginfo_status")
    return c


def read_parameters(path: str | None) -> tuple[str, dict]:
    """(infotext, parsed dict) of an image file; ("", {}) when it carries none."""
    if not path:
        return "", {}
    text = read_infotext(path) or ""
    return text, (parse_infotext(text) if text else {})


def wire(ctx: Any, registry: Registry, blocks: gr.Blocks) -> None:
    c = registry.section(SECTION)
    target = registry.section(TARGET)

    def show(path: str | None):
        try:
            text, parsed = read_parameters(path)
        except (OSError, ValueError) as exc:
            return "", None, status_html(f"Could not read this image: {exc}", kind="error")
        if path and not text:
            return "", None, status_html("This image carries no generation parameters.")
        return text, parsed or None, ""

    c["image"].change(show, inputs=[c["image"]], outputs=[c["text"], c["params"], c["status"]],
                      api_name="png_info", concurrency_limit=None)

    fields = [name for name in target if name in ("prompt", "negative_prompt", "steps", "sampler", "schedule",
                                                   "width", "height", "cfg_scale", "seed", "n_iter",
                                                   "batch_size", "clip_skip", *HIRES_FIELDS)]
    fields += unit_setting_names(target)  # ControlNet unit settings (not their images)

    def send(text: str | None):
        if not text:
            return {c["status"]: status_html("Drop an image with parameters first.", kind="error")}
        parsed = parse_infotext(text)
        request_fields = infotext_to_request_fields(parsed)
        values = txt2img_field_values(request_fields)
        values.update({k: v for k, v in request_fields.items() if k in HIRES_FIELDS and v is not None})
        values.update(unit_values_from_infotext(control_units_from_infotext(parsed), len(unit_indices(target))))
        updates: dict[Any, Any] = {target[name]: values[name] for name in fields if name in values}
        updates[registry["tabs"]] = gr.Tabs(selected=TARGET)
        updates[c["status"]] = status_html(f"Sent {len(updates) - 1} field(s) to txt2img.", kind="ok")
        return updates

    c["send_txt2img"].click(send, inputs=[c["text"]],
                            outputs=[*(target[name] for name in fields), registry["tabs"], c["status"]],
                            api_visibility="private", concurrency_limit=None)
