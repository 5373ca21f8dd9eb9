"""A1111 sampler and schedule names -> diffusers schedulers, as a table of data.

A1111 (and every API client written for it) names a sampling method by two strings: the sampler
("DPM++ 2M") and the schedule type ("Karras").  diffusers folds both into one scheduler class plus
config flags.  ``SAMPLERS`` and ``SCHEDULES`` below are that translation; nothing else in the app
knows diffusers scheduler class names.

Mapping follows the diffusers "Schedulers" overview table (A1111/k-diffusion -> diffusers) and
A1111's own defaults (``samplers_k_diffusion`` options): "Automatic" means the schedule A1111 uses
for that sampler (Karras for DPM++ 2M, Exponential for the 2M/3M SDE family, uniform timesteps for
Euler...), and the timestep-based samplers (DDIM, PLMS, UniPC, DEIS, LCM) keep the model's own
spacing.  Old single-string names ("DPM++ 2M Karras", "k_dpmpp_2m_ka") keep working.

Schedulers carry per-run step state, so ``make_scheduler`` builds a fresh one on every call.
Class names are stored as strings and looked up in diffusers lazily, so importing this module (for
example from the pure infotext code) does not import torch.

``SamplerRegistry`` holds the two tables (immutable).  ``BUILTIN`` is the built-in one; the app builds
its own once at start-up with the extensions' ``webui_samplers`` / ``webui_schedulers`` entries
(``webui.plugins.registries.sampler_registry``, stored as ``ctx.samplers``).  The module-level
functions work on ``BUILTIN`` unless given ``registry=``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from webui.types import RequestError

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import SchedulerMixin

AUTOMATIC = "Automatic"


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule type.  ``required`` options must be accepted by the scheduler class;
    ``preferred`` ones are applied only where the class has them."""

    label: str  # what the UI and infotext show ("Karras")
    name: str  # A1111's internal name ("karras")
    required: Mapping[str, Any] = field(default_factory=dict)
    preferred: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    extension: str | None = None  # set for a schedule from an extension (``webui_schedulers``)
    # extension schedules: factory(n_steps, sigma_min, sigma_max) -> n_steps descending sigmas
    sigmas: Callable[[int, float, float], Sequence[float]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:  # registry entries are read-only
        object.__setattr__(self, "required", MappingProxyType(dict(self.required)))
        object.__setattr__(self, "preferred", MappingProxyType(dict(self.preferred)))


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    cls_name: str  # diffusers scheduler class
    overrides: Mapping[str, Any]
    schedules: tuple[str, ...]  # schedule labels this sampler supports (Automatic always first)
    default_schedule: str | None = None  # what "Automatic" means; None: the model's own spacing
    aliases: tuple[str, ...] = ()
    stochastic: bool = False  # consumes a generator each step (ancestral/SDE/LCM)
    brownian: bool = False  # seeds a Brownian tree (DPMSolverSDEScheduler.noise_sampler_seed)
    second_order: bool = False  # two model calls per step
    note: str = ""
    extension: str | None = None  # set for a sampler from an extension (``webui_samplers``)
    # extension samplers: factory(scheduler_config[, seed=]) -> diffusers scheduler
    factory: Callable[..., Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))


# Sigma-schedule flags; every build resets them so a model config that ships with
# use_karras_sigmas=True cannot leak Karras into a "Uniform" request.
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# A1111 computes Karras/Exponential/Beta between the model's full sigma_min..sigma_max; diffusers
# takes that range from the spaced timesteps, so "linspace" (999..0) reproduces it.
_FULL_RANGE = MappingProxyType({"timestep_spacing": "linspace"})

SCHEDULES: Mapping[str, ScheduleSpec] = MappingProxyType({s.label: s for s in (
    ScheduleSpec(AUTOMATIC, "automatic"),
    ScheduleSpec("Uniform", "uniform", preferred=_FULL_RANGE),
    ScheduleSpec("Karras", "karras", {"use_karras_sigmas": True}, _FULL_RANGE),
    ScheduleSpec("Exponential", "exponential", {"use_exponential_sigmas": True}, _FULL_RANGE),
    ScheduleSpec("Beta", "beta", {"use_beta_sigmas": True}, _FULL_RANGE),
    # diffusers docs: sgm_uniform and simple both correspond to "trailing" spacing (999, 949, ...).
    ScheduleSpec("SGM Uniform", "sgm_uniform", {"timestep_spacing": "trailing"}, aliases=("SGMUniform",)),
    ScheduleSpec("Simple", "simple", {"timestep_spacing": "trailing"}),
    # A1111 "normal": linspace(t_max, 0, steps) == uniform timesteps.
    ScheduleSpec("Normal", "normal", {"timestep_spacing": "linspace"}),
)})

