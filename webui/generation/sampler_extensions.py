"""Samplers and schedule types from extensions (``webui_samplers`` / ``webui_schedulers``, API 1.1).

What an entry is (``NamedEntry(name, factory, description)``, documented in ``docs/extensions.md``):

* sampler: ``factory(scheduler_config: dict) -> diffusers scheduler`` (optionally also ``seed=``, the
  job's seed).  ``scheduler_config`` is a copy of the model's scheduler config (betas, prediction type,
  ...); the factory picks the class and its options, usually ``SomeScheduler.from_config(config, ...)``.
  The app then rebuilds it with ``type(s).from_config(s.config, ...)`` plus what the job and model fix
  (prediction type, zero-terminal SNR, and the sigma options of a chosen schedule type), so every option
  must be a constructor argument.  "Automatic" keeps the factory's own sigma options.
* schedule type: ``factory(n_steps, sigma_min, sigma_max) -> n_steps sigmas`` (finite, > 0,
  non-increasing, without the final 0).  diffusers takes a custom schedule only through
  ``set_timesteps(sigmas=...)`` (Euler: exact) or ``set_timesteps(timesteps=...)`` (DPM++ 2M/SDE,
  DPM++ 2S a, Heun: each sigma mapped to the nearest training timestep), so such a schedule type is
  offered for those samplers (and extension samplers whose class takes one of them) only.

Every factory is called once at start-up (a probe with an SD 1.5 config / 4 steps): an entry whose probe
fails is not added and its extension is disabled, like any failing hook.  Names are refused (the
extension stays enabled, the reason shows in the Extensions tab) when empty or taken by a built-in or by
an earlier extension; ``<extension>:<name>`` is always an alias.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from typing import Any, Callable, Iterable, Sequence

from webui.generation.samplers import (
    AUTOMATIC, SAMPLERS, SCHEDULES, ExtensionCalls, SamplerRegistry, SamplerSpec, ScheduleSpec, _fold,
    _init_params, scheduler_class)
from webui.types import RequestError

log = logging.getLogger(__name__)

NAME_MAX = 64
# SD 1.5's scheduler config: what a sampler factory is probed with at start-up.
PROBE_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                "set_alpha_to_one": False, "clip_sample": False}
PROBE_STEPS, PROBE_SIGMA_MIN, PROBE_SIGMA_MAX = 4, 0.0292, 14.6146


class Refused(Exception):
    """An extension entry that is not added; the message says why and what to do."""


# ---- checked calls (run through ExtensionCalls.call_entry, which isolates the extension) ------------
def run_sampler_factory(factory: Callable[..., Any], config: dict[str, Any], seed: int | None) -> Any:
    """``factory(scheduler_config)`` (plus ``seed=`` if it declares it); the result must be a scheduler."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    wants_seed = "seed" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    made = factory(config, seed=seed) if wants_seed else factory(config)
    if not (hasattr(made, "set_timesteps") and hasattr(made, "step") and hasattr(made, "config")
            and hasattr(type(made), "from_config")):
        raise TypeError(f"the sampler factory returned {type(made).__name__}, not a diffusers scheduler")
    return made


def run_sigma_factory(factory: Callable[..., Any], steps: int, sigma_min: float, sigma_max: float) -> list[float]:
    """``factory(n_steps, sigma_min, sigma_max)``; the result must be ``n_steps`` finite, positive,
    non-increasing sigmas."""
    values = factory(steps, sigma_min, sigma_max)
    try:
        sigmas = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"the schedule factory returned {type(values).__name__}, not a sequence of numbers") from None
    if len(sigmas) != steps:
        raise ValueError(f"the schedule factory returned {len(sigmas)} sigmas for {steps} steps; return one per "
                         "step, without the final 0 (the app appends it)")
    if not all(math.isfinite(s) and s > 0 for s in sigmas) or any(b > a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError("the schedule factory must return finite, positive, non-increasing sigmas")
    return sigmas


# ---- feeding a custom sigma schedule to a diffusers scheduler -----------------------------------------
def sigma_feed(cls: type) -> str | None:
    """How scheduler class ``cls`` takes a custom schedule: ``"sigmas"`` (exact, e.g. Euler),
    ``"timesteps"`` (sigmas mapped to training timesteps: DPM++ 2M/SDE, DPM++ 2S a, Heun) or None."""
    params = inspect.signature(cls.set_timesteps).parameters
    if "sigmas" in params and "use_flow_sigmas" not in _init_params(cls):  # UniPC: sigmas only for flow models
        return "sigmas"
    return "timesteps" if "timesteps" in params else None


def train_sigmas(alphas_cumprod: Any) -> Any:
    """The model's sigma per training timestep (ascending), from a scheduler's ``alphas_cumprod``."""
    import numpy as np
    import torch

    ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).numpy()
    return np.sqrt((1.0 - ac) / ac)


