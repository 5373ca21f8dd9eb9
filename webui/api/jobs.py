"""Our own job API, ``/webui/v1``: submit returns at once; status, result, events, cancel, queue.

The UI and this API submit to the same worker queue (FIFO by submission time), so ``/queue`` shows
every job, whoever sent it.  The event stream is Server-Sent Events: one ``progress`` event per change
of the job (state, step, ETA; a base64 preview PNG at most every ``preview_interval_ms``), then one
``end`` event with the final state and the result's image URLs.
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from webui.api import convert, convert_img2img
from webui.api.a1111 import prepare
from webui.api.files import output_url
from webui.api.images import encode_png_b64, png_bytes, preview_b64
from webui.api.routing import ApiError, Waiter, client_id
from webui.api.schemas import JobInfo, JobSubmit, QueueResponse
from webui.types import GenerationResult, JobState

PREFIX = "/webui/v1"
KEEPALIVE_S = 10.0
ImagesMode = Literal["base64", "url", "none"]
# job type -> converter of the request body (the same conversions as /sdapi/v1/txt2img and /img2img)
CONVERTERS = {"txt2img": convert.txt2img_request, "img2img": convert_img2img.img2img_request}


def sse(event: str, data: Any, *, event_id: str | None = None) -> str:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"


def build_router(ctx, route_cls, waiter: Waiter) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=route_cls, strict_content_type=False, tags=["jobs"])

    def get_job(job_id: str):
        job = ctx.worker.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (unknown, or dropped from the history)")
        return job

    def result_payload(job, images: ImagesMode) -> dict[str, Any] | None:
        result = job.result
        if result is None:
            return None
        if not isinstance(result, GenerationResult):  # e.g. a model load: its summary dict
            return {"images": [], "parameters": {}, "info": convert.plain(result if isinstance(result, dict) else {})}
        entries = []
        if images != "none":
            for index, img in enumerate(result.images):
                entry = {"index": index, "seed": img.seed, "infotext": img.infotext,
                         "url": f"{PREFIX}/jobs/{job.id}/images/{index}",
                         "file_url": output_url(img.path, ctx.settings.outdir, PREFIX)}
                if images == "base64":
                    entry["png_base64"] = encode_png_b64(img.image, img.infotext)
                entries.append(entry)
        return {"images": entries, "parameters": convert.plain(result.parameters),
                "info": convert.plain(result.info), "interrupted": result.interrupted}

    def describe(job, *, position: int | None = None, images: ImagesMode | None = None) -> dict[str, Any]:
        if position is None and not job.state.finished:
            position = ctx.worker.queue_position(job)
        data = convert.job_info(job, position, prefix=PREFIX)
        if images is not None and job.state.finished:
            data["result"] = result_payload(job, images)
        return data

    @router.post("/jobs", status_code=202, response_model=JobInfo,
                 summary="Queue a job; returns its id at once",
                 responses={422: {"description": "invalid field value"}, 501: {"description": "feature not available"}})
    async def submit(body: JobSubmit, request: Request):
        conv, job_request = await waiter.run(prepare, ctx, CONVERTERS[body.type], body)  # off the event loop
        job = ctx.submit(job_request, client=client_id(request))
        data = describe(job)
        data["warnings"] = list(conv.warnings)
        return data

    @router.get("/jobs", response_model=list[JobInfo], summary="Known jobs (queued, running and recent), oldest first")
    def list_jobs(state: JobState | None = None, limit: int = Query(100, ge=1, le=1000)):
        jobs = [j for j in ctx.worker.jobs() if state is None or j.state is state]
        return [describe(j) for j in jobs[-limit:]]

    @router.get("/jobs/{job_id}", response_model=JobInfo, summary="Status, progress and (when finished) result",
                responses={404: {"description": "unknown job"}})
    def get(job_id: str, images: ImagesMode = "base64"):
        return describe(get_job(job_id), images=images)

    @router.get("/jobs/{job_id}/images/{index}", response_class=Response, summary="One result image as PNG",
                responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such image"}})
    def job_image(job_id: str, index: int):
        result = get_job(job_id).result
        if not isinstance(result, GenerationResult) or not 0 <= index < len(result.images):
            raise ApiError(404, f"job {job_id!r} has no image {index}")
        image = result.images[index]
        return Response(png_bytes(image.image, image.infotext), media_type="image/png")

    @router.delete("/jobs/{job_id}", response_model=JobInfo,
                   summary="Cancel: a queued job is removed, a running one stops after the current step",
                   responses={404: {"description": "unknown job"}, 409: {"description": "already finished"}})
    def cancel(job_id: str):
        job = get_job(job_id)
        if job.state.finished or not ctx.worker.cancel(job_id):
            raise ApiError(409, f"job {job_id!r} already finished ({job.state.value})", error="JobFinished")
        return describe(job)

    @router.get("/queue", response_model=QueueResponse, summary="The running job, the queue in order, recent history")
    def queue(history: int = Query(0, ge=0, le=500)):
        running = ctx.worker.current()
        queued = ctx.worker.queued()
        data: dict[str, Any] = {
            "running": describe(running, position=0) if running is not None and not running.state.finished else None,
            "queued": [describe(job, position=i) for i, job in enumerate(queued, start=1)],
            "history": [],
        }
        if history:
            done = [j for j in ctx.worker.jobs() if j.state.finished]
            data["history"] = [describe(j) for j in done[-history:]]
        return data

    @router.get("/jobs/{job_id}/events", summary="Server-Sent Events: progress (+ previews) until the job ends",
                responses={200: {"content": {"text/event-stream": {}}}, 404: {"description": "unknown job"}})
    async def events(job_id: str, preview_interval_ms: int = Query(500, ge=0, le=60_000), previews: bool = True):
        job = get_job(job_id)
        interval = preview_interval_ms / 1000.0

        async def stream():
            sent_preview_step, sent_preview_at = None, 0.0
            yield "retry: 2000\n\n"
            while True:
                version = job.version
                if job.state.finished:
                    data = await waiter.run(lambda: describe(job, images="url"))
                    yield sse("end", data, event_id=str(version))
                    return
                data = describe(job)
                progress = job.progress
                now = time.monotonic()
                if (previews and progress.preview is not None and progress.preview_step != sent_preview_step
                        and now - sent_preview_at >= interval):
                    data["preview"] = await waiter.run(preview_b64, progress.preview)
                    data["preview_step"] = progress.preview_step
                    sent_preview_step, sent_preview_at = progress.preview_step, now
                yield sse("progress", data, event_id=str(version))
                while await waiter.next_change(job, version, KEEPALIVE_S) == version and not job.state.finished:
                    yield ": keepalive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router
