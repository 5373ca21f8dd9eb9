"""Run one generation job: a request + LoadedModel + SamplingPlan -> GenerationResult.

Reads as a recipe (see ``run_generation``): resolve seeds, encode prompts (our own encoder: A1111 weighting,
long prompts, clip skip), build a fresh scheduler, then per batch make the initial noise from per-image
CPU generators (same seed -> same image, whatever the batch position or device), sample with a step
callback (progress, live preview, Interrupt/Skip, prompt schedule), decode with the VAE, write infotext
and save.  What differs between txt2img, img2img, inpaint and edit is the ``SamplingPlan``: which
pipeline, what it is called with per batch, what happens per step and to each image afterwards
(``txt2img_plan`` here, ``webui.generation.img2img.build_plan`` for image jobs).  Worker thread only.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from webui.generation.hires import infotext_extra as hires_infotext, run_hires
from webui.generation.pipeline_tasks import task_for, task_pipeline
from webui.generation.previews import latent_preview
from webui.generation.samplers import make_scheduler, resolve as resolve_sampler
from webui.io.images import save_image
from webui.io.metadata import build_infotext, infotext_params
from webui.prompt.parser import append_lora_tags
from webui.types import GeneratedImage, GenerationRequest, GenerationResult, Progress

VERSION = "webui 0.1.0"
LATENT_FACTOR = 8


@dataclass(frozen=True)
class RunOptions:
    """What the job needs from options/settings, resolved when it starts."""

    outdir: Path
    filename_pattern: str = "[number]-[seed]"
    save: bool = True
    previews: bool = True
    preview_every: int = 1
    plugins: Any = None  # PluginManager: on_step / postprocess_image hooks (None: no extensions)
    hires: Any = None  # webui.generation.hires.HiresTools (image upscalers for the hires fix)
    samplers: Any = None  # webui.generation.samplers.SamplerRegistry (None: built-ins only)


class StepReporter:
    """The per-step callback: progress, previews, Interrupt/Skip, prompt-schedule switches."""

    def __init__(self, *, control: Any, model: Any, request: GenerationRequest, batch_index: int,
                 started: float, schedule_switches: dict[int, dict[str, torch.Tensor]], preview_every: int,
                 plugins: Any = None, total_steps: int | None = None, on_step: Any = None,
                 to_latents: Any = None):
        self.total_steps = total_steps or request.steps
        self.to_latents = to_latents  # plan hook: pipeline latents -> (B, C, h, w) VAE latents for previews
        self.on_step = on_step  # plan hook: (pipe, step, tensors) -> extra tensors (e.g. the inpaint blend)
        self.control = control
        self.model = model
        self.request = request
        self.batch_index = batch_index
        self.started = started
        self.switches = schedule_switches
        self.preview_every = preview_every
        self.skipped = False
        self.plugins = plugins

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        request, done_step, steps = self.request, step + 1, self.total_steps
        done = self.batch_index * steps + done_step
        total = steps * request.n_iter
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (total - done) if done else None
        changes: dict[str, Any] = {
            "step": done_step, "total_steps": steps, "batch_index": self.batch_index,
            "batch_count": request.n_iter, "eta_seconds": eta,
            "text": f"step {done_step}/{steps}, batch {self.batch_index + 1}/{request.n_iter}",
        }
        out = dict(self.switches.get(done_step, {}))
        if self.on_step is not None:
            out.update(self.on_step(pipe, step, tensors))
            tensors = {**tensors, **out}
        if self.preview_every and (done_step % self.preview_every == 0) and done_step < steps:
            shown = tensors["latents"] if self.to_latents is None else self.to_latents(tensors["latents"])
            changes["preview"] = latent_preview(shown, self.model.arch)
            changes["preview_step"] = done
        self.control.update(**changes)
        if self.plugins is not None:
            self.plugins.on_step(Progress(**changes), request)
        if self.control.interrupted:
            pipe._interrupt = True
        elif self.control.consume_skip():
            self.skipped = True
            pipe._interrupt = True
        return out


def resolve_seed(seed: int) -> int:
    return random.randint(0, 2**32 - 1) if seed == -1 else seed


def _slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_n, b_n = a / a.norm(), b / b.norm()
    omega = torch.acos((a_n * b_n).sum().clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - t) * a + t * b
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def initial_noise(seeds: list[int], subseeds: list[int], strength: float, shape: tuple[int, ...]) -> torch.Tensor:
    """Unit Gaussian noise per image from CPU generators (A1111's 'CPU' RNG: identical on every device)."""
    noises = []
    for seed, subseed in zip(seeds, subseeds):
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        if strength > 0:
            other = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(subseed), dtype=torch.float32)
            noise = _slerp(strength, noise, other)
        noises.append(noise)
    return torch.stack(noises)


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoising network: the UNet, or the transformer of a DiT pipeline."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def decode(pipe: Any, latents: torch.Tensor) -> list[Any]:
    """VAE decode (upcast to fp32 when an fp16 VAE overflows to NaN) -> PIL images."""
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    with torch.no_grad():
        image = vae.decode(scaled.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
        if vae.dtype != torch.float32 and torch.isnan(image).any():
            vae_fp32 = vae.to(torch.float32)
            image = vae_fp32.decode(scaled.to(device=vae.device, dtype=torch.float32), return_dict=False)[0]
            vae.to(latents.dtype if latents.dtype != torch.float32 else torch.float16)
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


def _batched_cfg(kwargs: dict[str, torch.Tensor], batch: int, cfg: bool) -> dict[str, torch.Tensor]:
    """Tensors as the pipeline holds them inside its loop (negative first when CFG is on)."""
    out = {"prompt_embeds": kwargs["prompt_embeds"].repeat(batch, 1, 1)}
    neg = kwargs["negative_prompt_embeds"].repeat(batch, 1, 1)
    if cfg:
        out["prompt_embeds"] = torch.cat([neg, out["prompt_embeds"]])
    if "pooled_prompt_embeds" in kwargs:
        pooled = kwargs["pooled_prompt_embeds"].repeat(batch, 1)
        neg_pooled = kwargs["negative_pooled_prompt_embeds"].repeat(batch, 1)
        out["add_text_embeds"] = torch.cat([neg_pooled, pooled]) if cfg else pooled
    return out


@dataclass
class SamplingPlan:
    """How one job samples (see the module docstring).  Built on the worker thread per job."""

    pipe: Any
    mode: str = "txt2img"  # outputs/<mode>-images folder and A1111 result naming
    steps_run: int = 0  # sampling steps the callback sees per batch (img2img: steps x strength); 0: request.steps
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # the same for every batch
    batch_kwargs: Callable[[int, list[int], torch.Tensor], dict[str, Any]] | None = None  # (batch, seeds, noise)
    on_step: Callable[[Any, int, dict[str, Any]], dict[str, Any]] | None = None  # extra tensors per step
    finish: Callable[[Any, int], Any] | None = None  # (decoded image, index in job) -> final image
    infotext: dict[str, Any] = field(default_factory=dict)
    prompt_schedule: bool = True  # False: the pipeline cannot take switched embeddings mid-run
    extra_images: tuple[Any, ...] = ()  # shown with the result, not saved (e.g. ControlNet maps)
    control: Any = None  # the ControlNet conditioning of a txt2img plan, applied again in the hires pass
    info: dict[str, Any] = field(default_factory=dict)  # merged into the result's info
    # DiT hooks (webui.generation.dit); None keeps the UNet behaviour
    latent_shape: tuple[int, ...] | None = None  # per-image CPU noise shape; None: (vae channels, h/8, w/8)
    to_vae_latents: Callable[[torch.Tensor], torch.Tensor] | None = None  # pipeline latents -> (B, C, h, w)
    decode: Callable[[Any, torch.Tensor], list[Any]] | None = None  # (pipe, latents) -> PIL images
    make_scheduler: Callable[[int], Any] | None = None  # (seed) -> fresh scheduler, instead of the sampler table
    sampler_label: tuple[str, str] | None = None  # (sampler, schedule) written to infotext instead of the request's
    conditioning: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # adapts the encoder's kwargs
    hires: Callable[..., tuple[torch.Tensor | None, bool]] | None = None  # hires second pass; None: hires.run_hires
    notes: tuple[str, ...] = ()  # warnings for the user (added to the result's info["warnings"])


def txt2img_plan(model: Any, request: GenerationRequest, control_cond: Any = None) -> SamplingPlan:
    """txt2img; on a 9-channel inpaint checkpoint it inpaints a blank image under a full mask (A1111)."""
    from PIL import Image

    if getattr(control_cond, "adapters", None) is not None:  # T2I-Adapter units (adapter_control)
        from webui.generation.adapter_control import adapter_plan

        return adapter_plan(model, request, control_cond)
    task = task_for(model.components.variant, has_image=False, has_mask=False)
    pipe = task_pipeline(model, task, controlnet=getattr(control_cond, "controlnet", None))
    call: dict[str, Any] = {"width": request.width, "height": request.height}
    if task == "inpaint":
        size = (request.width, request.height)
        call.update(image=[Image.new("RGB", size, (127, 127, 127))] * request.batch_size,
                    mask_image=[Image.new("L", size, 255)] * request.batch_size, strength=1.0)
    if control_cond is not None:
        call["image" if task == "txt2img" else "control_image"] = control_cond.images
        call.update(control_cond.kwargs)
    return SamplingPlan(
        pipe=pipe, call_kwargs=call, batch_kwargs=lambda _b, _s, noise: {"latents": noise},
        infotext=dict(getattr(control_cond, "infotext", {}) or {}),
        extra_images=tuple(getattr(control_cond, "maps", ()) or ()), control=control_cond,
    )


def _tensor_inputs(pipe: Any, wanted: set[str]) -> list[str]:
    allowed = set(getattr(type(pipe), "_callback_tensor_inputs", ()) or ())
    return ["latents", *sorted(k for k in wanted if k in allowed and k != "latents")]


def run_txt2img(model: Any, request: GenerationRequest, control: Any, options: RunOptions,
                loras: Any = None) -> GenerationResult:
    return run_generation(model, request, control, options, txt2img_plan(model, request), loras=loras)


def run_generation(model: Any, request: GenerationRequest, control: Any, options: RunOptions, plan: SamplingPlan,
                   loras: Any = None) -> GenerationResult:
    """``loras``: the manager's LoraApplication for this job (hashes for infotext, warnings)."""
    pipe, started = plan.pipe, time.perf_counter()
    # 1. Seeds: A1111 numbering (seed + index over all images of the job).
    base_seed = resolve_seed(request.seed)
    base_subseed = resolve_seed(request.subseed)
    count = request.image_count
    seeds = [(base_seed + i) % 2**32 for i in range(count)]
    subseeds = [(base_subseed + i) % 2**32 for i in range(count)]
    # 2. Prompt conditioning (scheduled: list of (end_step, pipeline kwargs)).
    schedule = model.encoder.encode_schedule(request.prompt, request.negative_prompt, request.steps, request.clip_skip)
    if not plan.prompt_schedule:
        schedule = schedule[:1]
    first = schedule[0][1] if plan.conditioning is None else plan.conditioning(schedule[0][1])
    cfg_on = request.cfg_scale > 1.0
    # 3. Scheduler, fresh for this job.
    if plan.make_scheduler is not None:
        pipe.scheduler = plan.make_scheduler(base_seed)
        sampler_name, schedule_name = plan.sampler_label or (request.sampler, request.schedule)
    else:
        choice = resolve_sampler(request.sampler, request.schedule, registry=options.samplers)
        pipe.scheduler = make_scheduler(
            model.components.scheduler_config, request.sampler, request.schedule,
            prediction_type=model.prediction.value if model.prediction else None,
            rescale_betas_zero_snr=bool(model.components.zero_terminal_snr),
            seed=base_seed, registry=options.samplers,
        )
        sampler_name, schedule_name = choice.sampler, choice.schedule
    # 4. Sample each batch.
    latent_shape = plan.latent_shape or (pipe.vae.config.latent_channels, request.height // LATENT_FACTOR,
                                         request.width // LATENT_FACTOR)
    images: list[GeneratedImage] = []
    interrupted = False
    preview_every = options.preview_every if request.preview_every is None else request.preview_every
    preview_every = preview_every if options.previews else 0
    net = denoiser(pipe)
    device = net.device
    steps_run = plan.steps_run or request.steps
    for batch_index in range(request.n_iter):
        if control.interrupted:
            interrupted = True
            break
        lo = batch_index * request.batch_size
        batch_seeds = seeds[lo:lo + request.batch_size]
        noise = initial_noise(batch_seeds, subseeds[lo:lo + request.batch_size], request.subseed_strength, latent_shape)
        noise = noise.to(device=device, dtype=net.dtype)
        generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
        # A1111 rule (parser.entry_at): entry (end, cond) is in force for 0-based steps <= end, so the next
        # entry takes over once step ``end`` is done, i.e. in the callback reporting done_step == end + 1.
        switches = {end + 1: _batched_cfg(schedule[i + 1][1], request.batch_size, cfg_on)
                    for i, (end, _) in enumerate(schedule[:-1])}
        tensor_inputs = _tensor_inputs(pipe, {k for sw in switches.values() for k in sw})
        switches = {step: {k: v for k, v in sw.items() if k in tensor_inputs} for step, sw in switches.items()}
        reporter = StepReporter(control=control, model=model, request=request, batch_index=batch_index,
                                started=started, schedule_switches=switches, preview_every=preview_every,
                                plugins=options.plugins, total_steps=steps_run, on_step=plan.on_step,
                                to_latents=plan.to_vae_latents)
        control.update(step=0, total_steps=steps_run, batch_index=batch_index, batch_count=request.n_iter,
                       text=f"batch {batch_index + 1}/{request.n_iter}")
        per_batch = plan.batch_kwargs(batch_index, batch_seeds, noise) if plan.batch_kwargs else {}
        latents = pipe(
            **first,
            # a plan may map CFG elsewhere or pass conditioning already batched (DiT)
            **{"guidance_scale": request.cfg_scale, "num_images_per_prompt": request.batch_size, **plan.call_kwargs},
            **per_batch,
            num_inference_steps=request.steps,
            generator=generators,
            output_type="latent",
            callback_on_step_end=reporter,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        ).images
        if control.interrupted:
            interrupted = True
            break
        if reporter.skipped:
            continue
        if request.enable_hr:  # 4b. hires fix: upscale + second pass (webui.generation.hires; DiT: dit_hires)
            latents, interrupted = (plan.hires or run_hires)(
                model=model, request=request, latents=latents, seeds=batch_seeds, control=control, started=started,
                tools=options.hires, samplers=options.samplers, control_cond=plan.control)
            if interrupted:
                break
            if latents is None:  # skipped during the second pass
                continue
        # 5. Decode, infotext, save.
        for offset, image in enumerate((plan.decode or decode)(pipe, latents)):
            seed, index = batch_seeds[offset], lo + offset
            if plan.finish is not None:
                image = plan.finish(image, index)
            if options.plugins is not None:
                image = options.plugins.postprocess_image(image, seed=seed, index=index, request=request)
            params = infotext_params(
                request, seed=seed, subseed=subseeds[index], sampler=sampler_name,
                schedule=schedule_name, model_name=Path(model.record.name).name, model_hash=model.model_hash,
                vae_name=model.vae_record.name if model.vae_record else None, version=VERSION,
                lora_hashes=loras.hashes if loras else None, extra={**hires_infotext(request), **plan.infotext},
            )
            infotext = build_infotext(append_lora_tags(request.prompt, request.loras), request.negative_prompt,
                                      params)  # slot LoRAs as <lora:> tags: the prompt restores the stack
            path = None
            if options.save and request.save_images:
                path = str(save_image(image, outdir=options.outdir, mode=plan.mode, infotext=infotext,
                                      seed=seed, prompt=request.prompt, pattern=options.filename_pattern))
            images.append(GeneratedImage(image=image, seed=seed, infotext=infotext, path=path))
    return GenerationResult(images=tuple(images), parameters=request_parameters(request),
                            info=_result_info(request, model, images, base_seed, base_subseed, subseeds, started,
                                              loras, plan),
                            interrupted=interrupted, extra_images=plan.extra_images)


def request_parameters(request: GenerationRequest) -> dict[str, Any]:
    """The request as plain data (A1111 "parameters"); images are left out, units summarised."""
    skip = {"extra", "init_images", "mask", "controlnet", "ip_adapters"}
    out = {f.name: getattr(request, f.name) for f in fields(request) if f.name not in skip}
    out["loras"] = [dict(name=r.name, weight=r.weight, te_weight=r.te_weight, block_weights=r.block_weights)
                    for r in request.loras]
    out["controlnet"] = [{k: getattr(u, k) for k in ("enabled", "module", "model", "weight", "guidance_start",
                                                      "guidance_end", "control_mode", "resize_mode", "pixel_perfect",
                                                      "processor_res", "threshold_a", "threshold_b")}
                         for u in request.controlnet]
    out["ip_adapters"] = [{"model": r.model, "weight": r.weight, "images": len(r.images)} for r in request.ip_adapters]
    return out


def _result_info(request: GenerationRequest, model: Any, images: list[GeneratedImage], base_seed: int,
                 base_subseed: int, subseeds: list[int], started: float, loras: Any, plan: SamplingPlan) -> dict:
    """A1111's "info": seeds, infotexts, model... (plus our warnings and LoRA layer counts)."""
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": base_seed,
        "all_seeds": [img.seed for img in images],
        "subseed": base_subseed,
        "all_subseeds": subseeds[: len(images)],
        "subseed_strength": request.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": request.sampler,
        "scheduler": request.schedule,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "clip_skip": request.clip_skip,
        "sd_model_name": model.record.name,
        "sd_model_hash": model.model_hash,
        "sd_vae_name": model.vae_name,
        "infotexts": [img.infotext for img in images],
        "seconds": round(time.perf_counter() - started, 3),
        "warnings": [*(loras.warnings if loras else ()), *plan.notes],
        "lora_layers": {k: list(v) for k, v in getattr(loras, "matched", {}).items()} if loras else {},
        "version": VERSION,
        "mode": plan.mode,
        **plan.info,
    }
