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
    EMBEDDING = "embedding"
    UPSCALER = "upscaler"
    UNKNOWN = "unknown"


class Arch(str, enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"
    UNKNOWN = "unknown"


class Variant(str, enum.Enum):
    NORMAL = "normal"
    INPAINT = "inpaint"
    INSTRUCT_PIX2PIX = "instruct_pix2pix"
    DEPTH = "depth"


class Prediction(str, enum.Enum):
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


@dataclass(frozen=True, kw_only=True)
class LoraRef:
    """One entry of a LoRA stack: which file (catalog name) and how strongly."""

    name: str
    weight: float = 1.0
    te_weight: float | None = None  # None: same as weight

    def __post_init__(self) -> None:
        if not self.name:
            raise RequestError("LoRA name is empty")
        for label, value in (("weight", self.weight), ("text-encoder weight", self.te_weight)):
            if value is not None and not -4.0 <= value <= 4.0:
                raise RequestError(f"LoRA {self.name!r}: {label} {value} is outside -4..4")


MAX_SIDE = 4096
MAX_STEPS = 500
MAX_BATCH = 16
MAX_ITER = 100
MAX_PROMPT_CHARS = 4096


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}")


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """A txt2img job (img2img/inpaint fields are added by their issue).

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

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter

    def with_changes(self, **changes: Any) -> "GenerationRequest":
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


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
