"""The public extension API: the ONLY module an extension imports.

Everything here follows semantic versioning through ``API_VERSION`` (see ``docs/extensions.md``):

* a new hook, a new opt-in hook argument, a new optional field -> minor version (1.x);
* deprecated hooks/arguments warn (pluggy ``warn_on_impl``/``warn_on_impl_args``) for at least one minor
  version before they are removed in the next major version.

Typical extension module::

    from webui.plugins.api import hookimpl, SettingSpec

    @hookimpl
    def webui_settings():
        return [SettingSpec(key="myext_enabled", default=True, label="Enable my extension")]

    @hookimpl
    def webui_prompt_syntax(prompt, seed, api):
        return prompt.replace("{cat}", "a cat") if api.option("myext_enabled") else None
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pluggy

from webui.types import GeneratedImage, GenerationRequest, GenerationResult, LoraRef, Progress, RequestError

API_VERSION = "1.1.0"  # 1.1: webui_samplers / webui_schedulers are used (were reserved in 1.0)
PROJECT = "webui"

hookimpl = pluggy.HookimplMarker(PROJECT)
"""Decorate an extension's hook implementations with ``@hookimpl`` (``tryfirst``/``trylast`` work)."""


@dataclass(frozen=True, kw_only=True)
class SettingSpec:
    """One user-editable setting contributed by an extension (shown in the Extensions tab).

    ``kind`` is ``bool``, ``int``, ``float`` or ``str``; values are validated like the app's own options
    (range, type) and saved in ``config.json`` under ``key``.  Prefix keys with the extension's name.
    """

    key: str
    default: Any
    label: str
    kind: type | None = None  # None: type(default)
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class UIPart:
    """A piece of UI an extension adds.

    ``render(api)`` is called inside a new ``gr.Tab`` (``tab=None``) or inside a ``gr.Accordion`` appended
    to an existing tab (``tab="txt2img"``, ``"png_info"``, ``"settings"``, ``"extensions"``...).  It creates
    Gradio components and wires their events itself; it may return ``{name: component}``.
    """

    label: str
    render: Callable[["ExtensionAPI"], Mapping[str, Any] | None]
    tab: str | None = None
    key: str = ""  # suffix for elem ids; default: the label, lower-cased


@dataclass(frozen=True, kw_only=True)
class NamedEntry:
    """An entry for a registry hook; what ``factory`` is depends on the hook (see its spec in ``spec.py``):

    * ``webui_samplers``: ``factory(scheduler_config: dict) -> diffusers scheduler`` (may also take ``seed=``);
    * ``webui_schedulers``: ``factory(n_steps, sigma_min, sigma_max) -> n_steps sigmas``;
    * ``webui_upscalers``: ``factory(image, scale) -> image``;
    * ``webui_controlnet_preprocessors`` (reserved): ``factory(image, **params) -> image``.

    ``name`` is what users see and type (UI lists, the API, infotext); ``description`` is shown with it.
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""


@dataclass(frozen=True)
class ExtensionAPI:
    """The narrow facade every hook receives as ``api``: what an extension may use of the app.

    It never exposes internals (the model manager, the worker, Gradio blocks); new members are added in
    minor versions only.
    """

    name: str
    folder: Path | None  # the extension's own folder (None for an installed distribution)
    data_dir: Path  # a writable folder for this extension (created on first use)
    logger: logging.Logger
    _option: Callable[[str], Any] = field(repr=False)
    _listens_publicly: bool = False
    api_version: str = API_VERSION

    def option(self, key: str, default: Any = None) -> Any:
        """The current value of a setting (the extension's own or the app's, e.g. ``"samples_save"``)."""
        try:
            return self._option(key)
        except KeyError:
            return default

    @property
    def listens_publicly(self) -> bool:
        return self._listens_publicly

    def ensure_data_dir(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir


__all__ = [
    "API_VERSION",
    "ExtensionAPI",
    "GeneratedImage",
    "GenerationRequest",
    "GenerationResult",
    "LoraRef",
    "NamedEntry",
    "Progress",
    "RequestError",
    "SettingSpec",
    "UIPart",
    "hookimpl",
]
