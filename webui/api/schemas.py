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


class Txt2ImgRequest(_Lenient):
    """``POST /sdapi/v1/txt2img`` (A1111 ``StableDiffusionTxt2ImgProcessingAPI``)."""

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
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
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
    force_task_id: Optional[str] = None
    sampler_index: Optional[str] = "Euler"
    script_name: Optional[str] = None
    script_args: Optional[list[Any]] = Field(default_factory=list)
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    alwayson_scripts: Optional[dict[str, Any]] = Field(default_factory=dict)
    infotext: Optional[str] = None


class TextToImageResponse(BaseModel):
    images: Optional[list[str]] = Field(default=None, description="Generated images, base64 PNG with infotext")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: seeds, infotexts, model...")


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
class JobSubmit(Txt2ImgRequest):
    """``POST /webui/v1/jobs``: the same fields as ``/sdapi/v1/txt2img`` plus the job type."""

    type: Literal["txt2img"] = Field(default="txt2img", description="job type; more come with img2img")


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