_ALL = (AUTOMATIC, "Uniform", "Karras", "Exponential", "Beta", "SGM Uniform", "Simple", "Normal")
_SPACING_ONLY = (AUTOMATIC, "Uniform", "SGM Uniform", "Simple", "Normal")
_SIGMAS_NO_SPACING = (AUTOMATIC, "Uniform", "Karras", "Exponential", "Beta")

_DPM = "DPMSolverMultistepScheduler"
SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType({s.name: s for s in (
    SamplerSpec("DPM++ 2M", _DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2}, _ALL,
                "Karras", ("k_dpmpp_2m",)),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, _ALL, "Karras", ("k_dpmpp_sde",),
                stochastic=True, brownian=True, second_order=True),
    SamplerSpec("DPM++ 2M SDE", _DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                       "solver_type": "midpoint"},
                _ALL, "Exponential", ("k_dpmpp_2m_sde",), stochastic=True),
    SamplerSpec("DPM++ 2M SDE Heun", _DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                            "solver_type": "heun"},
                _ALL, "Exponential", ("k_dpmpp_2m_sde_heun",), stochastic=True),
    SamplerSpec("DPM++ 2S a", "DPMSolverSinglestepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "lower_order_final": True},
                _SIGMAS_NO_SPACING, "Karras", ("k_dpmpp_2s_a",), stochastic=True,
                note="approximation: diffusers has no DPM++ 2S ancestral; uses singlestep SDE-DPM++ order 2"),
    SamplerSpec("DPM++ 3M SDE", _DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
                _ALL, "Exponential", ("k_dpmpp_3m_sde",), stochastic=True),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, _SPACING_ONLY, "Uniform",
                ("k_euler_a", "k_euler_ancestral", "Euler Ancestral"), stochastic=True),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {"interpolation_type": "linear"}, _ALL, "Uniform",
                ("k_euler",)),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, _ALL, "Uniform", ("k_lms",)),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, _ALL, "Uniform", ("k_heun",), second_order=True),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, _ALL, "Karras", ("k_dpm_2",), second_order=True),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, _ALL, "Karras", ("k_dpm_2_a",),
                stochastic=True, second_order=True),
    SamplerSpec("DDIM", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}, _SPACING_ONLY,
                aliases=("ddim",)),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False},
                _SPACING_ONLY, aliases=("plms", "PNDM")),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {"solver_order": 2}, _ALL, aliases=("unipc",)),
    SamplerSpec("DEIS", "DEISMultistepScheduler", {"solver_order": 2}, _ALL, aliases=("deis",)),
    SamplerSpec("LCM", "LCMScheduler", {}, (AUTOMATIC,), aliases=("k_lcm", "lcm"), stochastic=True,
                note="for LCM-distilled models or an LCM LoRA: 4-8 steps, CFG 1-2"),
)})

