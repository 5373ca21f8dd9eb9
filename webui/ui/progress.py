"""Job polling -> progress text, bar and live preview for the UI.

``watch(worker, job)`` blocks on ``job.wait_for_change`` (no busy polling) and yields a ``Snapshot``
each time something a user can see changed: the queue position, step, batch, ETA or the preview image.
The txt2img handler turns snapshots into component updates; nothing here imports Gradio.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Iterator

from webui.types import JobState, Progress


@dataclass(frozen=True)
class Snapshot:
    state: JobState
    text: str
    fraction: float
    preview: Any = None  # PIL image, only set when it changed since the last snapshot
    finished: bool = False


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def describe_progress(progress: Progress) -> str:
    """``Step 3/20 · Batch 1/2 · ETA 4s``; before the first step, the handler's note ("loading ...")."""
    if progress.text and not progress.step:
        return progress.text[:1].upper() + progress.text[1:]
    parts = []
    if progress.total_steps:
        parts.append(f"Step {progress.step}/{progress.total_steps}")
    if progress.batch_count:
        parts.append(f"Batch {min(progress.batch_index + 1, progress.batch_count)}/{progress.batch_count}")
    eta = format_eta(progress.eta_seconds)
    if eta:
        parts.append(f"ETA {eta}")
    return " · ".join(parts) or "Starting..."


def describe(state: JobState, progress: Progress, position: int | None, error: str | None = None) -> str:
    if state is JobState.QUEUED:
        return f"Queued: position {position}" if position else "Queued"
    if state is JobState.RUNNING:
        return describe_progress(progress)
    if state is JobState.DONE:
        return "Done"
    if state is JobState.INTERRUPTED:
        return "Interrupted"
    if state is JobState.CANCELLED:
        return f"Cancelled: {error}" if error else "Cancelled"
    return f"Failed: {error}" if error else "Failed"


def progress_html(text: str, fraction: float = 0.0, *, error: bool = False, active: bool = True) -> str:
    """The bar above the live preview; ``text`` is escaped."""
    pct = max(0.0, min(1.0, fraction)) * 100
    classes = "webui-progress" + (" webui-progress-error" if error else "") + ("" if active else " webui-progress-idle")
    return (
        f'<div class="{classes}" role="progressbar" aria-valuenow="{pct:.0f}" aria-valuemin="0" '
        f'aria-valuemax="100"><div class="webui-progress-fill" style="width:{pct:.1f}%"></div>'
        f'<span class="webui-progress-text">{html.escape(text)}</span></div>'
    )


def watch(worker: Any, job: Any, *, poll_s: float = 0.5) -> Iterator[Snapshot]:
    """Yield a ``Snapshot`` whenever the visible state of ``job`` changes; the last one has ``finished``.

    ``worker.queue_position`` is re-read every ``poll_s`` because other jobs finishing do not bump this
    job's version.
    """
    last_text = None
    last_preview_key: tuple[int, int] | None = None
    while True:
        seen = job.version  # read first: a change after this line wakes the wait below at once
        state = job.state
        progress = job.progress
        if state.finished:
            yield Snapshot(state, describe(state, progress, None, job.error), 1.0, finished=True)
            return
        position = worker.queue_position(job) if state is JobState.QUEUED else None
        text = describe(state, progress, position, job.error)
        preview = None
        if progress.preview is not None:
            key = (id(progress.preview), progress.preview_step)
            if key != last_preview_key:
                last_preview_key = key
                preview = progress.preview
        if text != last_text or preview is not None:
            last_text = text
            fraction = progress.fraction if state is JobState.RUNNING else 0.0
            yield Snapshot(state, text, fraction, preview)
        job.wait_for_change(seen, timeout=poll_s)
