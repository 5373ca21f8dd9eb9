"""Request types for jobs that take images: img2img / edit / inpaint, ControlNet units, reference images.

Like ``webui.types`` these are frozen and keyword-only, and validate themselves so that the UI and the API
report the same message for the same mistake.  They hold PIL images, so they compare by identity
(``eq=False``).  ``Img2ImgRequest`` extends ``GenerationRequest``: every txt2img parameter (LoRA stack,
sampler, batch, previews, ControlNet units, reference images) means the same thing in img2img.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from webui.types import GenerationRequest, RequestError, _check_range, check_image

MAX_INPUT_SIDE = 8192  # init / mask / control images larger than this are refused with a message (check_image)
MAX_CONTROL_UNITS = 8
MAX_REFERENCE_IMAGES = 8

# A1111 resize_mode values (img2img and ControlNet units use the same numbers)
RESIZE_JUST_RESIZE = 0
RESIZE_CROP_AND_RESIZE = 1
RESIZE_AND_FILL = 2
RESIZE_LATENT_UPSCALE = 3  # "Just resize (latent upscale)": resized like 0 here
RESIZE_MODE_NAMES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")

# A1111 inpainting_fill values ("Masked content")
FILL_FILL = 0
FILL_ORIGINAL = 1
FILL_LATENT_NOISE = 2
FILL_LATENT_NOTHING = 3
MASKED_CONTENT_NAMES = ("fill", "original", "latent noise", "latent nothing")

# ControlNet control modes (sd-webui-controlnet names and numbers)
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")


def _as_tuple(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if value is None:
        object.__setattr__(obj, name, ())
    elif not isinstance(value, tuple):
        object.__setattr__(obj, name, tuple(value) if isinstance(value, list) else (value,))


@dataclass(frozen=True, kw_only=True, eq=False)
class ControlUnit:
    """One ControlNet unit (field names follow the sd-webui-controlnet API).

    ``image`` None means "use the img2img input image" (in txt2img it is then an error).
    ``module`` is the preprocessor name ("none": the image already is the control map); ``model`` is a
    catalog name from ``models/ControlNet``.
    """

    enabled: bool = True
    image: Any = None
    module: str = "none"
    model: str = ""
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: int = RESIZE_CROP_AND_RESIZE
    pixel_perfect: bool = False
    processor_res: int = 512
    threshold_a: float | None = None  # preprocessor parameter 1 (canny: low threshold), None: its default
    threshold_b: float | None = None
    save_detected_map: bool = True  # API: return the preprocessed map after the images

    def __post_init__(self) -> None:
        if isinstance(self.control_mode, int) and not isinstance(self.control_mode, bool):
            if not 0 <= self.control_mode < len(CONTROL_MODES):
                raise RequestError(f"ControlNet control_mode must be 0, 1 or 2, got {self.control_mode}")
            object.__setattr__(self, "control_mode", CONTROL_MODES[self.control_mode])
        if self.control_mode not in CONTROL_MODES:
            raise RequestError(f"ControlNet control_mode {self.control_mode!r} is not one of {', '.join(CONTROL_MODES)}")
        if isinstance(self.resize_mode, str):
            names = {"just resize": 0, "crop and resize": 1, "resize and fill": 2, "inner fit (scale to fit)": 1,
                     "outer fit (shrink to fit)": 2, "envelope (outer fit)": 2}
            key = self.resize_mode.strip().lower()
            if key not in names:
                raise RequestError(f"ControlNet resize_mode {self.resize_mode!r} is not Just Resize, "
                                   "Crop and Resize or Resize and Fill")
            object.__setattr__(self, "resize_mode", names[key])
        if self.resize_mode not in (0, 1, 2):
            raise RequestError(f"ControlNet resize_mode must be 0, 1 or 2, got {self.resize_mode}")
        if not self.enabled:
            return
        if not self.model:
            raise RequestError("ControlNet unit has no model: pick one from models/ControlNet")
        _check_range("ControlNet weight", self.weight, 0.0, 2.0)
        _check_range("ControlNet guidance start", self.guidance_start, 0.0, 1.0)
        _check_range("ControlNet guidance end", self.guidance_end, 0.0, 1.0)
        if self.guidance_start >= self.guidance_end:
            raise RequestError(f"ControlNet guidance start {self.guidance_start} must be below its end "
                               f"{self.guidance_end}")
        _check_range("ControlNet processor resolution", self.processor_res, 64, 2048)
        if self.image is not None:
            check_image(self.image, f"ControlNet image for {self.model}")


@dataclass(frozen=True, kw_only=True, eq=False)
class ReferenceImages:
    """IP-Adapter reference images: one adapter file (``models/ipadapter``) with one or more images."""

    model: str
    images: tuple[Any, ...] = ()
    weight: float = 1.0
    image_encoder: str | None = None  # catalog name in models/clip_vision; None: the one matching the adapter

    def __post_init__(self) -> None:
        _as_tuple(self, "images")
        if not self.model:
            raise RequestError("reference images have no IP-Adapter model: pick one from models/ipadapter")
        if not self.images:
            raise RequestError(f"IP-Adapter {self.model}: add at least one reference image")
        if len(self.images) > MAX_REFERENCE_IMAGES:
            raise RequestError(f"IP-Adapter {self.model}: at most {MAX_REFERENCE_IMAGES} reference images")
        _check_range(f"IP-Adapter {self.model} weight", self.weight, 0.0, 2.0)
        for index, image in enumerate(self.images):
            check_image(image, f"IP-Adapter {self.model} reference image {index + 1}")


@dataclass(frozen=True)
class SoftInpaintSetting:
    """One soft inpainting parameter: A1111's slider (label, range, step, default) and infotext key."""

    name: str  # SoftInpaint field
    label: str  # A1111 UI label
    infotext: str  # A1111 infotext key
    low: float
    high: float
    step: float
    default: float
    info: str


