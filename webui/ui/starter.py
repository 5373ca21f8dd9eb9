""""Download a starter model" panel under the models bar (``ctx.downloads``: a ``StarterDownloads``).

Start runs the download on a background thread; a ``gr.Timer`` polls ``status(key)`` once a second
while it runs and stops itself afterwards.  When a download finishes the model lists are refreshed.
"""
from __future__ import annotations

import html
from typing import Any, Callable

import gradio as gr

from webui.ui.common import status_html
from webui.ui.progress import progress_html


def _models(ctx: Any) -> tuple[Any, ...]:
    downloads = getattr(ctx, "downloads", None)
    return tuple(getattr(downloads, "models", ()) or ())


def model_info_html(model: Any, dest_dir: Any) -> str:
    if model is None:
        return ""
    return (
        f'<div class="webui-starter-info"><b>{html.escape(model.label)}</b>: {html.escape(model.arch_note)}.<br>'
        f'License: {html.escape(model.license)} ({html.escape(model.license_note)}). '
        f'<a href="{html.escape(model.page_url())}" target="_blank" rel="noopener">Model page</a>.<br>'
        f"Saved to {html.escape(str(dest_dir))}.</div>"
    )


def status_to_html(status: Any) -> str:
    if status is None or status.state == "idle":
        return ""
    if status.state == "running":
        return progress_html(status.message or "Downloading...", status.fraction)
    if status.state == "done":
        return status_html(status.message or "Downloaded.", kind="ok")
    return status_html(status.message or status.state, kind="error" if status.state == "failed" else "info")


def render(ctx: Any, *, open_: bool) -> dict[str, Any]:
    c: dict[str, Any] = {}
    models = _models(ctx)
    downloads = getattr(ctx, "downloads", None)
    dest = getattr(downloads, "dest_dir", ctx.settings.ckpt_dir)
    with gr.Accordion("Download a starter model", open=open_, elem_id="starter_download") as panel:
        c["starter_panel"] = panel
        gr.Markdown(
            "Pick one of these well-known checkpoints to download it into your models folder "
            "(resumable, checksum-verified). Without network access, or just to try the interface, restart "
            "with `--demo` for tiny random-weight models (they make noise, but every feature works).",
            elem_id="starter_intro",
        )
        with gr.Row(equal_height=False):
            c["starter_model"] = gr.Dropdown([(m.label, m.key) for m in models],
                                              value=models[0].key if models else None, label="Starter model",
                                              elem_id="starter_model", scale=3, min_width=240)
            c["starter_start"] = gr.Button("Download", variant="primary", elem_id="starter_download_start",
                                           scale=1, min_width=120, interactive=bool(models))
            c["starter_cancel"] = gr.Button("Cancel", elem_id="starter_download_cancel", scale=1, min_width=100,
                                            interactive=bool(models))
        c["starter_info"] = gr.HTML(model_info_html(models[0] if models else None, dest), elem_id="starter_info")
        c["starter_status"] = gr.HTML("", elem_id="starter_download_status")
        c["starter_timer"] = gr.Timer(1.0, active=False)
    return c


def wire(ctx: Any, c: dict[str, Any], *, refresh_updates: Callable[[], dict], list_outputs: list) -> None:
    models = {m.key: m for m in _models(ctx)}
    if not models:
        return
    downloads = ctx.downloads

    def info(key: str | None):
        return model_info_html(models.get(key), downloads.dest_dir)

    c["starter_model"].change(info, inputs=[c["starter_model"]], outputs=[c["starter_info"]],
                              api_visibility="private", concurrency_limit=None, show_progress="hidden")

    def start(key: str | None):
        if key not in models:
            return {c["starter_status"]: status_html("Pick a model first.", kind="error")}
        status = downloads.start(key)
        return {c["starter_status"]: status_to_html(status), c["starter_timer"]: gr.Timer(active=status.active)}

    c["starter_start"].click(start, inputs=[c["starter_model"]], outputs=[c["starter_status"], c["starter_timer"]],
                             api_name="starter_download", concurrency_limit=None)

    def cancel(key: str | None):
        if key in models:
            downloads.cancel(key)
        return status_html("Cancelling; the partial file is kept and the next Download resumes it.", kind="busy")

    c["starter_cancel"].click(cancel, inputs=[c["starter_model"]], outputs=[c["starter_status"]],
                              api_name="starter_download_cancel", concurrency_limit=None)

    def poll(key: str | None):
        if key not in models:
            return {c["starter_timer"]: gr.Timer(active=False)}
        status = downloads.status(key)
        updates = {c["starter_status"]: status_to_html(status)}
        if not status.active:
            updates[c["starter_timer"]] = gr.Timer(active=False)
            if status.state == "done":
                ctx.refresh_models()
                # keep the panel open so the success message stays in view
                updates.update({k: v for k, v in refresh_updates().items() if k is not c["starter_panel"]})
        return updates

    c["starter_timer"].tick(poll, inputs=[c["starter_model"]],
                            outputs=[c["starter_status"], c["starter_timer"], *list_outputs],
                            api_visibility="private", concurrency_limit=None, show_progress="hidden")
