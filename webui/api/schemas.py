"""Pydantic models of the HTTP API: A1111 v1.10 ``/sdapi/v1`` shapes and our ``/webui/v1`` job API.

A1111 generates its request models from ``StableDiffusionProcessing*`` signatures, so every field is
optional and ``null`` means "the default"; unknown fields are ignored.  The defaults below are A1111's
(``steps`` 50, ``sampler_index`` "Euler", ``save_images`` False...), not the UI's.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, protected_namespaces=())


class ProcessingRequest(_Lenient):
    """Fields every A1111 generation request has (``StableDiffusionProcessing`` + the API's own)."""

    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: Optional[int] = -1
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    sampler_name: Optional[str] = None
    scheduler: Optional[str] = None
    batch_size: Optional[int] = 1
    n_iter: Optional[int] = 1
    steps: Optional[int] = 50
    cfg_scale: Optional[float] = 7.0
    width: Optional[int] = 512
    height: Optional[int] = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = 0.75
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: Optional[bool] = False
    comments: Optional[dict[str, Any]] = None
    force_task_id: Optional[str] = None
    sampler_index: Optional[str] = "Euler"
    script_name: Optional[str] = None
    script_args: Optional[list[Any]] = Field(default_factory=list)
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    alwayson_scripts: Optional[dict[str, Any]] = Field(
        default_factory=dict, description='{"controlnet": {"args": [unit, ...]}} (sd-webui-controlnet units); '
                                          'img2img also {"soft inpainting": {"args": [enabled, schedule bias, '
                                          'preservation strength, transition contrast boost, mask influence, '
                                          'difference threshold, difference contrast]}}')
    infotext: Optional[str] = None


class Txt2ImgRequest(ProcessingRequest):
    """``POST /sdapi/v1/txt2img`` (A1111 ``StableDiffusionTxt2ImgProcessingAPI``)."""

    firstpass_image: Optional[str] = None
    enable_hr: Optional[bool] = False
    firstphase_width: Optional[int] = 0
    firstphase_height: Optional[int] = 0
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""


class Img2ImgRequest(ProcessingRequest):
    """``POST /sdapi/v1/img2img`` (A1111 ``StableDiffusionImg2ImgProcessingAPI``; defaults are A1111's)."""

    init_images: Optional[list[Any]] = Field(default=None, description="base64 images, optionally data: URLs")
    resize_mode: Optional[int] = Field(default=0, description="0 just resize, 1 crop and resize, 2 resize and fill, "
                                                              "3 just resize (latent upscale)")
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = Field(default=None, description="base64 mask: white = change (inpaint)")
    mask_blur_x: Optional[int] = 4
    mask_blur_y: Optional[int] = 4
    mask_blur: Optional[int] = None
    mask_round: Optional[bool] = True
    inpainting_fill: Optional[int] = Field(default=0, description="0 fill, 1 original, 2 latent noise, "
                                                                  "3 latent nothing")
    inpaint_full_res: Optional[bool] = Field(default=True, description="true: inpaint only the masked area")
    inpaint_full_res_padding: Optional[int] = 0
    inpainting_mask_invert: Optional[int] = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: Optional[bool] = Field(default=False, description="echo init_images/mask in parameters")


class TextToImageResponse(BaseModel):
    images: Optional[list[str]] = Field(default=None, description="Generated images, base64 PNG with infotext")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: seeds, infotexts, model...")


class ImageToImageResponse(TextToImageResponse):
    """``/sdapi/v1/img2img`` answer; ``parameters.init_images``/``mask`` are null unless include_init_images."""


# ------------------------------------------------------------------ sd-webui-controlnet
class ControlNetUnitRequest(_Lenient):
    """One unit of ``alwayson_scripts.controlnet.args`` (sd-webui-controlnet API field names)."""

    enabled: Optional[bool] = True
    image: Any = Field(default=None, description='base64 image, or {"image": b64, "mask": b64}')
    input_image: Any = Field(default=None, description="old name of image")
    mask: Optional[str] = None
    mask_image: Any = None
    module: Optional[str] = Field(default="none", description="preprocessor (see /controlnet/module_list)")
    model: Optional[str] = Field(default="None", description='ControlNet or IP-Adapter, "name [hash]" or name')
    weight: Optional[float] = 1.0
    resize_mode: Optional[int | str] = Field(default=1, description="0/1/2 or Just Resize / Crop and Resize / "
                                                                    "Resize and Fill")
    low_vram: Optional[bool] = False
    lowvram: Optional[bool] = None
    processor_res: Optional[int] = -1
    threshold_a: Optional[float] = -1
    threshold_b: Optional[float] = -1
    guidance_start: Optional[float] = 0.0
    guidance_end: Optional[float] = 1.0
    guessmode: Optional[bool] = None
    control_mode: Optional[int | str] = Field(default=0, description="0/1/2 or Balanced / My prompt is more "
                                                                     "important / ControlNet is more important")
    pixel_perfect: Optional[bool] = False
    save_detected_map: Optional[bool] = Field(
        default=True, description="append this unit's preprocessed map to the returned images")


class ControlNetDetectRequest(_Lenient):
    """``POST /controlnet/detect``: run a preprocessor on images (sd-webui-controlnet)."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list, description="base64 images")
    controlnet_masks: Optional[list[Any]] = None
    controlnet_processor_res: Optional[int] = 512
    controlnet_threshold_a: Optional[float] = Field(default=None, description="omitted or -1: the module's default")
    controlnet_threshold_b: Optional[float] = None
    low_vram: Optional[bool] = False


class ControlNetDetectResponse(BaseModel):
    images: list[str] = Field(description="base64 PNG control maps, one per input image")
    info: str = "Success"


class PNGInfoRequest(_Lenient):
    image: str = Field(description="base64 image (PNG/JPEG/WebP), optionally a data: URL")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: Optional[str] = None
    textinfo: Optional[str] = None
    current_task: Optional[str] = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_name: str
    filename: str


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    model_name: Optional[str] = None
    model_path: Optional[str] = None
    model_url: Optional[str] = None
    scale: Optional[float] = None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class EmbeddingItem(BaseModel):
    step: Optional[int] = None
    sd_checkpoint: Optional[str] = None
    sd_checkpoint_name: Optional[str] = None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


# ------------------------------------------------------------------ /webui/v1 job API
class JobSubmit(Img2ImgRequest, Txt2ImgRequest):
    """``POST /webui/v1/jobs``: the fields of ``/sdapi/v1/txt2img`` or ``/sdapi/v1/img2img``, plus the job type.

    One model for both kinds (so a body without ``type`` stays a txt2img job); each kind reads its own fields.
    """

    type: Literal["txt2img", "img2img"] = Field(default="txt2img", description="job type: txt2img or img2img")


class JobImage(BaseModel):
    index: int
    seed: int
    infotext: str
    url: str = Field(description="PNG of this image (with infotext), served while the job is in history")
    file_url: Optional[str] = Field(default=None, description="the saved file under outputs, if it was saved")
    png_base64: Optional[str] = None


class JobResult(BaseModel):
    images: list[JobImage]
    parameters: dict[str, Any]
    info: dict[str, Any]
    interrupted: bool = False


class JobInfo(BaseModel):
    id: str
    kind: str
    client: Optional[str] = None
    state: Literal["queued", "running", "done", "interrupted", "cancelled", "failed"]
    number: int = Field(description="submission order (FIFO)")
    position: Optional[int] = Field(default=None, description="0 running, 1 next, ...; null when finished")
    submitted_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    progress: float
    step: int
    total_steps: int
    batch_index: int
    batch_count: int
    eta_seconds: Optional[float] = None
    text: str = ""
    error: Optional[str] = None
    links: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list, description="request fields that were ignored")
    result: Optional[JobResult] = None


class QueueResponse(BaseModel):
    running: Optional[JobInfo] = None
    queued: list[JobInfo]
    history: list[JobInfo] = Field(default_factory=list)