# A1111 extensions-builtin/soft-inpainting, in its script-argument order (after "enabled")
SOFT_INPAINT_ENABLED_INFOTEXT = "Soft inpainting enabled"
SOFT_INPAINT_SETTINGS: tuple[SoftInpaintSetting, ...] = (
    SoftInpaintSetting("schedule_bias", "Schedule bias", "Soft inpainting schedule bias", 0, 8, 0.1, 1.0,
                       "Shifts when preservation of original content occurs during denoising."),
    SoftInpaintSetting("preservation_strength", "Preservation strength", "Soft inpainting preservation strength",
                       0, 8, 0.05, 0.5, "How strongly partially masked content should be preserved."),
    SoftInpaintSetting("transition_contrast_boost", "Transition contrast boost",
                       "Soft inpainting transition contrast boost", 1, 32, 0.5, 4.0,
                       "Amplifies the contrast that may be lost in partially masked regions."),
    SoftInpaintSetting("mask_influence", "Mask influence", "Soft inpainting mask influence", 0, 1, 0.05, 0.0,
                       "How strongly the original mask should bias the difference threshold."),
    SoftInpaintSetting("difference_threshold", "Difference threshold", "Soft inpainting difference threshold",
                       0, 8, 0.25, 0.5, "How much an image region can change before the original pixels are not "
                       "blended in anymore."),
    SoftInpaintSetting("difference_contrast", "Difference contrast", "Soft inpainting difference contrast",
                       0, 8, 0.25, 2.0, "How sharp the transition should be between blended and not blended."),
)


@dataclass(frozen=True, kw_only=True)
class SoftInpaint:
    """A1111 soft inpainting (the blurred mask as continuous weights; ``webui.generation.soft_inpaint``).

    Field names are A1111's UI labels; A1111's internal names in brackets: schedule bias
    (``mask_blend_power``), preservation strength (``mask_blend_scale``), transition contrast boost
    (``inpaint_detail_preservation``), mask influence / difference threshold / difference contrast
    (``composite_*``).  Ranges are A1111's sliders.
    """

    schedule_bias: float = 1.0
    preservation_strength: float = 0.5
    transition_contrast_boost: float = 4.0
    mask_influence: float = 0.0
    difference_threshold: float = 0.5
    difference_contrast: float = 2.0

    def __post_init__(self) -> None:
        for spec in SOFT_INPAINT_SETTINGS:
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f"soft inpainting {spec.label.lower()} must be a number, got {value!r}")
            _check_range(f"soft inpainting {spec.label.lower()}", value, spec.low, spec.high)
            object.__setattr__(self, spec.name, float(value))


@dataclass(frozen=True, kw_only=True, eq=False)
class Img2ImgRequest(GenerationRequest):
    """An img2img / edit / inpaint job (A1111 field names).

    ``init_images`` are cycled over the batch.  With ``mask`` it is an inpaint job: white = change.
    ``width``/``height`` are the output size; the init image is fitted to it with ``resize_mode``.
    """

    init_images: tuple[Any, ...] = ()
    mask: Any = None
    resize_mode: int = RESIZE_JUST_RESIZE
    denoising_strength: float = 0.75
    image_cfg_scale: float = 1.5  # instruction-edit (instruct-pix2pix) models only
    mask_blur: int = 4
    inpainting_fill: int = FILL_ORIGINAL
    inpaint_full_res: bool = False  # True: "Only masked" inpaint area
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    soft_inpainting: SoftInpaint | None = None  # None: off; used only with a mask
    names: tuple[str, ...] = field(default=())  # original file names, for messages

    job_kind = "img2img"

    def __post_init__(self) -> None:
        _as_tuple(self, "init_images")
        _as_tuple(self, "names")
        if self.enable_hr:
            raise RequestError("hires fix is a txt2img option; for img2img raise the width/height instead")
        super().__post_init__()
        if not self.init_images:
            raise RequestError("img2img needs an input image: upload one, paste one, or send one from another tab")
        for index, image in enumerate(self.init_images):
            check_image(image, self.names[index] if index < len(self.names) else f"input image {index + 1}")
        _check_range("denoising_strength", self.denoising_strength, 0.0, 1.0)
        _check_range("image_cfg_scale", self.image_cfg_scale, 0.0, 30.0)
        _check_range("mask_blur", self.mask_blur, 0, 64)
        _check_range("inpaint_full_res_padding", self.inpaint_full_res_padding, 0, 256)
        if self.resize_mode not in (0, 1, 2, 3):
            raise RequestError(f"resize_mode must be 0..3 ({', '.join(RESIZE_MODE_NAMES)}), got {self.resize_mode}")
        if self.inpainting_fill not in (0, 1, 2, 3):
            raise RequestError(f"inpainting_fill must be 0..3 ({', '.join(MASKED_CONTENT_NAMES)}), "
                               f"got {self.inpainting_fill}")
        if self.mask is not None:
            check_image(self.mask, "mask")
        if self.soft_inpainting is not None and not isinstance(self.soft_inpainting, SoftInpaint):
            raise RequestError("soft_inpainting must be SoftInpaint settings or None (off)")

    @property
    def is_inpaint(self) -> bool:
        return self.mask is not None
