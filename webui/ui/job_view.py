"""Following a generation job in a tab: progress, live preview, Interrupt / Skip, and the final gallery.

Shared by txt2img, img2img and inpaint: each tab submits its own request type and hands the job here.
The components ``c`` are a tab's section (``progress``, ``preview``, ``gallery``, ``infotext``, ``seed_used``,
``job_id``, ``infotexts``, ``seeds``, ``selected``, ``action_status``, ``interrupt``, ``skip``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import gradio as gr

from webui.types import JobState
from webui.ui import lora_stack
from webui.ui.common import session_id, status_html
from webui.ui.progress import progress_html, watch

RESULT_OUTPUTS = ("progress", "preview", "gallery", "infotext", "seed_used", "job_id", "infotexts", "seeds",
                  "selected", "action_status")


def _gallery_item(ctx: Any, image: Any) -> Any:
    """The saved file when Gradio may serve it (keeps its PNG metadata), else the PIL image + infotext."""
    if image.path:
        path = Path(image.path)
        try:
            path.resolve().relative_to(Path(ctx.settings.outdir).resolve())
            if path.is_file():
                return str(path)
        except ValueError:
            pass
    pil = image.image.copy()
    pil.info["parameters"] = image.infotext
    return pil


def _seed_html(seeds: list[int], section: str) -> str:
    if not seeds:
        return ""
    text = f"Seed: {seeds[0]}" if len(set(seeds)) == 1 else f"Seeds: {seeds[0]} … {seeds[-1]}"
    return f'<div class="webui-status webui-status-info" id="{section}_seed_value">{text}</div>'


def finish_updates(ctx: Any, c: dict[str, Any], job: Any, text: str, section: str) -> dict[str, Any]:
    """The updates of a generation tab ``section`` (components ``c``) when its ``job`` has ended."""
    result = job.result
    images = list(result.images) if result is not None else []
    seeds = [img.seed for img in images]
    infotexts = [img.infotext for img in images]
    if job.state is JobState.INTERRUPTED:
        text = f"Interrupted: kept {len(images)} image(s)"
    elif job.state is JobState.DONE and job.started_at and job.finished_at:
        text = f"Done: {len(images)} image(s) in {job.finished_at - job.started_at:.1f}s"
    updates = {
        c["progress"]: progress_html(text, 1.0 if job.state is JobState.DONE else 0.0, active=False),
        c["preview"]: gr.update(visible=False, value=None),
        c["job_id"]: None,
        c["action_status"]: "",
    }
    if result is not None and (notes := lora_stack.result_notes(result.info)):
        updates[c["action_status"]] = notes
    if images or job.state in (JobState.DONE, JobState.INTERRUPTED):
        updates.update({
            c["gallery"]: [_gallery_item(ctx, img) for img in images] + [
                (extra, f"ControlNet {n} map") for n, extra in enumerate(result.extra_images if result else ())],
            c["infotext"]: infotexts[0] if infotexts else "",
            c["seed_used"]: _seed_html(seeds, section),
            c["infotexts"]: infotexts,
            c["seeds"]: seeds,
            c["selected"]: 0,
        })
    return updates


def follow_job(ctx: Any, c: Mapping[str, Any], job: Any, section: str) -> Iterator[dict[Any, Any]]:
    """Updates for a submitted job until it ends: queue position, step, preview, then the gallery."""
    yield {c["job_id"]: job.id, c["progress"]: progress_html("Queued"), c["action_status"]: "",
           c["preview"]: gr.update(visible=True, value=None)}
    last = None
    for snap in watch(ctx.worker, job):
        last = snap
        if snap.finished:
            break
        update = {c["progress"]: progress_html(snap.text, snap.fraction)}
        if snap.preview is not None:
            update[c["preview"]] = snap.preview
        yield update
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        message = job.error or job.state.value
        yield {**finish_updates(ctx, c, job, last.text if last else message, section),
               c["progress"]: progress_html(f"{job.state.value.capitalize()}: {message}", error=True, active=False)}
        if job.state is JobState.FAILED:
            raise gr.Error(message, print_exception=False)
        return
    yield finish_updates(ctx, c, job, last.text if last else "Done", section)


def wire_job_controls(ctx: Any, c: Mapping[str, Any], section: str) -> None:
    """Interrupt / Skip for this session's job (API ``/<section>_interrupt``, ``/<section>_skip``)."""

    def own_job(job_id: str | None, request: gr.Request) -> Any:
        session = session_id(request)
        job = ctx.worker.get(job_id) if job_id else None
        if job is None or job.client != session or job.state.finished:
            mine = [j for j in ctx.worker.jobs() if j.client == session and not j.state.finished]
            mine.sort(key=lambda j: (j.state is not JobState.RUNNING, j.number))
            job = mine[0] if mine else None
        return job

    def interrupt(job_id: str | None, request: gr.Request) -> str:
        job = own_job(job_id, request)
        if job is None:
            return status_html("Nothing of yours is running.")
        ctx.worker.cancel(job.id)
        return status_html("Interrupting...", kind="busy")

    def skip(job_id: str | None, request: gr.Request) -> str:
        job = own_job(job_id, request)
        if job is None or not ctx.worker.skip(job.id):
            return status_html("Nothing of yours is running.")
        return status_html("Skipping this batch...", kind="busy")

    c["interrupt"].click(interrupt, inputs=[c["job_id"]], outputs=[c["action_status"]],
                         api_name=f"{section}_interrupt", concurrency_limit=None, show_progress="hidden")
    c["skip"].click(skip, inputs=[c["job_id"]], outputs=[c["action_status"]], api_name=f"{section}_skip",
                    concurrency_limit=None, show_progress="hidden")