def schedule_feed(sigmas: Sequence[float], train: Any, feed: str, final_sigma: float = 0.0) -> list:
    """``sigmas`` as the ``set_timesteps`` argument ``feed``: the sigmas plus the final one, or strictly
    decreasing integer training timesteps (nearest in log-sigma)."""
    import numpy as np

    if feed == "sigmas":
        return [*map(float, sigmas), float(final_sigma)]
    t = np.interp(np.log(np.asarray(sigmas, dtype=np.float64)), np.log(train), np.arange(len(train)))
    steps = [int(v) for v in np.clip(np.rint(t), 0, len(train) - 1)]
    for i in range(1, len(steps)):  # two sigmas on one timestep: move the later one down
        steps[i] = min(steps[i], steps[i - 1] - 1)
    if steps and steps[-1] < 0:
        raise RequestError(f"{len(steps)} steps do not fit into the model's {len(train)} timesteps with this "
                           "schedule type; use fewer steps or a sampler that takes sigmas (Euler)")
    return steps


def custom_sigma_scheduler(cls: type, feed: str, sigmas_for: Callable[[int, float, float], Sequence[float]],
                           config: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """``cls.from_config(config, **overrides)``, except that its ``set_timesteps(n)`` follows
    ``sigmas_for(n, sigma_min, sigma_max)``.

    Built as an instance of a subclass of ``cls``: every pipeline (txt2img, img2img strength, hires fix)
    calls ``set_timesteps(num_inference_steps)``, which the subclass turns into ``set_timesteps(sigmas=...)``
    / ``(timesteps=...)`` of ``cls``.  Calls made while the scheduler is being constructed (Heun sets
    1000 training steps in ``__init__``) and an explicit ``timesteps``/``sigmas`` pass through unchanged.
    """
    base = cls.set_timesteps

    def set_timesteps(self: Any, *args: Any, **kwargs: Any) -> Any:
        steps = args[0] if args else kwargs.get("num_inference_steps")
        if (not self.__dict__.get("_webui_custom_schedule") or len(args) > 2 or steps is None
                or kwargs.get("timesteps") is not None or kwargs.get("sigmas") is not None):
            return base(self, *args, **kwargs)
        device = args[1] if len(args) > 1 else kwargs.get("device")
        rest = {k: v for k, v in kwargs.items() if k not in ("num_inference_steps", "device", "timesteps", "sigmas")}
        train = train_sigmas(self.alphas_cumprod)
        sigmas = sigmas_for(int(steps), float(train[0]), float(train[-1]))
        final = float(train[0]) if getattr(self.config, "final_sigmas_type", "zero") == "sigma_min" else 0.0
        return base(self, device=device, **{feed: schedule_feed(sigmas, train, feed, final)}, **rest)

    set_timesteps.__doc__ = base.__doc__
    custom = type(cls.__name__, (cls,), {"set_timesteps": set_timesteps, "__module__": cls.__module__,
                                         "__doc__": cls.__doc__})
    scheduler = custom.from_config(config, **overrides)
    scheduler.__dict__["_webui_custom_schedule"] = True  # armed once constructed
    return scheduler


# ---- building the registry ----------------------------------------------------------------------------
def _checked_name(extension: str, entry: Any, kind: str, taken: dict[str, str]) -> tuple[str, Callable[..., Any]]:
    name, factory = getattr(entry, "name", None), getattr(entry, "factory", None)
    if (not isinstance(name, str) or not name.strip() or name != name.strip() or len(name) > NAME_MAX
            or not name.isprintable() or ":" in name):
        raise Refused(f"{kind} entry {name!r} refused: a name is a non-empty string of at most {NAME_MAX} "
                      "printable characters, without ':' or leading/trailing spaces")
    if not callable(factory):
        raise Refused(f"{kind} {name!r} refused: its factory is not callable ({type(factory).__name__})")
    for key in (name, f"{extension}:{name}"):
        owner = taken.get(_fold(key))
        if owner is not None:
            raise Refused(f"{kind} {name!r} refused: the name is already taken by {owner} (names are compared "
                          "ignoring case and spaces); rename it in the extension")
    return name, factory


def _schedules(entries: Iterable[tuple[str, Any]], calls: ExtensionCalls, refused: list[str]) -> list[ScheduleSpec]:
    taken = {_fold(k): f"the built-in schedule type {s.label!r}"
             for s in SCHEDULES.values() for k in (s.label, s.name, *s.aliases)}
    out = []
    for extension, entry in entries:
        try:
            name, factory = _checked_name(extension, entry, "schedule type", taken)
            calls.call_entry(extension, f"schedule type {name!r}", run_sigma_factory, factory,
                             PROBE_STEPS, PROBE_SIGMA_MIN, PROBE_SIGMA_MAX)
        except (Refused, RequestError) as exc:
            _refuse(calls, extension, str(exc), refused, report=isinstance(exc, Refused))
            continue
        for key in (name, f"{extension}:{name}"):
            taken[_fold(key)] = f"the schedule type {name!r} of the extension {extension!r}"
        out.append(ScheduleSpec(name, name, aliases=(f"{extension}:{name}",), extension=extension, sigmas=factory))
    return out


def _samplers(entries: Iterable[tuple[str, Any]], calls: ExtensionCalls, extra: tuple[str, ...],
              refused: list[str]) -> list[SamplerSpec]:
    taken = {_fold(k): f"the built-in sampler {s.name!r}" for s in SAMPLERS.values() for k in (s.name, *s.aliases)}
    out = []
    for extension, entry in entries:
        try:
            name, factory = _checked_name(extension, entry, "sampler", taken)
            made = calls.call_entry(extension, f"sampler {name!r}", run_sampler_factory, factory, dict(PROBE_CONFIG), 0)
        except (Refused, RequestError) as exc:
            _refuse(calls, extension, str(exc), refused, report=isinstance(exc, Refused))
            continue
        for key in (name, f"{extension}:{name}"):
            taken[_fold(key)] = f"the sampler {name!r} of the extension {extension!r}"
        cls = type(made)
        accepted = _init_params(cls)
        schedules = [label for label, spec in SCHEDULES.items() if all(k in accepted for k in spec.required)]
        if sigma_feed(cls):
            schedules += extra
        out.append(SamplerSpec(name, cls.__name__, {}, tuple(schedules), aliases=(f"{extension}:{name}",),
                               second_order=getattr(made, "order", 1) == 2, extension=extension, factory=factory,
                               note=str(getattr(entry, "description", "") or "")))
    return out


def _refuse(calls: ExtensionCalls, extension: str, message: str, refused: list[str], *, report: bool) -> None:
    refused.append(f"extension {extension!r}: {message}")
    log.warning("extension %s: %s", extension, message.splitlines()[0])
    if report:  # a failing factory already disabled the extension (with its traceback)
        calls.report_problem(extension, message)


def build_registry(sampler_entries: Iterable[tuple[str, Any]], schedule_entries: Iterable[tuple[str, Any]],
                   calls: ExtensionCalls) -> SamplerRegistry:
    """Built-ins plus the valid extension entries (``(extension, NamedEntry)`` pairs, in hook order)."""
    refused: list[str] = []
    schedules = _schedules(schedule_entries, calls, refused)
    extra = tuple(s.label for s in schedules)
    builtin = dict(SAMPLERS)
    if extra:  # built-in samplers whose class takes custom sigmas/timesteps also offer them
        for name, spec in SAMPLERS.items():
            if spec.schedules != (AUTOMATIC,) and sigma_feed(scheduler_class(spec.cls_name)):
                builtin[name] = dataclasses.replace(spec, schedules=spec.schedules + extra)
    samplers = _samplers(sampler_entries, calls, extra, refused)
    return SamplerRegistry(samplers={**builtin, **{s.name: s for s in samplers}},
                           schedules={**SCHEDULES, **{s.label: s for s in schedules}},
                           calls=calls, refused=tuple(refused))
