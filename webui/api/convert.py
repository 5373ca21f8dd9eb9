"""Pure conversion between A1111 API JSON and our types (no FastAPI, no context, no torch).

* ``txt2img_request``: ``Txt2ImgRequest`` (A1111 fields) -> ``GenerationRequest`` + what the route needs
  (send_images, warnings about ignored fields, options to keep afterwards).  ``common_fields`` is the part
  every generation request shares (img2img adds its own in ``convert_img2img``), including ControlNet units
  and IP-Adapter references from ``alwayson_scripts`` (``controlnet_units``).
* ``a1111_info`` / ``a1111_parameters``: a finished job -> A1111's ``info`` / ``parameters``.
* ``a1111_progress`` / ``job_info``: a ``Job`` -> ``/sdapi/v1/progress`` and ``/webui/v1/jobs/{id}``.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import time
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Mapping

from webui.api import controlnet_units
from webui.api.schemas import ProcessingRequest, Txt2ImgRequest
from webui.generation import samplers
from webui.io.metadata import strip_title_hash
from webui.options import SPECS_BY_KEY
from webui.types import GenerationRequest, JobState, RequestError

A1111_DEFAULT_SAMPLER = "Euler"  # A1111's API falls back to sampler_index, whose default is "Euler"
# override_settings keys that become fields of the job itself (per job, never global).
OVERRIDE_FIELDS: Mapping[str, str] = {
    "sd_model_checkpoint": "checkpoint",
    "sd_vae": "vae",
    "CLIP_stop_at_last_layers": "clip_skip",
}
# infotext (GenerationRequest field names, from webui.io.metadata) -> A1111 request fields
_INFOTEXT_FIELDS: Mapping[str, str] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "cfg_scale": "cfg_scale",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "subseed": "subseed",
    "subseed_strength": "subseed_strength",
    "batch_size": "batch_size",
    "sampler": "sampler_name",
    "schedule": "scheduler",
    "denoising_strength": "denoising_strength",
}


class NotAvailable(Exception):
    """The request asks for a feature this version does not have yet (HTTP 501)."""


@dataclass(frozen=True)
class ApiDefaults:
    """Option values that fill in what an A1111 request leaves unset, and catalog facts conversion needs."""

    clip_skip: int = 1
    ip_adapter_models: frozenset[str] = frozenset()  # lower-case names/file names of IP-Adapter files
    samplers: Any = None  # the app's SamplerRegistry (extension samplers too); None: the built-ins


@dataclass(frozen=True)
class Txt2ImgConversion:
    """A converted request (txt2img, or img2img with an ``Img2ImgRequest``) and what its route needs."""

    request: GenerationRequest
    send_images: bool
    warnings: tuple[str, ...] = ()
    keep_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # restore_afterwards=False


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def apply_infotext(body: ProcessingRequest) -> ProcessingRequest:
    """A1111 v1.10 ``infotext`` field: values from it fill every field the request did not set."""
    if not body.infotext:
        return body
    from webui.io.metadata import infotext_to_request_fields, parse_infotext

    fields = infotext_to_request_fields(parse_infotext(body.infotext))
    explicit = body.model_fields_set
    updates = {theirs: fields[ours] for ours, theirs in _INFOTEXT_FIELDS.items()
               if ours in fields and theirs not in explicit}
    overrides = dict(body.override_settings or {})
    if "clip_skip" in fields and "CLIP_stop_at_last_layers" not in overrides:
        overrides["CLIP_stop_at_last_layers"] = fields["clip_skip"]
        updates["override_settings"] = overrides
    return body.model_copy(update=updates)


def resolve_sampler(sampler_name: str | None, scheduler: str | None,
                    registry: "samplers.SamplerRegistry | None" = None) -> tuple[str, str]:
    """A1111 ``get_sampler_and_scheduler``: ("DPM++ 2M Karras", None) -> ("DPM++ 2M", "Karras").

    Unlike A1111 (which silently falls back to its first sampler) unknown names are an error.
    ``registry``: the app's ``ctx.samplers`` (extension samplers and schedule types); default: built-ins.
    """
    reg = registry if registry is not None else samplers.BUILTIN
    raw = sampler_name or A1111_DEFAULT_SAMPLER
    name, implied = reg.split_legacy_name(raw)
    if name is None:
        raise RequestError(f"sampler_name {raw!r} is unknown; valid samplers: {', '.join(reg.sampler_names())}")
    schedule = reg.canonical_schedule(scheduler)
    if schedule is None:
        raise RequestError(
            f"scheduler {scheduler!r} is unknown; valid schedulers: {', '.join(reg.schedule_names())}"
        )
    if implied:  # as in A1111, a schedule spelled into the sampler name wins
        schedule = implied
    reg.resolve(name, schedule)  # the pair must be one the sampler supports
    return name, schedule


def _override(overrides: Mapping[str, Any], key: str) -> Any:
    value = overrides.get(key)
    if value is None:
        return None
    spec = SPECS_BY_KEY.get(key)
    return spec.coerce(value) if spec else value  # OptionError (-> 422) names the key


def _unsupported(body: ProcessingRequest) -> None:
    if body.refiner_checkpoint and body.refiner_checkpoint.strip() not in ("", "None"):
        raise NotAvailable("the SDXL refiner (refiner_checkpoint) is not available yet in this version")
    if body.script_name:
        raise RequestError(f"script {body.script_name!r} not found: this version has no scripts")


def _hires_fields(body: Txt2ImgRequest, registry: Any = None) -> dict[str, Any]:
    """A1111 hires-fix fields -> GenerationRequest fields (only when ``enable_hr``)."""
    if not body.enable_hr:
        return {}
    same = ("", "Use same sampler", "Use same scheduler")
    hr_sampler = body.hr_sampler_name if body.hr_sampler_name not in (None, *same) else None
    hr_schedule = body.hr_scheduler if body.hr_scheduler not in (None, *same) else None
    if hr_sampler is not None:
        hr_sampler, hr_schedule = resolve_sampler(hr_sampler, hr_schedule or "Automatic", registry)
    return {"enable_hr": True, "hr_scale": _or(body.hr_scale, 2.0), "hr_upscaler": body.hr_upscaler or "Latent",
            "hr_second_pass_steps": _or(body.hr_second_pass_steps, 0), "hr_resize_x": _or(body.hr_resize_x, 0),
            "hr_resize_y": _or(body.hr_resize_y, 0), "denoising_strength": _or(body.denoising_strength, 0.7),
            "hr_sampler_name": hr_sampler, "hr_scheduler": hr_schedule,
            "hr_prompt": body.hr_prompt or "", "hr_negative_prompt": body.hr_negative_prompt or ""}


def common_fields(body: ProcessingRequest, defaults: ApiDefaults = ApiDefaults(), *,
                  init_image: Any = None) -> tuple[dict[str, Any], tuple[str, ...], dict[str, Any]]:
    """The ``GenerationRequest`` keyword arguments every A1111 generation request shares.

    ``body`` has had ``apply_infotext``.  Returns (fields, warnings, options to keep afterwards).
    ``init_image``: img2img's first input, the image of ControlNet / IP-Adapter units that send none.
    """
    _unsupported(body)
    warnings = []
    for flag in ("restore_faces", "tiling"):
        if getattr(body, flag):
            warnings.append(f"{flag} is not available yet in this version and was ignored")
    sampler, schedule = resolve_sampler(body.sampler_name or body.sampler_index, body.scheduler, defaults.samplers)
    overrides = dict(body.override_settings or {})
    checkpoint = _override(overrides, "sd_model_checkpoint")
    vae = _override(overrides, "sd_vae")
    clip_skip = _override(overrides, "CLIP_stop_at_last_layers")
    ignored = sorted(key for key in overrides if key not in OVERRIDE_FIELDS)
    if ignored:
        warnings.append("override_settings not applied per job: " + ", ".join(ignored))
    always_on = controlnet_units.alwayson_fields(body.alwayson_scripts, init_image=init_image,
                                                 ip_adapter_models=defaults.ip_adapter_models)
    warnings.extend(always_on.warnings)
    fields = dict(
        prompt=_or(body.prompt, ""),
        negative_prompt=_or(body.negative_prompt, ""),
        steps=_or(body.steps, 50),
        cfg_scale=_or(body.cfg_scale, 7.0),
        sampler=sampler,
        schedule=schedule,
        width=_or(body.width, 512),
        height=_or(body.height, 512),
        seed=_or(body.seed, -1),
        subseed=_or(body.subseed, -1),
        subseed_strength=_or(body.subseed_strength, 0.0),
        batch_size=_or(body.batch_size, 1),
        n_iter=_or(body.n_iter, 1),
        clip_skip=_or(clip_skip, defaults.clip_skip),
        checkpoint=strip_title_hash(checkpoint) if checkpoint else None,
        vae=vae or None,
        save_images=bool(body.save_images),  # A1111: do_not_save_samples = not save_images
        styles=tuple(str(s) for s in (body.styles or ())),
        controlnet=always_on.controlnet,
        ip_adapters=always_on.ip_adapters,
    )
    keep = {}
    if body.override_settings_restore_afterwards is False:
        keep = {key: overrides[key] for key in OVERRIDE_FIELDS if overrides.get(key) is not None}
    return fields, tuple(warnings), keep


def txt2img_request(body: Txt2ImgRequest, defaults: ApiDefaults = ApiDefaults()) -> Txt2ImgConversion:
    """A1111 txt2img JSON -> a validated ``GenerationRequest``; RequestError/OptionError/NotAvailable."""
    body = apply_infotext(body)
    if body.enable_hr and body.hr_checkpoint_name and body.hr_checkpoint_name.strip() not in ("", "Use same checkpoint"):
        raise NotAvailable("a separate hires checkpoint (hr_checkpoint_name) is not available yet in this version")
    fields, warnings, keep = common_fields(body, defaults)
    request = GenerationRequest(**fields, **_hires_fields(body, defaults.samplers))
    return Txt2ImgConversion(request=request, send_images=_or(body.send_images, True),
                             warnings=warnings, keep_options=keep)


IMAGE_INPUT_FIELDS = ("init_images", "mask")  # echoed in parameters only with include_init_images (A1111)


def a1111_parameters(body: ProcessingRequest) -> dict[str, Any]:
    """A1111 returns the request it received, every field included (img2img inputs only on request)."""
    echo_inputs = bool(getattr(body, "include_init_images", False))
    present = [name for name in IMAGE_INPUT_FIELDS if name in type(body).model_fields]
    data = plain(body.model_dump(exclude=None if echo_inputs else set(present)))
    if not echo_inputs:
        data.update({name: None for name in present})
    return data


def job_timestamp(started_at: float | None) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(started_at)) if started_at else "0"


def a1111_info(result: Any, request: GenerationRequest, *, job_id: str | None = None,
               started_at: float | None = None, warnings: tuple[str, ...] = ()) -> dict[str, Any]:
    """A1111 ``Processed.js()`` keys, filled from the request and overlaid with the runner's info."""
    images = list(result.images) if result is not None else []
    count = len(images)
    info: dict[str, Any] = {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": images[0].seed if images else request.seed,
        "all_seeds": [img.seed for img in images],
        "subseed": request.subseed,
        "all_subseeds": [],
        "subseed_strength": request.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": request.sampler,
        "scheduler": request.schedule,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": request.checkpoint,
        "sd_model_hash": None,
        "sd_vae_name": request.vae,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": (request.denoising_strength
                               if request.enable_hr or request.job_kind == "img2img" else None),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [],
        "styles": list(request.styles),
        "job_timestamp": job_timestamp(started_at),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": None,
    }
    if result is not None:
        info.update(plain(dict(result.info or {})))
    info["all_seeds"] = [img.seed for img in images]  # what was returned, whatever the runner planned
    info["infotexts"] = [img.infotext for img in images]
    info["job_id"] = job_id
    info["interrupted"] = bool(getattr(result, "interrupted", False))
    if warnings:
        info["warnings"] = list(warnings)
    return info


