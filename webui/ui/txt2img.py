"""txt2img tab: layout (``render``) and wiring (``wire``).

Generate is a generator handler: it gets ``{field name: value}`` (``inputs_kwargs``, so API clients see
the same names), builds a ``GenerationRequest`` with ``requests.txt2img_request``, submits it to
the worker under this browser session's id, then follows the job with ``job_view.follow_job`` (progress
bar, live preview and finally the gallery, shared with img2img / inpaint).  It runs with ``concurrency_limit=None``: the worker
queue serialises jobs, so a queued job shows its position and other tabs never wait on this one.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from webui.generation.samplers import sampler_names, schedule_names
from webui.types import RequestError
from webui.ui import hires as hires_ui
from webui.ui import control_section, family_controls, lora_stack, send_to
from webui.ui.common import Registry, session_id
from webui.ui.job_view import RESULT_OUTPUTS, follow_job, wire_job_controls
from webui.ui.progress import progress_html
from webui.ui.requests import TXT2IMG_FIELDS, txt2img_request

SECTION = "txt2img"


def render(ctx: Any) -> dict[str, Any]:
    options = ctx.options.as_dict()
    samplers = list(sampler_names(getattr(ctx, "samplers", None)))  # built-ins + extensions
    schedules = list(schedule_names(getattr(ctx, "samplers", None)))
    default_sampler = options.get("default_sampler") or "Euler a"
    default_schedule = options.get("default_schedule") or "Automatic"
    c: dict[str, Any] = {}
    with gr.Row(elem_id="txt2img_toprow", elem_classes="webui-toprow", equal_height=False):
        with gr.Column(scale=5, min_width=300):
            c["prompt"] = gr.Textbox("", label="Prompt", lines=3, max_lines=20, elem_id="txt2img_prompt",
                                     placeholder="Prompt (A1111 syntax: (word:1.2), [from:to:0.5], <lora:name:0.8>)")
            c["negative_prompt"] = gr.Textbox("", label="Negative prompt", lines=2, max_lines=20,
                                              elem_id="txt2img_neg_prompt", placeholder="Negative prompt")
        with gr.Column(scale=1, min_width=220, elem_id="txt2img_actions"):
            c["generate"] = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
            with gr.Row():
                c["interrupt"] = gr.Button("Interrupt", variant="stop", size="sm", elem_id="txt2img_interrupt")
                c["skip"] = gr.Button("Skip", size="sm", elem_id="txt2img_skip")
            c["action_status"] = gr.HTML("", label="Status", elem_id="txt2img_action_status")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320, elem_id="txt2img_settings"):
            with gr.Row():
                c["sampler"] = gr.Dropdown(samplers, value=_pick(default_sampler, samplers), label="Sampling method",
                                           elem_id="txt2img_sampling", min_width=160)
                c["schedule"] = gr.Dropdown(schedules, value=_pick(default_schedule, schedules),
                                            label="Schedule type", elem_id="txt2img_scheduler", min_width=160)
            c["steps"] = gr.Slider(1, 150, value=20, step=1, precision=0, label="Sampling steps",
                                   elem_id="txt2img_steps")
            with gr.Row():
                c["width"] = gr.Slider(64, 2048, value=512, step=8, precision=0, label="Width",
                                       elem_id="txt2img_width", min_width=160)
                c["height"] = gr.Slider(64, 2048, value=512, step=8, precision=0, label="Height",
                                        elem_id="txt2img_height", min_width=160)
            with gr.Row():
                c["n_iter"] = gr.Slider(1, 100, value=1, step=1, precision=0, label="Batch count",
                                        elem_id="txt2img_batch_count", min_width=160)
                c["batch_size"] = gr.Slider(1, 16, value=1, step=1, precision=0, label="Batch size",
                                            elem_id="txt2img_batch_size", min_width=160)
            c["cfg_scale"] = gr.Slider(0, 30, value=7.0, step=0.5, label="CFG scale", elem_id="txt2img_cfg_scale")
            with gr.Row(elem_id="txt2img_seed_row"):
                c["seed"] = gr.Number(-1, precision=0, label="Seed (-1 = random)", elem_id="txt2img_seed",
                                      minimum=-1, maximum=2**32 - 1, scale=4, min_width=160)
                c["random_seed"] = gr.Button("\u2684", elem_id="txt2img_random_seed", scale=0,
                                             elem_classes="webui-tool", min_width=44)
                c["reuse_seed"] = gr.Button("\u267b\ufe0f", elem_id="txt2img_reuse_seed", scale=0,
                                            elem_classes="webui-tool", min_width=44)
            c["clip_skip"] = gr.Slider(1, 12, value=int(options.get("CLIP_stop_at_last_layers") or 1), step=1,
                                       precision=0, label="Clip skip", elem_id="txt2img_clip_skip")
            c.update(lora_stack.render(ctx, SECTION))
            c.update(hires_ui.render(ctx))  # hires-fix accordion (webui/ui/hires.py)
            c.update(control_section.render(ctx, SECTION))  # ControlNet + IP-Adapter accordions
        with gr.Column(scale=1, min_width=320, elem_id="txt2img_results"):
            c["progress"] = gr.HTML(progress_html("Idle", active=False), label="Progress", elem_id="txt2img_progress")
            c["preview"] = gr.Image(label="Live preview", interactive=False, format="jpeg", visible=False,
                                    elem_id="txt2img_preview", height=384)
            c["gallery"] = gr.Gallery(label="Output", format="png", columns=2, height=448, object_fit="contain",
                                      preview=True, interactive=False, elem_id="txt2img_gallery",
                                      buttons=["download", "fullscreen"])
            c["seed_used"] = gr.HTML("", label="Seed", elem_id="txt2img_seed_used")
            c["infotext"] = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                       buttons=["copy"], elem_id="txt2img_infotext")
            c.update(send_to.render_buttons(SECTION))  # "Send to img2img / inpaint / upscale" (send_to.wire)
    c["job_id"] = gr.State(None)
    c["infotexts"] = gr.State([])
    c["seeds"] = gr.State([])
    c["selected"] = gr.State(0)
    return c


def _pick(value: str, choices: list[str]) -> str | None:
    if value in choices:
        return value
    return choices[0] if choices else None


def wire(ctx: Any, registry: Registry, blocks: gr.Blocks) -> None:
    c = registry.section(SECTION)
    fields = {name: c[name] for name in TXT2IMG_FIELDS}
    fields.update({name: c[name] for name in lora_stack.input_names(lora_stack.slot_count(c))})
    lora_stack.wire(ctx, registry, SECTION)
    fields.update({name: c[name] for name in hires_ui.FIELDS})
    fields.update({name: c[name] for name in control_section.input_names(c)})
    control_section.wire(ctx, c, SECTION, checkpoint=registry.get("models.checkpoint"))
    family_controls.wire(ctx, c, registry.get("models.checkpoint"))  # DiT: guidance label, sampler, hints
    outputs = [c[k] for k in RESULT_OUTPUTS]

    def generate(request: gr.Request, **values: Any):
        try:
            controlnet, ip_adapters = control_section.requests_from(values, SECTION)
            req = txt2img_request(values, options=ctx.options.as_dict(), controlnet=controlnet,
                                  ip_adapters=ip_adapters)
            req = hires_ui.apply(req, values)
            job = ctx.submit(req, client=session_id(request))
        except (RequestError, TypeError, RuntimeError) as exc:
            yield {c["progress"]: progress_html(str(exc), error=True, active=False)}
            raise gr.Error(str(exc), print_exception=False) from None
        yield from follow_job(ctx, c, job, SECTION)

    # inputs_kwargs: the handler gets {field name: value} and API clients see the same names
    # In the page Generate is disabled while this tab's job runs (API clients call /txt2img directly and
    # may queue several).  Re-enabled on success AND on failure: Gradio 6.31's frontend does not run
    # `.then` listeners after an event that raised, although the docstring says it does.
    running = c["generate"].click(
        lambda: gr.update(interactive=False), outputs=[c["generate"]], queue=False, api_visibility="private",
        show_progress="hidden",
    ).then(
        control_section.optional_images(generate, c), inputs_kwargs=fields, outputs=outputs, api_name="txt2img",
        concurrency_limit=None,
        show_progress="hidden",
    )
    for after in (running.success, running.failure):
        after(lambda: gr.update(interactive=True), outputs=[c["generate"]], queue=False, api_visibility="private",
              show_progress="hidden")

    wire_job_controls(ctx, c, SECTION)

    def select(infotexts: list[str], evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else 0
        text = infotexts[index] if 0 <= index < len(infotexts) else ""
        return text, index

    c["gallery"].select(select, inputs=[c["infotexts"]], outputs=[c["infotext"], c["selected"]],
                        api_visibility="private", concurrency_limit=None, show_progress="hidden")
    c["random_seed"].click(lambda: -1, outputs=[c["seed"]], api_visibility="private", queue=False,
                           show_progress="hidden")

    def reuse(seeds: list[int], selected: int):
        if not seeds:
            return gr.skip()
        return seeds[selected] if 0 <= selected < len(seeds) else seeds[0]

    c["reuse_seed"].click(reuse, inputs=[c["seeds"], c["selected"]], outputs=[c["seed"]],
                          api_visibility="private", queue=False, show_progress="hidden")
