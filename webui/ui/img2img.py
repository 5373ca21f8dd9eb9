"""img2img / edit tab, and the pieces it shares with the inpaint tab (``webui/ui/inpaint.py``).

Layout follows txt2img (prompt row, settings column, results column; rows wrap on a narrow screen) and the
widget names are the same request field names, so both tabs convert with ``webui.ui.img2img_requests`` and
send-to / PNG info fill them by name.  Generate is a generator: it builds an ``Img2ImgRequest``, submits it
under this browser session and follows the job with ``job_view.follow_job``; Interrupt / Skip
act only on this session's job.  Instruction-edit (instruct-pix2pix) checkpoints show the Image CFG scale
and a hint; the hint follows the checkpoint dropdown.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import gradio as gr

from webui.generation.samplers import sampler_names, schedule_names
from webui.image_requests import RESIZE_MODE_NAMES, Img2ImgRequest
from webui.types import RequestError, Variant
from webui.ui import control_section, lora_stack, send_to
from webui.ui.common import Registry, session_id, status_html
from webui.ui.img2img_requests import IMG2IMG_FIELDS, img2img_request, size_from_image
from webui.ui.progress import progress_html
from webui.ui.requests import TXT2IMG_FIELDS
from webui.ui.job_view import RESULT_OUTPUTS, follow_job, wire_job_controls

SECTION = "img2img"
EDIT_HINT = ("**Instruction-edit checkpoint** (instruct-pix2pix): write the change as an instruction "
             "(\"make it winter\", \"turn the cat into a tiger\"). *Image CFG scale* sets how closely the result "
             "keeps the input image (1.5 is typical, higher = closer); denoising strength is not used.")
INPAINT_MODEL_HINT = ("**Inpaint checkpoint**: it repaints the whole input image here (an all-white mask). "
                      "Use the Inpaint tab to change only a painted area.")


def _pick(value: str, choices: list[str]) -> str | None:
    return value if value in choices else (choices[0] if choices else None)


def checkpoint_variant(ctx: Any) -> Variant | None:
    """Variant of the selected checkpoint, from the catalog (no torch in the UI)."""
    try:
        name = ctx.selected_checkpoint()
        return ctx.catalog.get("checkpoint", name).variant if name else None
    except (LookupError, AttributeError):
        return None


def img2img_hint(variant: Variant | None) -> str:
    if variant is Variant.INSTRUCT_PIX2PIX:
        return EDIT_HINT
    return INPAINT_MODEL_HINT if variant is Variant.INPAINT else ""


# ---- layout pieces shared with the inpaint tab ----------------------------------------------------------
def render_toprow(section: str) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row(elem_id=f"{section}_toprow", elem_classes="webui-toprow", equal_height=False):
        with gr.Column(scale=5, min_width=300):
            c["prompt"] = gr.Textbox("", label="Prompt", lines=3, max_lines=20, elem_id=f"{section}_prompt",
                                     placeholder="Prompt (or, for an instruction-edit model, the instruction)")
            c["negative_prompt"] = gr.Textbox("", label="Negative prompt", lines=2, max_lines=20,
                                              elem_id=f"{section}_neg_prompt", placeholder="Negative prompt")
        with gr.Column(scale=1, min_width=220, elem_id=f"{section}_actions"):
            c["generate"] = gr.Button("Generate", variant="primary", elem_id=f"{section}_generate",
                                      elem_classes="webui-generate")
            with gr.Row():
                c["interrupt"] = gr.Button("Interrupt", variant="stop", size="sm", elem_id=f"{section}_interrupt")
                c["skip"] = gr.Button("Skip", size="sm", elem_id=f"{section}_skip")
            c["action_status"] = gr.HTML("", label="Status", elem_id=f"{section}_action_status")
    return c


def render_parameters(ctx: Any, section: str, *, hint: str = "", edit_model: bool = False) -> dict[str, Any]:
    """Sampling parameters (as txt2img), resize mode, denoising / image CFG, seed, clip skip, LoRA stack."""
    options = ctx.options.as_dict()
    registry = getattr(ctx, "samplers", None)  # built-in + extension samplers, as in txt2img
    samplers, schedules = list(sampler_names(registry)), list(schedule_names(registry))
    c: dict[str, Any] = {}
    c["resize_mode"] = gr.Radio(list(RESIZE_MODE_NAMES), value=RESIZE_MODE_NAMES[0], label="Resize mode",
                                elem_id=f"{section}_resize_mode")
    with gr.Row():
        c["sampler"] = gr.Dropdown(samplers, value=_pick(options.get("default_sampler") or "Euler a", samplers),
                                   label="Sampling method", elem_id=f"{section}_sampling", min_width=160)
        c["schedule"] = gr.Dropdown(schedules, value=_pick(options.get("default_schedule") or "Automatic", schedules),
                                    label="Schedule type", elem_id=f"{section}_scheduler", min_width=160)
    c["steps"] = gr.Slider(1, 150, value=20, step=1, precision=0, label="Sampling steps", elem_id=f"{section}_steps")
    with gr.Row():
        c["width"] = gr.Slider(64, 2048, value=512, step=8, precision=0, label="Width", elem_id=f"{section}_width",
                               min_width=160)
        c["height"] = gr.Slider(64, 2048, value=512, step=8, precision=0, label="Height",
                                elem_id=f"{section}_height", min_width=160)
    c["size_from_image"] = gr.Button("Use the input image size", size="sm",
                                     elem_id=f"{section}_size_from_image")
    with gr.Row():
        c["n_iter"] = gr.Slider(1, 100, value=1, step=1, precision=0, label="Batch count",
                                elem_id=f"{section}_batch_count", min_width=160)
        c["batch_size"] = gr.Slider(1, 16, value=1, step=1, precision=0, label="Batch size",
                                    elem_id=f"{section}_batch_size", min_width=160)
    c["cfg_scale"] = gr.Slider(0, 30, value=7.0, step=0.5, label="CFG scale", elem_id=f"{section}_cfg_scale")
    c["denoising_strength"] = gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Denoising strength",
                                        elem_id=f"{section}_denoising_strength")
    c["image_cfg_scale"] = gr.Slider(0.0, 3.0, value=1.5, step=0.05, label="Image CFG scale", visible=edit_model,
                                     elem_id=f"{section}_image_cfg_scale")
    c["model_hint"] = gr.Markdown(hint, elem_id=f"{section}_model_hint")
    with gr.Row(elem_id=f"{section}_seed_row"):
        c["seed"] = gr.Number(-1, precision=0, label="Seed (-1 = random)", elem_id=f"{section}_seed", minimum=-1,
                              maximum=2**32 - 1, scale=4, min_width=160)
        c["random_seed"] = gr.Button("\u2684", elem_id=f"{section}_random_seed", scale=0, elem_classes="webui-tool",
                                     min_width=44)
        c["reuse_seed"] = gr.Button("\u267b\ufe0f", elem_id=f"{section}_reuse_seed", scale=0,
                                    elem_classes="webui-tool", min_width=44)
    c["clip_skip"] = gr.Slider(1, 12, value=int(options.get("CLIP_stop_at_last_layers") or 1), step=1, precision=0,
                               label="Clip skip", elem_id=f"{section}_clip_skip")
    c.update(lora_stack.render(ctx, section))
    c.update(control_section.render(ctx, section))  # ControlNet + reference images (IP-Adapter)
    return c


def render_results(section: str) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["progress"] = gr.HTML(progress_html("Idle", active=False), label="Progress", elem_id=f"{section}_progress")
    c["preview"] = gr.Image(label="Live preview", interactive=False, format="jpeg", visible=False,
                            elem_id=f"{section}_preview", height=384)
    c["gallery"] = gr.Gallery(label="Output", format="png", columns=2, height=448, object_fit="contain", preview=True,
                              interactive=False, elem_id=f"{section}_gallery", buttons=["download", "fullscreen"])
    c["seed_used"] = gr.HTML("", label="Seed", elem_id=f"{section}_seed_used")
    c["infotext"] = gr.Textbox(label="Generation parameters", lines=4, interactive=False, buttons=["copy"],
                               elem_id=f"{section}_infotext")
    c.update(send_to.render_buttons(section))
    c["job_id"] = gr.State(None)
    c["infotexts"] = gr.State([])
    c["seeds"] = gr.State([])
    c["selected"] = gr.State(0)
    return c


# ---- the img2img tab ------------------------------------------------------------------------------------
def render(ctx: Any) -> dict[str, Any]:
    variant = checkpoint_variant(ctx)
    c = render_toprow(SECTION)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320, elem_id=f"{SECTION}_settings"):
            c["image"] = gr.Image(label="Input image", type="pil", image_mode="RGB", format="png",
                                  sources=["upload", "clipboard"], elem_id="img2img_image", height=360)
            c.update(render_parameters(ctx, SECTION, hint=img2img_hint(variant),
                                       edit_model=variant is Variant.INSTRUCT_PIX2PIX))
        with gr.Column(scale=1, min_width=320, elem_id=f"{SECTION}_results"):
            c.update(render_results(SECTION))
    return c


def build_img2img(values: Mapping[str, Any], options: Mapping[str, Any]) -> Img2ImgRequest:
    controlnet, ip_adapters = control_requests(values, SECTION)
    return img2img_request(values, images=[values.get("image")], options=options, controlnet=controlnet,
                           ip_adapters=ip_adapters)


def control_requests(values: Mapping[str, Any], section: str) -> tuple[tuple, tuple]:
    return control_section.requests_from(values, section)


def wire(ctx: Any, registry: Registry, blocks: gr.Blocks) -> None:
    c = registry.section(SECTION)
    wire_generation(ctx, registry, SECTION, sources={"image": c["image"]}, build=build_img2img,
                    size_source=c["image"], size_of=lambda image: image)
    hint_outputs = [c["image_cfg_scale"], c["model_hint"]]

    def hint():
        variant = checkpoint_variant(ctx)
        return gr.update(visible=variant is Variant.INSTRUCT_PIX2PIX), img2img_hint(variant)

    checkpoint = registry.get("models.checkpoint")
    if checkpoint is not None:
        checkpoint.change(hint, outputs=hint_outputs, api_visibility="private", queue=False, show_progress="hidden")
    from webui.ui import family_controls

    family_controls.wire(ctx, c, checkpoint)  # DiT: guidance label, sampler, edit hint


# ---- wiring shared with the inpaint tab -----------------------------------------------------------------
def field_names(c: Mapping[str, Any], extra: Mapping[str, str] = IMG2IMG_FIELDS) -> list[str]:
    names = [*TXT2IMG_FIELDS, *lora_stack.input_names(lora_stack.slot_count(c)), *extra]
    return names + [n for n in control_section.input_names(c) if n not in names]


def wire_generation(ctx: Any, registry: Registry, section: str, *, sources: Mapping[str, Any],
                    build: Callable[[Mapping[str, Any], Mapping[str, Any]], Img2ImgRequest],
                    size_source: Any, size_of: Callable[[Any], Any], extra: Mapping[str, str] = IMG2IMG_FIELDS,
                    ) -> None:
    """Generate / Interrupt / Skip / gallery / seed / size buttons of an image tab (API ``/<section>``)."""
    if not set(sources) <= {"image", "editor", "mask"}:
        raise ValueError(f"image inputs must be named image / editor / mask, got {sorted(sources)}")
    c = registry.section(section)
    lora_stack.wire(ctx, registry, section)
    control_section.wire(ctx, c, section, checkpoint=registry.get("models.checkpoint"))
    inputs = {name: c[name] for name in field_names(c, extra)}
    inputs.update(sources)
    outputs = [c[name] for name in RESULT_OUTPUTS]

    # the image inputs default to None so that API clients may leave them out (their message then says why)
    def generate(request: gr.Request, image: Any = None, editor: Any = None, mask: Any = None, **values: Any):
        values.update((k, v) for k, v in (("image", image), ("editor", editor), ("mask", mask)) if k in sources)
        try:
            job = ctx.submit(build(values, ctx.options.as_dict()), client=session_id(request))
        except (RequestError, TypeError, ValueError, RuntimeError) as exc:
            yield {c["progress"]: progress_html(str(exc), error=True, active=False),
                   c["action_status"]: status_html(str(exc), kind="error")}
            raise gr.Error(str(exc), print_exception=False) from None
        yield from follow_job(ctx, c, job, section)

    private = dict(api_visibility="private", queue=False, show_progress="hidden")
    running = c["generate"].click(lambda: gr.update(interactive=False), outputs=[c["generate"]], **private).then(
        control_section.optional_images(generate, c), inputs_kwargs=inputs, outputs=outputs, api_name=section, concurrency_limit=None,
        show_progress="hidden")
    for after in (running.success, running.failure):  # see txt2img.wire: .then does not run after an error
        after(lambda: gr.update(interactive=True), outputs=[c["generate"]], **private)
    wire_job_controls(ctx, c, section)

    def select(infotexts: list[str], evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else 0
        return (infotexts[index] if 0 <= index < len(infotexts) else ""), index

    c["gallery"].select(select, inputs=[c["infotexts"]], outputs=[c["infotext"], c["selected"]],
                        api_visibility="private", concurrency_limit=None, show_progress="hidden")
    c["random_seed"].click(lambda: -1, outputs=[c["seed"]], **private)

    def reuse(seeds: list[int], selected: int):
        if not seeds:
            return gr.skip()
        return seeds[selected] if 0 <= selected < len(seeds) else seeds[0]

    c["reuse_seed"].click(reuse, inputs=[c["seeds"], c["selected"]], outputs=[c["seed"]], **private)

    def use_size(value: Any):
        try:
            return size_from_image(size_of(value))
        except RequestError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    c["size_from_image"].click(use_size, inputs=[size_source], outputs=[c["width"], c["height"]],
                               api_visibility="private", concurrency_limit=None, show_progress="hidden")
