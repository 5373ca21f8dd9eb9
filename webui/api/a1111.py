"""A1111-compatible generation routes: ``/sdapi/v1/txt2img``, ``progress``, ``interrupt``, ``skip``,
``png-info``, and honest 501 answers for what this version does not have yet (img2img, extras).

A synchronous A1111 call is just submit + wait on the shared worker queue: the wait runs in a
thread of our own limiter, so the event loop never blocks and the UI's thread pool is not used up.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request

from webui.api import convert
from webui.api.images import decode_image, encode_png_b64, preview_b64, text_items
from webui.api.routing import ApiError, Waiter, client_id
from webui.api.schemas import PNGInfoRequest, PNGInfoResponse, ProgressResponse, TextToImageResponse, Txt2ImgRequest
from webui.types import GenerationRequest, JobState, ModelKind, RequestError

PREFIX = "/sdapi/v1"
NO_VAE_NAMES = ("", "None", "Automatic")

NOT_YET = {
    "/img2img": "img2img (and inpainting) is not available yet in this version of the WebUI; txt2img is.",
}


def api_defaults(ctx) -> convert.ApiDefaults:
    return convert.ApiDefaults(clip_skip=int(ctx.options.get("CLIP_stop_at_last_layers")))


def resolve_models(ctx, request: GenerationRequest) -> GenerationRequest:
    """Check override checkpoint/VAE names against the catalog now, so a typo is a 422, not a failed job."""
    changes: dict[str, Any] = {}
    if request.checkpoint:
        try:
            record = ctx.catalog.get(ModelKind.CHECKPOINT.value, request.checkpoint)
        except LookupError as exc:
            raise RequestError(f"override_settings.sd_model_checkpoint: {exc} (see /sdapi/v1/sd-models)") from None
        changes["checkpoint"] = record.name
    if request.vae and request.vae not in NO_VAE_NAMES:
        try:
            record = ctx.catalog.get(ModelKind.VAE.value, request.vae)
        except LookupError as exc:
            raise RequestError(
                f"override_settings.sd_vae: {exc} Use Automatic, None or a name from /sdapi/v1/sd-vae.") from None
        changes["vae"] = record.name
    return request.with_changes(**changes) if changes else request


def finished_job_error(job) -> ApiError | None:
    """FAILED -> 500 like A1111's exception handler; CANCELLED -> 409 (removed before it ran)."""
    if job.state is JobState.FAILED:
        return ApiError(500, job.error or "generation failed", error="GenerationError")
    if job.state is JobState.CANCELLED:
        return ApiError(409, f"job {job.id} was cancelled before it started ({job.error or 'cancelled'})",
                        error="JobCancelled")
    return None


def build_router(ctx, route_cls, waiter: Waiter) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=route_cls, strict_content_type=False, tags=["A1111 compatible"])

    def txt2img_response(job, body: Txt2ImgRequest, conv: convert.Txt2ImgConversion) -> dict[str, Any]:
        error = finished_job_error(job)
        if error is not None:
            raise error
        result = job.result
        images = [encode_png_b64(img.image, img.infotext) for img in result.images] if conv.send_images else []
        info = convert.a1111_info(result, job.request, job_id=job.id, started_at=job.started_at,
                                  warnings=conv.warnings)
        if conv.keep_options and job.state is JobState.DONE:
            keep = dict(conv.keep_options)
            if "sd_model_checkpoint" in keep:
                keep["sd_model_checkpoint"] = job.request.checkpoint
            ctx.options.update(keep)  # override_settings_restore_afterwards: false
        return {"images": images, "parameters": convert.a1111_parameters(body), "info": json.dumps(info)}

    @router.post("/txt2img", response_model=TextToImageResponse, summary="Generate images from a prompt",
                 responses={422: {"description": "invalid field value"}, 501: {"description": "feature not available"}})
    async def txt2img(body: Txt2ImgRequest, request: Request):
        conv = convert.txt2img_request(body, api_defaults(ctx))
        job = ctx.submit(resolve_models(ctx, conv.request), client=client_id(request))
        await waiter.until_finished(job)
        return await waiter.run(txt2img_response, job, body, conv)

    for path, message in NOT_YET.items():
        router.add_api_route(path, _no_body(message), methods=["POST"], summary=f"{path[1:]}: not available yet",
                             responses={501: {"description": message}}, name=f"sdapi{path.replace('-', '_')}")

    @router.post("/png-info", response_model=PNGInfoResponse, summary="Read the infotext of an image")
    def png_info(body: PNGInfoRequest):
        from webui.io.metadata import parse_infotext, read_infotext

        image = decode_image(body.image)
        text = read_infotext(image) or ""
        return {"info": text, "items": text_items(image), "parameters": convert.plain(parse_infotext(text))}

    @router.get("/progress", response_model=ProgressResponse, summary="Progress of the running job")
    def progress(skip_current_image: bool = False):
        job = ctx.worker.current()
        data = convert.a1111_progress(job)
        preview = job.progress.preview if job is not None and job.state is JobState.RUNNING else None
        if preview is not None and not skip_current_image:
            data["current_image"] = preview_b64(preview)
        return data

    @router.post("/interrupt", summary="Stop the running job after this step (finished images are kept)")
    def interrupt():
        ctx.worker.interrupt()
        return {}

    @router.post("/skip", summary="Skip the current batch of the running job")
    def skip():
        ctx.worker.skip()
        return None

    return router


def _no_body(message: str):
    def endpoint() -> None:  # the body is read (size-limited) but not parsed: there is nothing to do with it
        raise ApiError(501, message, error="NotImplemented")

    return endpoint
