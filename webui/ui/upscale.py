"""Upscale tab (A1111 "Extras"): single image, several files or a folder -> UpscaleRequest on the worker.

Layout + wiring only: the request is built by ``upscale_request`` (pure), the job runs on the worker
(``webui.generation.upscale``), progress (``tile i/N``) is followed with ``progress.watch``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from webui.types import JobState, RequestError, UpscaleRequest
from webui.ui.common import Registry, session_id, status_html
from webui.ui.progress import progress_html, watch

SECTION = "upscale"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MODES = ("Scale by", "Scale to")


def upscaler_names(ctx: Any) -> list[str]:
    from webui.generation.upscale_job import upscaler_entries

    return [e.name for e in upscaler_entries(ctx)]


def _open(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        raise RequestError(f"{Path(path).name}: not a readable image ({exc})") from None


def collect_images(source: str, single: Any, files: list | None, folder: str) -> tuple[list, list[str]]:
    """(images, names) for the chosen source tab."""
    if source == "batch":
        paths = [getattr(f, "name", f) for f in (files or [])]
        if not paths:
            raise RequestError("Batch: add one or more image files first")
        return [_open(p) for p in paths], [Path(p).name for p in paths]
    if source == "folder":
        root = Path((folder or "").strip()).expanduser()
        if not str(folder or "").strip() or not root.is_dir():
            raise RequestError(f"Batch from folder: {folder!r} is not a folder")
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise RequestError(f"Batch from folder: no images in {root}")
        return [_open(p) for p in paths], [p.name for p in paths]
    if single is None:
        raise RequestError("Add an image to upscale first")
    return [single], ["image"]


def upscale_request(values: dict[str, Any], images: list, names: list[str]) -> UpscaleRequest:
    second = values.get("upscaler_2") or "None"
    return UpscaleRequest(
        images=tuple(images), names=tuple(names), resize_mode=MODES.index(values.get("resize_mode") or MODES[0]),
        upscaling_resize=float(values.get("upscaling_resize") or 2.0),
        upscaling_resize_w=int(values.get("upscaling_resize_w") or 512),
        upscaling_resize_h=int(values.get("upscaling_resize_h") or 512),
        upscaling_crop=bool(values.get("upscaling_crop")), upscaler_1=values.get("upscaler_1") or "None",
        upscaler_2=None if second == "None" else second,
        extras_upscaler_2_visibility=float(values.get("extras_upscaler_2_visibility") or 0.0))


def render(ctx: Any) -> dict[str, Any]:
    names = upscaler_names(ctx)
    default = next((n for n in names if n not in ("None", "Lanczos", "Nearest")), "Lanczos")
    c: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320, elem_id="upscale_settings"):
            c["source"] = gr.State("single")
            with gr.Tabs(elem_id="upscale_source_tabs"):
                with gr.Tab("Single image", id="single", elem_id="upscale_tab_single") as c["tab_single"]:
                    c["image"] = gr.Image(label="Source", type="pil", image_mode=None, format="png",
                                          sources=["upload", "clipboard"], elem_id="upscale_image", height=320)
                with gr.Tab("Batch", id="batch", elem_id="upscale_tab_batch") as c["tab_batch"]:
                    c["files"] = gr.File(label="Images", file_count="multiple", file_types=["image"],
                                         elem_id="upscale_files")
                with gr.Tab("Batch from folder", id="folder", elem_id="upscale_tab_folder") as c["tab_folder"]:
                    c["folder"] = gr.Textbox("", label="Input folder (on the server)", elem_id="upscale_folder")
            c["resize_mode"] = gr.Radio(list(MODES), value=MODES[0], label="Resize", elem_id="upscale_resize_mode")
            c["upscaling_resize"] = gr.Slider(1.0, 8.0, value=2.0, step=0.05, label="Scale by",
                                              elem_id="upscale_upscaling_resize")
            with gr.Row():
                c["upscaling_resize_w"] = gr.Number(512, precision=0, minimum=1, maximum=16384, label="Width",
                                                    elem_id="upscale_resize_w", min_width=100)
                c["upscaling_resize_h"] = gr.Number(512, precision=0, minimum=1, maximum=16384, label="Height",
                                                    elem_id="upscale_resize_h", min_width=100)
                c["upscaling_crop"] = gr.Checkbox(True, label="Crop to fit", elem_id="upscale_crop", min_width=100)
            with gr.Row():
                c["upscaler_1"] = gr.Dropdown(names, value=default, label="Upscaler 1", elem_id="upscale_upscaler_1")
                c["upscaler_2"] = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id="upscale_upscaler_2")
                c["refresh"] = gr.Button("\u21bb", elem_id="upscale_refresh", scale=0, min_width=44,
                                         elem_classes="webui-tool")
            c["extras_upscaler_2_visibility"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01,
                                                          label="Upscaler 2 visibility",
                                                          elem_id="upscale_upscaler_2_visibility")
        with gr.Column(scale=1, min_width=320, elem_id="upscale_results"):
            with gr.Row():
                c["run"] = gr.Button("Upscale", variant="primary", elem_id="upscale_run")
                c["interrupt"] = gr.Button("Interrupt", variant="stop", elem_id="upscale_interrupt")
            c["progress"] = gr.HTML(progress_html("Idle", active=False), elem_id="upscale_progress")
            c["gallery"] = gr.Gallery(label="Output", format="png", columns=2, height=448, object_fit="contain",
                                      preview=True, interactive=False, elem_id="upscale_gallery",
                                      buttons=["download", "fullscreen"])
            c["infotext"] = gr.Textbox(label="Parameters", lines=2, interactive=False, buttons=["copy"],
                                       elem_id="upscale_infotext")
            with gr.Row():
                c["send_back"] = gr.Button("Send to Upscale input", size="sm", elem_id="upscale_send_back")
                c["send_png_info"] = gr.Button("Send to PNG info", size="sm", elem_id="upscale_send_png_info")
            c["status"] = gr.HTML("", elem_id="upscale_status")
    c["job_id"] = gr.State(None)
    c["paths"] = gr.State([])
    return c


def _item(image: Any) -> Any:
    if image.path and Path(image.path).is_file():
        return image.path
    pil = image.image.copy()
    pil.info["parameters"] = image.infotext
    return pil


def wire(ctx: Any, registry: Registry, blocks: gr.Blocks) -> None:
    c = registry.section(SECTION)
    for key in ("single", "batch", "folder"):
        c[f"tab_{key}"].select(lambda k=key: k, outputs=[c["source"]], queue=False, api_visibility="private",
                               show_progress="hidden")
    inputs = {k: c[k] for k in ("source", "image", "files", "folder", "resize_mode", "upscaling_resize",
                                "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop", "upscaler_1",
                                "upscaler_2", "extras_upscaler_2_visibility")}
    outputs = [c[k] for k in ("progress", "gallery", "infotext", "job_id", "paths")]

    def run(request: gr.Request, **values: Any):
        try:
            images, names = collect_images(values.get("source") or "single", values.get("image"),
                                           values.get("files"), values.get("folder") or "")
            job = ctx.submit(upscale_request(values, images, names), client=session_id(request))
        except (RequestError, TypeError, ValueError, RuntimeError) as exc:
            yield {c["progress"]: progress_html(str(exc), error=True, active=False)}
            raise gr.Error(str(exc), print_exception=False) from None
        yield {c["job_id"]: job.id, c["progress"]: progress_html("Queued")}
        for snap in watch(ctx.worker, job):
            if snap.finished:
                break
            text = job.progress.text if job.state is JobState.RUNNING and job.progress.text else snap.text
            fraction = job.progress.step / job.progress.total_steps if job.progress.total_steps else 0.0
            yield {c["progress"]: progress_html(text, fraction)}
        if job.state in (JobState.FAILED, JobState.CANCELLED):
            message = job.error or job.state.value
            yield {c["progress"]: progress_html(f"{job.state.value.capitalize()}: {message}", error=True,
                                                active=False), c["job_id"]: None}
            if job.state is JobState.FAILED:
                raise gr.Error(message, print_exception=False)
            return
        images = list(job.result.images) if job.result else []
        done = "Interrupted" if job.state is JobState.INTERRUPTED else "Done"
        seconds = (job.finished_at or 0) - (job.started_at or 0)
        yield {c["progress"]: progress_html(f"{done}: {len(images)} image(s) in {seconds:.1f}s", 1.0, active=False),
               c["gallery"]: [_item(img) for img in images], c["infotext"]: images[0].infotext if images else "",
               c["job_id"]: None, c["paths"]: [img.path for img in images]}

    c["run"].click(run, inputs_kwargs=inputs, outputs=outputs, api_name="upscale", concurrency_limit=None,
                   show_progress="hidden")

    def interrupt(job_id: str | None) -> str:
        if job_id and ctx.worker.cancel(job_id):
            return status_html("Interrupting after this tile...", kind="busy")
        return status_html("Nothing of yours is running.")

    c["interrupt"].click(interrupt, inputs=[c["job_id"]], outputs=[c["status"]], api_name="upscale_interrupt",
                         concurrency_limit=None, show_progress="hidden")

    def refresh():
        ctx.refresh_models("upscaler")
        names = upscaler_names(ctx)
        return gr.update(choices=names), gr.update(choices=names)

    c["refresh"].click(refresh, outputs=[c["upscaler_1"], c["upscaler_2"]], api_visibility="private",
                       show_progress="hidden")

    def first_output(paths: list) -> Any:
        path = next((p for p in paths or [] if p), None)
        if path is None:
            raise gr.Error("Upscale an image first (results are sent from saved files)", print_exception=False)
        return path

    c["send_back"].click(lambda paths: _open(first_output(paths)), inputs=[c["paths"]], outputs=[c["image"]],
                         api_visibility="private", show_progress="hidden")
    png = registry.section("png_info") if any(k.startswith("png_info.") for k in registry) else {}
    if "image" in png and "tabs" in registry:
        c["send_png_info"].click(lambda paths: (first_output(paths), gr.Tabs(selected="png_info")),
                                 inputs=[c["paths"]], outputs=[png["image"], registry["tabs"]],
                                 api_visibility="private", show_progress="hidden")