# Old A1111 API aliases with the schedule baked in: k_dpmpp_2m_ka -> DPM++ 2M + Karras.
_LEGACY_SUFFIXES = {"_ka": "Karras", "_exp": "Exponential"}


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved (sampler, schedule) pair, ready to build a scheduler from."""

    sampler: str  # canonical A1111 name ("DPM++ 2M")
    schedule: str  # effective schedule label ("Karras"); "Automatic" where the model spacing is kept
    spec: SamplerSpec
    schedule_spec: ScheduleSpec

    @property
    def stochastic(self) -> bool:
        return self.spec.stochastic

    @property
    def cls_name(self) -> str:
        return self.spec.cls_name


class ExtensionCalls(Protocol):
    """How a registry runs extension code; ``webui.plugins.manager.PluginManager`` implements it."""

    def extension_active(self, name: str) -> bool: ...

    def call_entry(self, name: str, where: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...

    def report_problem(self, name: str, message: str) -> None: ...


class DirectCalls:
    """Extension code called as is (no plugin manager: tests, tools); failures become a ``RequestError``."""

    def extension_active(self, name: str) -> bool:
        return True

    def call_entry(self, name: str, where: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError(f"{where} from extension {name!r} failed: {type(exc).__name__}: {exc}") from exc

    def report_problem(self, name: str, message: str) -> None:  # kept in ``SamplerRegistry.refused``
        pass


def _fold(name: str) -> str:
    return " ".join(name.strip().split()).casefold()


@dataclass(frozen=True)
class SamplerRegistry:
    """Samplers and schedule types by name (immutable).  ``SamplerRegistry()`` is the built-in table.

    Entries with ``extension`` set come from extensions; they are offered only while that extension is
    active, and their factories run through ``calls`` (which isolates a failing extension)."""

    samplers: Mapping[str, SamplerSpec] = field(default_factory=lambda: SAMPLERS)
    schedules: Mapping[str, ScheduleSpec] = field(default_factory=lambda: SCHEDULES)
    calls: ExtensionCalls = field(default_factory=DirectCalls, compare=False, repr=False)
    refused: tuple[str, ...] = ()  # extension entries that were not added, each with the reason
    _sampler_keys: Mapping[str, str] = field(init=False, repr=False, compare=False)
    _schedule_keys: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "samplers", MappingProxyType(dict(self.samplers)))
        object.__setattr__(self, "schedules", MappingProxyType(dict(self.schedules)))
        samplers = {_fold(k): s.name for s in self.samplers.values() for k in (s.name, *s.aliases)}
        schedules = {_fold(k): s.label for s in self.schedules.values() for k in (s.label, s.name, *s.aliases)}
        object.__setattr__(self, "_sampler_keys", MappingProxyType(samplers))
        object.__setattr__(self, "_schedule_keys", MappingProxyType(schedules))

    @classmethod
    def from_plugins(cls, plugins: Any) -> "SamplerRegistry":
        """Built-ins plus the ``webui_samplers`` / ``webui_schedulers`` entries of ``plugins`` (a
        ``PluginManager``; None: built-ins only).  Called once at start-up (``ctx.samplers``)."""
        if plugins is None:
            return cls()
        samplers = plugins.registry_entries("webui_samplers")
        schedules = plugins.registry_entries("webui_schedulers")
        if not samplers and not schedules:
            return cls(calls=plugins)
        from webui.generation.sampler_extensions import build_registry

        return build_registry(samplers, schedules, plugins)

    # ---- names ----------------------------------------------------------------------------
    def available(self, spec: SamplerSpec | ScheduleSpec) -> bool:
        return spec.extension is None or self.calls.extension_active(spec.extension)

    def sampler_names(self) -> list[str]:
        return [name for name, spec in self.samplers.items() if self.available(spec)]

    def schedule_names(self) -> list[str]:
        return [label for label, spec in self.schedules.items() if self.available(spec)]

    def canonical_schedule(self, schedule: str | None) -> str | None:
        """Schedule label for a label/name/alias ("karras" -> "Karras"), or None if unknown."""
        if not schedule:
            return AUTOMATIC
        return self._schedule_keys.get(_fold(schedule))

    def split_legacy_name(self, name: str) -> tuple[str | None, str | None]:
        """Split an A1111 sampler string into (canonical sampler, implied schedule label).

        "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"); "k_euler_a" -> ("Euler a", None);
        unknown -> (None, None).  Pure; does not import diffusers.
        """
        samplers = self._sampler_keys
        folded = _fold(name or "")
        if folded in samplers:
            return samplers[folded], None
        for suffix, label in _LEGACY_SUFFIXES.items():
            if folded.endswith(suffix) and folded[: -len(suffix)] in samplers:
                return samplers[folded[: -len(suffix)]], label
        for key, label in self._schedule_keys.items():  # A1111 get_sampler_and_scheduler: "<sampler> <schedule>"
            if folded.endswith(" " + key) and folded[: -len(key) - 1] in samplers:
                return samplers[folded[: -len(key) - 1]], label
        return None, None

    def resolve(self, sampler: str, schedule: str | None = AUTOMATIC) -> SamplerChoice:
        """Validate a (sampler, schedule) pair; raise ``RequestError`` naming the valid choices."""
        name, implied = self.split_legacy_name(sampler)
        if name is None:
            raise RequestError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(self.sampler_names())}")
        label = self.canonical_schedule(schedule)
        if label is None:
            raise RequestError(f"unknown schedule type {schedule!r}; valid schedule types: "
                               f"{', '.join(self.schedule_names())}")
        if implied is not None:  # as in A1111, a schedule spelled into the sampler name wins
            label = implied
        spec = self.samplers[name]
        for what, entry, shown in (("sampler", spec, name), ("schedule type", self.schedules[label], label)):
            if not self.available(entry):
                raise RequestError(f"{what} {shown!r} comes from the extension {entry.extension!r}, which is disabled "
                                   f"or failed (see the Extensions tab); enable it there or choose another {what}")
        if label not in spec.schedules:
            raise RequestError(
                f"sampler {name!r} does not support schedule type {label!r}; "
                f"use one of: {', '.join(s for s in spec.schedules if self.available(self.schedules[s]))}"
            )
        if label == AUTOMATIC and spec.default_schedule:
            label = spec.default_schedule
        return SamplerChoice(sampler=name, schedule=label, spec=spec, schedule_spec=self.schedules[label])

    # ---- building schedulers --------------------------------------------------------------
    def make_scheduler(
        self,
        base_config: Mapping[str, Any],
        sampler: str,
        schedule: str | None = AUTOMATIC,
        *,
        prediction_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        seed: int | None = None,
    ) -> "SchedulerMixin":
        """A fresh scheduler for one job, built from the model's scheduler config.

        ``base_config`` is the checkpoint's scheduler config (any scheduler class; its betas and
        prediction type carry over).  ``seed`` seeds the Brownian tree of DPM++ SDE (and is offered to
        extension samplers) so that the image is reproducible from its infotext.
        """
        choice = self.resolve(sampler, schedule)
        spec, sched = choice.spec, choice.schedule_spec
        if spec.factory is not None:  # extension sampler: its factory picks the class and the options
            from webui.generation.sampler_extensions import run_sampler_factory

            made = self.calls.call_entry(spec.extension, f"sampler {spec.name!r}", run_sampler_factory,
                                         spec.factory, dict(base_config), seed)
            cls: type = type(made)
            accepted = _init_params(cls)
            config = {k: v for k, v in dict(made.config).items() if k in accepted}
            # "Automatic" keeps the extension's own sigma options; a chosen schedule type replaces them
            overrides = {} if choice.schedule == AUTOMATIC else scheduler_overrides(choice, accepted)
        else:
            cls = scheduler_class(spec.cls_name)
            accepted = _init_params(cls)
            config = {k: v for k, v in dict(base_config).items() if k in accepted}
            overrides = scheduler_overrides(choice, accepted)
        if prediction_type is not None and "prediction_type" in accepted:
            overrides["prediction_type"] = prediction_type
        if rescale_betas_zero_snr:
            if "rescale_betas_zero_snr" not in accepted:
                able = [s.name for s in self.samplers.values() if s.factory is None
                        and "rescale_betas_zero_snr" in _init_params(scheduler_class(s.cls_name))]
                raise RequestError(f"sampler {choice.sampler!r} does not support zero-terminal-SNR models; "
                                   f"use one of: {', '.join(able)}")
            overrides["rescale_betas_zero_snr"] = True
        elif "rescale_betas_zero_snr" in accepted:
            overrides["rescale_betas_zero_snr"] = False
        if spec.brownian and seed is not None and "noise_sampler_seed" in accepted:
            overrides["noise_sampler_seed"] = int(seed)
        if sched.sigmas is not None:
            return self._custom_sigma_scheduler(cls, sched, config, overrides)
        return cls.from_config(config, **overrides)

    def _custom_sigma_scheduler(self, cls: type, sched: ScheduleSpec, config: dict, overrides: dict) -> Any:
        from webui.generation.sampler_extensions import custom_sigma_scheduler, run_sigma_factory, sigma_feed

        feed = sigma_feed(cls)
        if feed is None:
            raise RequestError(f"schedule type {sched.label!r} (extension {sched.extension!r}) needs a sampler whose "
                               f"diffusers scheduler takes custom sigmas or timesteps; {cls.__name__} does not")

        def sigmas_for(steps: int, sigma_min: float, sigma_max: float) -> list[float]:
            return self.calls.call_entry(sched.extension, f"schedule type {sched.label!r}", run_sigma_factory,
                                         sched.sigmas, steps, sigma_min, sigma_max)

        return custom_sigma_scheduler(cls, feed, sigmas_for, config, overrides)

    # ---- A1111 listings -------------------------------------------------------------------
    def describe_samplers(self) -> list[dict[str, Any]]:
        """Entries for the A1111 ``/sdapi/v1/samplers`` endpoint (``options`` values are strings)."""
        out = []
        for spec in self.samplers.values():
            if not self.available(spec):
                continue
            options = {"scheduler": self.schedules[spec.default_schedule].name if spec.default_schedule
                       else "automatic", "diffusers_class": spec.cls_name, "schedules": ", ".join(spec.schedules)}
            if spec.stochastic:
                options["uses_ensd"] = "True"
            if spec.brownian:
                options["brownian_noise"] = "True"
            if spec.second_order:
                options["second_order"] = "True"
            if spec.note:
                options["note"] = spec.note
            if spec.extension:
                options["extension"] = spec.extension
            out.append({"name": spec.name, "aliases": list(spec.aliases), "options": options})
        return out

    def describe_schedules(self) -> list[dict[str, Any]]:
        """Entries for the A1111 ``/sdapi/v1/schedulers`` endpoint."""
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
                 "default_rho": 7.0 if s.name == "karras" else -1.0, "need_inner_model": False}
                for s in self.schedules.values() if self.available(s)]


def scheduler_class(cls_name: str) -> type:
    import diffusers

    return getattr(diffusers, cls_name)


def _init_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def scheduler_overrides(choice: SamplerChoice, accepted: frozenset[str]) -> dict[str, Any]:
    """The config overrides for ``choice`` given the scheduler class's accepted options."""
    overrides: dict[str, Any] = {flag: False for flag in _SIGMA_FLAGS if flag in accepted}
    overrides.update(choice.spec.overrides)
    overrides.update({k: v for k, v in choice.schedule_spec.preferred.items() if k in accepted})
    missing = [k for k in choice.schedule_spec.required if k not in accepted]
    if missing:  # the table promised something this diffusers version lacks
        raise RequestError(
            f"sampler {choice.sampler!r} cannot use schedule type {choice.schedule!r} with this diffusers "
            f"version (no {', '.join(missing)}); use one of: {', '.join(choice.spec.schedules)}"
        )
    overrides.update(choice.schedule_spec.required)
    return overrides


