"""Hook specifications of the extension API (``API_VERSION`` in ``webui.plugins.api``).

Rules (see ``docs/extensions.md``): the app calls every hook with keyword arguments only, so their order
never matters; specs and implementations declare them as plain parameters (pluggy reads those, it does
not see parameters after a bare ``*``).  An implementation may accept any subset
of a hook's arguments (pluggy "opt-in arguments"), so adding an argument is a minor-version change;
an implementation that names an argument the spec lacks is refused at load time.  Every hook also gets
``api`` (an ``ExtensionAPI`` bound to the calling extension).  The app calls each implementation on its
own inside ``try/except``: one that raises disables its extension until restart, never the app.

Chained hooks (``webui_modify_request``, ``webui_prompt_syntax``, ``webui_postprocess_image``) pass the
value returned by one extension to the next; returning ``None`` means "unchanged".
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # types only; extensions import them from webui.plugins.api
    from webui.plugins.api import ExtensionAPI, NamedEntry, SettingSpec, UIPart
    from webui.types import GenerationRequest, Progress

hookspec = pluggy.HookspecMarker("webui")


# ---------------------------------------------------------------------------------------------------
# Start-up: called once while the app is built (settings before the UI, routes after it)
# ---------------------------------------------------------------------------------------------------

@hookspec
def webui_settings(api: "ExtensionAPI") -> "list[SettingSpec] | None":
    """Settings this extension adds; validated and saved like the app's own options.

    Keys must not collide with the app's keys or another extension's (the colliding spec is refused).

    .. versionadded:: 1.0
    """


@hookspec
def webui_ui(api: "ExtensionAPI") -> "list[UIPart] | None":
    """UI parts: a new tab (``UIPart(tab=None)``) or an accordion in an existing tab (``tab="txt2img"``).

    .. versionadded:: 1.0
    """


@hookspec
def webui_api_routes(router: Any, api: "ExtensionAPI") -> None:
    """Add HTTP routes to ``router``, a FastAPI ``APIRouter`` mounted at ``/ext/<name>``.

    The app's API credentials (``--api-auth``/``--gradio-auth``) and body limit apply to every route;
    routes answer 404 while the extension is disabled.

    .. versionadded:: 1.0
    """


# ---------------------------------------------------------------------------------------------------
# Generation: called for every job (modify/prompt on submit; steps and images on the worker thread)
# ---------------------------------------------------------------------------------------------------

@hookspec
def webui_modify_request(request: "GenerationRequest", api: "ExtensionAPI") -> "GenerationRequest | None":
    """Return a changed copy (``request.with_changes(...)``) or ``None``.  Called when a job is submitted,
    after the checkpoint/VAE are resolved and before ``webui_prompt_syntax``.

    .. versionadded:: 1.0
    """


@hookspec
def webui_prompt_syntax(prompt: str, seed: int, negative: bool, api: "ExtensionAPI") -> "str | None":
    """Expand custom prompt syntax (wildcards, styles...) in ``prompt`` (called for the positive prompt,
    then with ``negative=True`` for the negative one).  ``seed`` is the job's seed (-1: random).
    Return the new text or ``None``.  The expanded prompt is what the infotext records.

    .. versionadded:: 1.0
    """


@hookspec
def webui_on_step(progress: "Progress", request: "GenerationRequest", api: "ExtensionAPI") -> None:
    """Observe one finished sampling step (read-only; keep it fast, it runs on the worker thread).

    .. versionadded:: 1.0
    """


@hookspec
def webui_postprocess_image(image: Any, seed: int, index: int, request: "GenerationRequest",
                            api: "ExtensionAPI") -> Any:
    """Post-process one decoded image (a PIL image) before its infotext is written and it is saved.
    Return a PIL image or ``None`` (unchanged).  ``index`` counts images within the job.

    .. versionadded:: 1.0
    """


# ---------------------------------------------------------------------------------------------------
# Registries: ``webui_upscalers`` (1.0), ``webui_samplers`` and ``webui_schedulers`` (1.1) are used;
# ControlNet preprocessors are reserved (collected; used in a later 1.x without changing the signature).
# Registry entries are collected once at start-up: an extension enabled later adds them after a restart.
# ---------------------------------------------------------------------------------------------------

@hookspec
def webui_samplers(api: "ExtensionAPI") -> "list[NamedEntry] | None":
    """Extra samplers (sampling methods), listed after the built-ins in the UI, ``/sdapi/v1/samplers`` and
    accepted as ``sampler_name`` (also as ``<extension>:<name>``).

    ``factory(scheduler_config) -> diffusers scheduler`` (a ``SchedulerMixin``); it may also declare ``seed``
    (the job's seed).  ``scheduler_config`` is a copy of the model's scheduler config dict; build from it,
    e.g. ``EulerDiscreteScheduler.from_config(scheduler_config, timestep_spacing="trailing")``.  The app
    rebuilds the result with ``type(s).from_config(s.config, ...)`` to apply the model's prediction type /
    zero-terminal SNR and the sigma options of a chosen schedule type ("Automatic" keeps yours), so pass
    every option as a constructor argument.  The schedule types offered are those whose options the class
    accepts (plus ``webui_schedulers`` entries if its ``set_timesteps`` takes ``sigmas``/``timesteps``).

    The factory is probed once at start-up with an SD 1.5 config: a failing probe, or a failure in a job,
    disables the extension (that job fails with a message).  A name already taken (a built-in, another
    extension) is refused and the reason is shown in the Extensions tab.

    .. versionadded:: 1.0 (reserved)
    .. versionchanged:: 1.1 used by generation
    """


@hookspec
def webui_schedulers(api: "ExtensionAPI") -> "list[NamedEntry] | None":
    """Extra schedule types (sigma schedules), listed after the built-ins ("Schedule type",
    ``/sdapi/v1/schedulers``, the ``scheduler`` field).

    ``factory(n_steps, sigma_min, sigma_max) -> sigmas``: ``n_steps`` finite, positive, non-increasing
    floats (a list, numpy array or tensor), without the final 0, which the app appends.  ``sigma_min`` /
    ``sigma_max`` are the model's (from its noise schedule).  diffusers takes a custom schedule through
    ``set_timesteps(sigmas=...)`` (Euler: exact) or ``set_timesteps(timesteps=...)`` (DPM++ 2M and its SDE
    variants, DPM++ 2S a, Heun: each sigma is mapped to the nearest training timestep), so the schedule type
    is offered for those samplers only; others refuse it with a message.  Probed once at start-up
    (4 steps); failures are isolated as for ``webui_samplers``.

    .. versionadded:: 1.0 (reserved)
    .. versionchanged:: 1.1 used by generation
    """


@hookspec
def webui_upscalers(api: "ExtensionAPI") -> "list[NamedEntry] | None":
    """Extra upscalers. ``factory(image, scale) -> image`` (PIL in, PIL out).  Listed in the Upscale tab and
    the hires-fix upscaler list after the built-ins and model files (a name already taken is skipped); an
    exception inside ``factory`` fails that upscale job with its message.

    .. versionadded:: 1.0
    """


@hookspec
def webui_controlnet_preprocessors(api: "ExtensionAPI") -> "list[NamedEntry] | None":
    """Extra ControlNet preprocessors. ``factory(image, **params) -> image``.

    .. versionadded:: 1.0 (reserved)
    """


REGISTRY_HOOKS = ("webui_samplers", "webui_schedulers", "webui_upscalers", "webui_controlnet_preprocessors")
