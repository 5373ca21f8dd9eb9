"""A1111-compatible generation routes: ``/sdapi/v1/txt2img``, ``img2img``, ``progress``, ``interrupt``, ``skip``,
``png-info``.  ControlNet units (``alwayson_scripts``) are checked against the catalog here too
(``controlnet.resolve_units``); the ``/controlnet/*`` routes are in ``controlnet.py``.

A synchronous A1111 call is just submit + wait on the shared worker queue: the wait runs in a
thread of our own limiter, so the event loop never blocks and the UI's thread pool is not used up.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request

from webui.api import controlnet, convert, convert_img2img
from webui.api.images import decode_image, encode_png_b64, preview_b64, text_items
from webui.api.routing import ApiError, Waiter, client_id
from webui.api.schemas import (ImageToImageResponse, Img2ImgRequest, PNGInfoRequest, PNGInfoResponse,
                               ProcessingRequest, ProgressResponse, TextToImageResponse, Txt2ImgRequest)
from webui.types import GenerationRequest, JobState, ModelKind, RequestError

PREFIX = "/sdapi/v1"
NO_VAE_NAMES = ("", "None", "Automatic")


def api_defaults(ctx) -> convert.ApiDefaults:
    return convert.ApiDefaults(clip_skip=int(ctx.options.get("CLIP_stop_at_last_layers")),
                               ip_adapter_models=controlnet.ip_adapter_names(ctx),
                               samplers=getattr(ctx, "samplers", None))


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
    request = request.with_changes(**changes) if changes else request
    return controlnet.resolve_units(ctx, request)


def prepare(ctx, converter, body: ProcessingRequest) -> tuple[convert.Txt2ImgConversion, GenerationRequest]:
    """Convert a request body and check its model names: decodes images and may import preprocessors,
    so routes call it in a worker thread (``waiter.run``), never on the event loop."""
    conv = converter(body, api_defaults(ctx))
    return conv, resolve_models(ctx, conv.request)


def finished_job_error(job) -> ApiError | None:
    """FAILED -> 500 like A1111's exception handler; CANCELLED -> 409 (removed before it ran)."""
    if job.state is JobState.FAILED:
        return ApiError(500, job.error or "generation failed", error="GenerationError")
    if job.state is JobState.CANCELLED:
        return ApiError(409, f"job {job.id} was cancelled before it started ({job.error or 'cancelled'})",
                        error="JobCancelled")
    return None


def detected_maps(request: GenerationRequest, result: Any) -> list[Any]:
    """The ControlNet maps sd-webui-controlnet appends after the images: one per enabled unit that asks."""
    units = [unit for unit in request.controlnet if unit.enabled]
    return [image for image, unit in zip(result.extra_images, units) if unit.save_detected_map]


def build_router(ctx, route_cls, waiter: Waiter) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=route_cls, strict_content_type=False, tags=["A1111 compatible"])

    def generation_response(job, body: ProcessingRequest, conv: convert.Txt2ImgConversion) -> dict[str, Any]:
        error = finished_job_error(job)
        if error is not None:
            raise error
        result = job.result
        images = [encode_png_b64(img.image, img.infotext) for img in result.images] if conv.send_images else []
        if conv.send_images and not ctx.options.get("control_net_no_detectmap"):
            images.extend(encode_png_b64(m) for m in detected_maps(job.request, result))
        info = convert.a1111_info(result, job.request, job_id=job.id, started_at=job.started_at,
                                  warnings=conv.warnings)
        if conv.keep_options and job.state is JobState.DONE:
            keep = dict(conv.keep_options)
            if "sd_model_checkpoint" in keep:
                keep["sd_model_checkpoint"] = job.request.checkpoint
            ctx.options.update(keep)  # override_settings_restore_afterwards: false
        return {"images": images, "parameters": convert.a1111_parameters(body), "info": json.dumps(info)}

    async def generate(converter, body: ProcessingRequest, request: Request) -> dict[str, Any]:
        conv, job_request = await waiter.run(prepare, ctx, converter, body)
        job = ctx.submit(job_request, client=client_id(request))
        await waiter.until_finished(job)
        return await waiter.run(generation_response, job, body, conv)

    @router.post("/txt2img", response_model=TextToImageResponse, summary="Generate images from a prompt",
                 responses={422: {"description": "invalid field value"}, 501: {"description": "feature not available"}})
    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await generate(convert.txt2img_request, body, request)

    @router.post("/img2img", response_model=ImageToImageResponse,
                 summary="Generate images from images (img2img, inpaint with a mask)",
                 responses={422: {"description": "invalid field value or image"},
                            501: {"description": "feature not available"}})
    async def img2img(body: Img2ImgRequest, request: Request):
        return await generate(convert_img2img.img2img_request, body, request)

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
