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
# Registries: ``webui_upscalers`` is used in 1.0; samplers, schedulers and ControlNet preprocessors are
# reserved (collected; the generation code starts using them in a later 1.x without changing signatures)
# ---------------------------------------------------------------------------------------------------

@hookspec
def webui_samplers(api: "ExtensionAPI") -> "list[NamedEntry] | None":
    """Extra samplers. ``factory(scheduler_config) -> diffusers scheduler``.

    .. versionadded:: 1.0 (reserved)
    """


@hookspec
def webui_schedulers(api: "ExtensionAPI") -> "list[NamedEntry] | None":
    """Extra schedule types (sigma schedules). ``factory(n_steps, sigma_min, sigma_max) -> sigmas``.

    .. versionadded:: 1.0 (reserved)
    """


@hookspec
def webui_upscalers(api: "ExtensionAPI") -> "list[NamedEntry] | None":
    """Extra upscalers. ``factory(image, scale) -> image`` (PIL in, PIL out).  Listed in the Upscale tab and
    the hires-fix upscaler list after the built-ins and model files (a name already taken is skipped); an
    exception inside ``factory`` fails that upscale job with its message.

    .. versionadded:: 1.0 (in use since 1.0; the other registry hooks below are reserved)
    """


@hookspec
def webui_controlnet_preprocessors(api: "ExtensionAPI") -> "list[NamedEntry] | None":
    """Extra ControlNet preprocessors. ``factory(image, **params) -> image``.

    .. versionadded:: 1.0 (reserved)
    """


REGISTRY_HOOKS = ("webui_samplers", "webui_schedulers", "webui_upscalers", "webui_controlnet_preprocessors")
