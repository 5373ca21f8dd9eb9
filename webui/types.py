"""Frozen, keyword-only request and result types shared by the UI, the API and the worker.

Every job that reaches the accelerator is described by one of these objects; nothing else travels
from a client to the worker thread.  Validation lives here so that the UI and the API report the
same message for the same mistake.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, replace
from typing import Any


class RequestError(ValueError):
    """A request a user sent is invalid; the message says which field and what to do."""


class ModelKind(str, enum.Enum):
    CHECKPOINT = "checkpoint"
    VAE = "vae"
    LORA = "lora"
    CONTROLNET = "controlnet"
    IP_ADAPTER = "ip_adapter"
    CLIP_VISION = "clip_vision"
    TEXT_ENCODER = "text_encoder"  # split (ComfyUI-style) text encoders: CLIP-L, T5-XXL, Qwen2.5-VL
    EMBEDDING = "embedding"
    UPSCALER = "upscaler"
    UNKNOWN = "unknown"


class Arch(str, enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"
    SD3 = "sd3"  # SD3 / SD3.5 (MMDiT)
    FLUX = "flux"  # Flux.1 dev / schnell / Kontext (and Chroma-style derivatives where diffusers supports them)
    QWEN_IMAGE = "qwen_image"  # Qwen-Image / Qwen-Image-Edit
    UNKNOWN = "unknown"


class Variant(str, enum.Enum):
    NORMAL = "normal"
    INPAINT = "inpaint"
    INSTRUCT_PIX2PIX = "instruct_pix2pix"
    DEPTH = "depth"
    EDIT = "edit"  # instruction-edit DiT with reference image(s): Flux Kontext, Qwen-Image-Edit


class Prediction(str, enum.Enum):
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


@dataclass(frozen=True, kw_only=True)
class LoraRef:
    """One entry of a LoRA stack: which file (catalog name) and how strongly."""

    name: str
    weight: float = 1.0
    te_weight: float | None = None  # None: same as weight
    block_weights: str | None = None  # LBW preset name ("MIDD") or "1,0,..." vector; None: all blocks 1

    def __post_init__(self) -> None:
        if not self.name:
            raise RequestError("LoRA name is empty")
        if self.block_weights is not None and not str(self.block_weights).strip():
            object.__setattr__(self, "block_weights", None)
        for label, value in (("weight", self.weight), ("text-encoder weight", self.te_weight)):
            if value is not None and not -4.0 <= value <= 4.0:
                raise RequestError(f"LoRA {self.name!r}: {label} {value} is outside -4..4")


MAX_SIDE = 4096
MAX_STEPS = 500
MAX_BATCH = 16
MAX_ITER = 100
MAX_PROMPT_CHARS = 4096


def check_image(image: Any, label: str, *, max_side: int = 8192, advice: str = "Downscale it first.") -> None:
    """A usable PIL image: has a size, is not empty, no side longer than ``max_side``."""
    size = getattr(image, "size", None)
    if not size or len(size) != 2:
        raise RequestError(f"{label}: not an image")
    width, height = size
    if width < 1 or height < 1:
        raise RequestError(f"{label}: empty image ({width}x{height})")
    if max(width, height) > max_side:
        raise RequestError(f"{label} is {width}x{height}; the largest accepted side is {max_side} pixels. {advice}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}")


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """A txt2img job; ``webui.image_requests.Img2ImgRequest`` extends it for img2img / edit / inpaint.

    ``checkpoint``/``vae`` are catalog titles; ``None`` means "whatever is selected now".
    ``seed == -1`` means random; the worker resolves it before running and reports the real seed.
    """

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    schedule: str = "Automatic"
    width: int = 512
    height: int = 512
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    checkpoint: str | None = None
    vae: str | None = None
    loras: tuple[LoraRef, ...] = ()
    save_images: bool = True
    preview_every: int | None = None  # None: the live-preview option; 0 disables previews for this job
    styles: tuple[str, ...] = ()
    extra: tuple[tuple[str, Any], ...] = field(default=())  # plugin/script fields, hashable
    # hires fix (A1111 names); see webui.generation.hires
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0  # 0: same as steps
    hr_resize_x: int = 0  # 0 and 0: use hr_scale
    hr_resize_y: int = 0
    denoising_strength: float = 0.7
    hr_sampler_name: str | None = None  # None: same as sampler
    hr_scheduler: str | None = None
    hr_prompt: str = ""  # "": same as prompt
    hr_negative_prompt: str = ""
    # image conditioning (webui.image_requests): ControlNet units and IP-Adapter reference images
    controlnet: tuple[Any, ...] = ()  # ControlUnit
    ip_adapters: tuple[Any, ...] = ()  # ReferenceImages

    job_kind = "txt2img"  # class attribute, not a field

    def __post_init__(self) -> None:
        if len(self.prompt) > MAX_PROMPT_CHARS or len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise RequestError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        for side_name in ("width", "height"):
            side = getattr(self, side_name)
            if side % 8:
                raise RequestError(
                    f"{side_name} {side} is not a multiple of 8; use {side - side % 8} or {side - side % 8 + 8}"
                )
            _check_range(side_name, side, 64, MAX_SIDE)
        _check_range("steps", self.steps, 1, MAX_STEPS)
        _check_range("cfg_scale", self.cfg_scale, 0.0, 30.0)
        _check_range("batch_size", self.batch_size, 1, MAX_BATCH)
        _check_range("n_iter", self.n_iter, 1, MAX_ITER)
        _check_range("clip_skip", self.clip_skip, 1, 12)
        _check_range("subseed_strength", self.subseed_strength, 0.0, 1.0)
        if self.preview_every is not None:
            _check_range("preview_every", self.preview_every, 0, MAX_STEPS)
        if self.seed < -1 or self.seed >= 2**32:
            raise RequestError(f"seed must be -1 (random) or 0..{2**32 - 1}, got {self.seed}")
        if self.subseed < -1 or self.subseed >= 2**32:
            raise RequestError(f"subseed must be -1 (random) or 0..{2**32 - 1}, got {self.subseed}")
        if not isinstance(self.loras, tuple):
            object.__setattr__(self, "loras", tuple(self.loras))
        if not isinstance(self.styles, tuple):
            object.__setattr__(self, "styles", tuple(self.styles))
        for name, limit in (("controlnet", 8), ("ip_adapters", 8)):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value or ()))
            if len(getattr(self, name)) > limit:
                raise RequestError(f"at most {limit} {name} entries per job")
        if self.enable_hr:
            _validate_hires(self)

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter

    def with_changes(self, **changes: Any) -> "GenerationRequest":
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


LATENT_UPSCALE_MODES = ("Latent", "Latent (nearest-exact)", "Latent (bicubic antialiased)")


def _validate_hires(request: "GenerationRequest") -> None:
    _check_range("hr_scale", request.hr_scale, 1.0, 4.0)
    _check_range("hr_second_pass_steps", request.hr_second_pass_steps, 0, MAX_STEPS)
    _check_range("denoising_strength", request.denoising_strength, 0.01, 1.0)
    for name in ("hr_resize_x", "hr_resize_y"):
        value = getattr(request, name)
        if value:
            _check_range(name, value, 64, MAX_SIDE)
    if len(request.hr_prompt) > MAX_PROMPT_CHARS or len(request.hr_negative_prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"hires prompt is longer than {MAX_PROMPT_CHARS} characters")
    if not request.hr_upscaler:
        raise RequestError("hr_upscaler is empty; use 'Latent' or an upscaler name")


@dataclass(frozen=True, kw_only=True)
class LoadModelRequest:
    """Make ``checkpoint`` (+ ``vae``) the loaded model, e.g. from the checkpoint dropdown or options API."""

    checkpoint: str
    vae: str | None = None

    job_kind = "load_model"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    INTERRUPTED = "interrupted"  # stopped by the user; finished images are kept
    CANCELLED = "cancelled"  # removed before it started
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True, kw_only=True)
class Progress:
    """A snapshot of a running job. ``preview`` is a PIL image or None."""

    step: int = 0
    total_steps: int = 0
    batch_index: int = 0  # 0-based index of the batch (one of n_iter) being sampled
    batch_count: int = 0
    eta_seconds: float | None = None
    preview: Any = None
    preview_step: int = 0
    text: str = ""

    @property
    def fraction(self) -> float:
        if not self.total_steps or not self.batch_count:
            return 0.0
        done = self.batch_index * self.total_steps + self.step
        return min(1.0, done / (self.total_steps * self.batch_count))


@dataclass(frozen=True, kw_only=True)
class GeneratedImage:
    image: Any  # PIL.Image.Image
    seed: int
    infotext: str
    path: str | None = None  # where it was saved, if it was


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    parameters: dict[str, Any]  # the request as plain data (A1111 "parameters")
    info: dict[str, Any]  # A1111 "info": seeds, infotexts, model, ...
    interrupted: bool = False
    extra_images: tuple[Any, ...] = ()  # shown with the result, not saved: e.g. ControlNet preprocessed maps


MAX_UPSCALE_INPUT_SIDE = 8192
UPSCALE_RESIZE_MODES = (0, 1)  # 0: scale by factor, 1: scale to width x height (A1111 resize_mode)


@dataclass(frozen=True, kw_only=True, eq=False)
class UpscaleRequest:
    """An Upscale ("Extras") job: one or more PIL images through upscaler 1 (+ blended upscaler 2)."""

    images: tuple[Any, ...]
    names: tuple[str, ...] = ()  # original file names, for messages
    resize_mode: int = 0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str | None = None
    extras_upscaler_2_visibility: float = 0.0
    save_images: bool = True

    job_kind = "upscale"

    def __post_init__(self) -> None:
        if not isinstance(self.images, tuple):
            object.__setattr__(self, "images", tuple(self.images))
        if not isinstance(self.names, tuple):
            object.__setattr__(self, "names", tuple(self.names))
        if not self.images:
            raise RequestError("no image to upscale: add an image (or a folder of images)")
        if self.resize_mode not in UPSCALE_RESIZE_MODES:
            raise RequestError(f"resize_mode must be 0 (scale by) or 1 (scale to), got {self.resize_mode}")
        _check_range("upscaling_resize", self.upscaling_resize, 0.05, 16.0)
        _check_range("extras_upscaler_2_visibility", self.extras_upscaler_2_visibility, 0.0, 1.0)
        if self.resize_mode == 1:
            _check_range("upscaling_resize_w", self.upscaling_resize_w, 1, 16384)
            _check_range("upscaling_resize_h", self.upscaling_resize_h, 1, 16384)
        for index, image in enumerate(self.images):
            check_image(image, self.names[index] if index < len(self.names) else f"image {index + 1}",
                        max_side=MAX_UPSCALE_INPUT_SIDE, advice="Downscale it or split it first.")
