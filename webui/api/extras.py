"""A1111 ``/sdapi/v1/extra-single-image`` and ``/extra-batch-images``: upscaling through the worker queue.

Same request/response shapes as A1111 (``upscaling_resize``, ``upscaler_1``..., answer ``html_info`` +
``image``/``images``); face restoration fields are accepted and ignored with no effect unless a plugin
provides a restorer.  Bad images or upscaler names are 422; a model that fails to load fails its job (500)
with the loader's message, and the server keeps serving.
"""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from webui.api.images import decode_image, encode_png_b64
from webui.api.routing import Waiter, client_id
from webui.types import RequestError, UpscaleRequest

PREFIX = "/sdapi/v1"


class ExtrasBase(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    resize_mode: int = Field(0, description="0: scale by upscaling_resize, 1: scale to upscaling_resize_w/h")
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBase):
    image: str = Field("", description="base64 image (PNG/JPEG/WebP/...)")


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBase):
    imageList: list[FileData] = Field(default_factory=list)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = ""
    image: Optional[str] = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str = ""
    images: list[str] = Field(default_factory=list)


def to_request(body: ExtrasBase, images: list, names: list[str]) -> UpscaleRequest:
    return UpscaleRequest(images=tuple(images), names=tuple(names), resize_mode=body.resize_mode,
                          upscaling_resize=body.upscaling_resize, upscaling_resize_w=body.upscaling_resize_w,
                          upscaling_resize_h=body.upscaling_resize_h, upscaling_crop=body.upscaling_crop,
                          upscaler_1=body.upscaler_1 or "None",
                          upscaler_2=None if (body.upscaler_2 or "None") == "None" else body.upscaler_2,
                          extras_upscaler_2_visibility=body.extras_upscaler_2_visibility, save_images=False)


def build_router(ctx, route_cls, waiter: Waiter) -> APIRouter:
    from webui.api.a1111 import finished_job_error
    from webui.generation.upscale_job import upscaler_entries
    from webui.generation.upscalers import find_upscaler

    router = APIRouter(prefix=PREFIX, route_class=route_cls, strict_content_type=False, tags=["A1111 compatible"])

    def check_names(request: UpscaleRequest) -> None:
        entries = upscaler_entries(ctx)
        find_upscaler(entries, request.upscaler_1)  # RequestError -> 422 now, not a failed job
        if request.upscaler_2:
            find_upscaler(entries, request.upscaler_2)

    async def run(request: UpscaleRequest, http: Request):
        check_names(request)
        job = ctx.submit(request, client=client_id(http))
        await waiter.until_finished(job)
        error = finished_job_error(job)
        if error is not None:
            raise error
        return job.result

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse,
                 summary="Upscale one image (A1111 Extras)", responses={422: {"description": "invalid field value"}})
    async def extra_single_image(body: ExtrasSingleImageRequest, http: Request):
        image = decode_image(body.image)
        result = await run(to_request(body, [image], ["image"]), http)
        if not result.images:
            return {"html_info": "interrupted", "image": None}
        first = result.images[0]
        return {"html_info": first.infotext, "image": await waiter.run(encode_png_b64, first.image, first.infotext)}

    @router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse,
                 summary="Upscale several images (A1111 Extras)", responses={422: {"description": "invalid field value"}})
    async def extra_batch_images(body: ExtrasBatchImagesRequest, http: Request):
        if not body.imageList:
            raise RequestError("imageList is empty; send [{\"data\": <base64>, \"name\": ...}, ...]")
        images = [decode_image(item.data, field=f"imageList[{i}]") for i, item in enumerate(body.imageList)]
        names = [item.name or f"image {i + 1}" for i, item in enumerate(body.imageList)]
        result = await run(to_request(body, images, names), http)

        def encode_all() -> list[str]:
            return [encode_png_b64(img.image, img.infotext) for img in result.images]

        return {"html_info": result.images[0].infotext if result.images else "",
                "images": await waiter.run(encode_all)}

    return router