# ---- the built-in registry and the functions callers have always used ----------------------------
BUILTIN = SamplerRegistry()


def _reg(registry: SamplerRegistry | None) -> SamplerRegistry:
    return BUILTIN if registry is None else registry


def sampler_names(registry: SamplerRegistry | None = None) -> list[str]:
    return _reg(registry).sampler_names()


def schedule_names(registry: SamplerRegistry | None = None) -> list[str]:
    return _reg(registry).schedule_names()


def canonical_schedule(schedule: str | None, registry: SamplerRegistry | None = None) -> str | None:
    """Schedule label for a label/name/alias ("karras" -> "Karras"), or None if unknown."""
    return _reg(registry).canonical_schedule(schedule)


def split_legacy_name(name: str, registry: SamplerRegistry | None = None) -> tuple[str | None, str | None]:
    """See ``SamplerRegistry.split_legacy_name``."""
    return _reg(registry).split_legacy_name(name)


def resolve(sampler: str, schedule: str | None = AUTOMATIC, registry: SamplerRegistry | None = None) -> SamplerChoice:
    """Validate a (sampler, schedule) pair; raise ``RequestError`` naming the valid choices."""
    return _reg(registry).resolve(sampler, schedule)


def make_scheduler(
    base_config: Mapping[str, Any],
    sampler: str,
    schedule: str | None = AUTOMATIC,
    *,
    prediction_type: str | None = None,
    rescale_betas_zero_snr: bool = False,
    seed: int | None = None,
    registry: SamplerRegistry | None = None,
) -> "SchedulerMixin":
    """A fresh scheduler for one job (see ``SamplerRegistry.make_scheduler``)."""
    return _reg(registry).make_scheduler(base_config, sampler, schedule, prediction_type=prediction_type,
                                         rescale_betas_zero_snr=rescale_betas_zero_snr, seed=seed)


def describe_samplers(registry: SamplerRegistry | None = None) -> list[dict[str, Any]]:
    """Entries for the A1111 ``/sdapi/v1/samplers`` endpoint (``options`` values are strings)."""
    return _reg(registry).describe_samplers()


def describe_schedules(registry: SamplerRegistry | None = None) -> list[dict[str, Any]]:
    """Entries for the A1111 ``/sdapi/v1/schedulers`` endpoint."""
    return _reg(registry).describe_schedules()
