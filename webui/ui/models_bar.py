"""The top bar: checkpoint + VAE dropdowns, Refresh, a status line and the empty-models notice.

Changing the checkpoint saves ``sd_model_checkpoint`` through ``ctx.set_options``, which loads it on the
worker first; on failure the dropdown goes back to the previous choice and the error names the file.
Broken files stay in the list (marked unusable) so users see why their file does not work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from webui.options import OptionError
from webui.types import RequestError
from webui.ui import starter
from webui.ui.common import Registry, message_html, status_html

SECTION = "models"
AUTOMATIC_VAE = "Automatic"
UNUSABLE = "\u26a0 unusable"


def _title(record: Any) -> str:
    return getattr(record, "title", None) or record.name


def checkpoint_choices(records: list[Any]) -> list[tuple[str, str]]:
    """(label, value) pairs: value is the catalog name; broken files are labelled unusable."""
    return [(f"{_title(r)} ({UNUSABLE})" if r.error else _title(r), r.name) for r in records]


def find_checkpoint(ctx: Any, name: str | None) -> Any:
    if not name:
        return None
    for record in ctx.checkpoints():
        if name in (record.name, _title(record), getattr(record, "filename", None),
                    getattr(record, "relative_filename", None)):
            return record
    return None


def current_checkpoint(ctx: Any) -> str | None:
    """The selected checkpoint as a dropdown value (catalog name), or None."""
    record = find_checkpoint(ctx, ctx.selected_checkpoint())
    return record.name if record is not None else None


def vae_choices(ctx: Any) -> list[str]:
    return [AUTOMATIC_VAE, *(r.name for r in ctx.vaes() if not r.error)]


def current_vae(ctx: Any) -> str:
    chosen = ctx.options.get("sd_vae") or AUTOMATIC_VAE
    return chosen if chosen in vae_choices(ctx) else AUTOMATIC_VAE


def render(ctx: Any) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row(elem_id="models_bar", equal_height=False):
        c["checkpoint"] = gr.Dropdown(checkpoint_choices(ctx.checkpoints()), value=current_checkpoint(ctx),
                                      label="Stable Diffusion checkpoint", elem_id="model_checkpoint",
                                      scale=4, min_width=240)
        c["refresh"] = gr.Button("\u21bb", elem_id="model_refresh", scale=0, min_width=44,
                                 elem_classes="webui-tool")
        c["vae"] = gr.Dropdown(vae_choices(ctx), value=current_vae(ctx), label="SD VAE", elem_id="model_vae",
                               scale=2, min_width=180)
        c["status"] = gr.HTML("", label="Status", elem_id="model_status", min_width=200)
    empty = ctx.empty_models_message()
    c["empty"] = gr.HTML(message_html(empty or ""), label="Notice", visible=bool(empty),
                         elem_id="models_empty_message")
    notes = "\n".join(getattr(ctx, "messages", None) or [])
    c["messages"] = gr.HTML(message_html(notes, kind="info"), label="Start-up notes", visible=bool(notes),
                            elem_id="models_messages")
    c.update(starter.render(ctx, open_=bool(empty)))
    return c


def list_updates(ctx: Any, c: dict[str, Any]) -> dict[str, Any]:
    """Fresh choices/values for the bar from the catalog as it is now (no rescan)."""
    empty = ctx.empty_models_message()
    return {
        c["checkpoint"]: gr.update(choices=checkpoint_choices(ctx.checkpoints()), value=current_checkpoint(ctx)),
        c["vae"]: gr.update(choices=vae_choices(ctx), value=current_vae(ctx)),
        c["empty"]: gr.update(value=message_html(empty or ""), visible=bool(empty)),
        c["starter_panel"]: gr.update(open=bool(empty)),
    }


def _file_label(record: Any) -> str:
    path = getattr(record, "path", None)
    return Path(path).name if path else record.name


def load_estimate(ctx: Any, record: Any) -> str:
    """What loading ``record`` needs, from file sizes (``webui.runtime.memory``), for the status line."""
    return ctx.manager.estimate(record).summary(accelerator=ctx.manager.plan.is_cuda)


def wire(ctx: Any, registry: Registry, blocks: gr.Blocks) -> None:
    c = registry.section(SECTION)
    list_outputs = [c["checkpoint"], c["vae"], c["empty"], c["starter_panel"]]

    def refresh():
        ctx.refresh_models()
        count = len(ctx.usable_checkpoints())
        return {**list_updates(ctx, c), c["status"]: status_html(f"Found {count} usable checkpoint(s).")}

    c["refresh"].click(refresh, outputs=[*list_outputs, c["status"]], api_name="refresh_models",
                       concurrency_limit=None)
    blocks.load(lambda: list_updates(ctx, c), outputs=list_outputs, api_visibility="private",
                concurrency_limit=None, show_progress="hidden")

    def set_checkpoint(name: str | None):
        old = current_checkpoint(ctx)
        record = find_checkpoint(ctx, name)
        if record is None:
            yield {c["checkpoint"]: old,
                   c["status"]: status_html(f"Checkpoint {name!r} is not in the list; press Refresh.", kind="error")}
            return
        if record.error:
            yield {c["checkpoint"]: old,
                   c["status"]: status_html(f"{_file_label(record)} cannot be used: {record.error}", kind="error")}
            return
        yield {c["status"]: status_html(f"Loading {_file_label(record)} ({load_estimate(ctx, record)})...", kind="busy")}
        try:
            ctx.set_options({"sd_model_checkpoint": record.name})
        except (OptionError, RequestError) as exc:
            message = str(exc)
            if _file_label(record) not in message:
                message = f"{_file_label(record)}: {message}"
            yield {c["checkpoint"]: old,
                   c["status"]: status_html(f"Could not load {message}", kind="error")}
            return
        mode = ctx.manager.memory_mode
        placed = "" if mode == "cpu" else f" (memory mode: {mode.replace('_', ' ')})"
        yield {c["checkpoint"]: record.name,
               c["status"]: status_html(f"Loaded {_file_label(record)}{placed}.", kind="ok")}

    c["checkpoint"].input(set_checkpoint, inputs=[c["checkpoint"]], outputs=[c["checkpoint"], c["status"]],
                          api_name="set_checkpoint", concurrency_limit=None, show_progress="minimal")

    def set_vae(name: str | None):
        old = current_vae(ctx)
        name = name or AUTOMATIC_VAE
        yield {c["status"]: status_html(f"Loading VAE {name}...", kind="busy")}
        try:
            ctx.set_options({"sd_vae": name})
        except (OptionError, RequestError) as exc:
            yield {c["vae"]: old, c["status"]: status_html(f"VAE {name}: {exc}", kind="error")}
            return
        yield {c["vae"]: name, c["status"]: status_html(f"VAE: {name}.", kind="ok")}

    c["vae"].input(set_vae, inputs=[c["vae"]], outputs=[c["vae"], c["status"]], api_name="set_vae",
                   concurrency_limit=None, show_progress="minimal")
    starter.wire(ctx, c, refresh_updates=lambda: list_updates(ctx, c), list_outputs=list_outputs)