_IDLE_STATE = {
    "skipped": False,
    "interrupted": False,
    "stopping_generation": False,
    "job": "",
    "job_count": 0,
    "job_timestamp": "0",
    "job_no": 0,
    "sampling_step": 0,
    "sampling_steps": 0,
}


def a1111_progress(job: Any, *, now: float | None = None) -> dict[str, Any]:
    """``/sdapi/v1/progress`` for the running job (``current_image`` is added by the route)."""
    if job is None or job.state is not JobState.RUNNING:
        return {"progress": 0.0, "eta_relative": 0.0, "state": dict(_IDLE_STATE), "current_image": None,
                "textinfo": None, "current_task": None}
    now = time.time() if now is None else now
    p = job.progress
    # A1111 reports at least 0.01 while something runs; clients read 0 as "idle".
    fraction = min(1.0, max(0.01, p.fraction))
    elapsed = max(0.0, now - (job.started_at or now))
    if p.eta_seconds is not None and math.isfinite(p.eta_seconds):
        eta = max(0.0, float(p.eta_seconds))
    else:
        eta = max(0.0, elapsed / fraction - elapsed)
    state = {
        **_IDLE_STATE,
        "job": job.kind,
        "job_count": max(1, p.batch_count),
        "job_timestamp": job_timestamp(job.started_at),
        "job_no": p.batch_index,
        "sampling_step": p.step,
        "sampling_steps": p.total_steps,
    }
    return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": None,
            "textinfo": p.text or None, "current_task": job.id}


def job_links(job_id: str, prefix: str = "/webui/v1") -> dict[str, str]:
    return {
        "self": f"{prefix}/jobs/{job_id}",
        "events": f"{prefix}/jobs/{job_id}/events",
        "cancel": f"{prefix}/jobs/{job_id}",
    }


def job_info(job: Any, position: int | None, *, prefix: str = "/webui/v1") -> dict[str, Any]:
    """``JobInfo`` fields for a job (without the result)."""
    info = plain(job.summary())
    info["position"] = position
    info["links"] = job_links(job.id, prefix)
    if info.get("eta_seconds") is not None and not math.isfinite(info["eta_seconds"]):
        info["eta_seconds"] = None
    return info


def _is_image(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def plain(value: Any) -> Any:
    """JSON-safe copy: enums -> values, paths -> str, tuples -> lists, dataclasses -> dicts, images -> None."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # fields, not asdict: no deep copies
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if _is_image(value):
        return None  # parameters never carry pixels
    return str(value)
