"""Settings tab: ``OPTION_SPECS`` grouped by section; Apply saves the changed ones via ``ctx.set_options``.

Widgets come from the spec's type (bool -> checkbox, int/float -> number, str -> textbox); options whose
valid values are catalog or registry names get a dropdown that still accepts other values (the store
validates).  Invalid values show the ``OptionError`` message and nothing is saved.
"""
from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from webui.generation.samplers import sampler_names, schedule_names
from webui.options import OPTION_SPECS, OptionError, OptionSpec
from webui.types import RequestError
from webui.ui.common import Registry, status_html

SECTION = "settings"


def _dynamic_choices(ctx: Any) -> dict[str, Callable[[], list[str]]]:
    return {
        "sd_model_checkpoint": lambda: [r.name for r in ctx.usable_checkpoints()],
        "sd_vae": lambda: ["Automatic", *(r.name for r in ctx.vaes() if not r.error)],
        "default_sampler": lambda: list(sampler_names()),
        "default_schedule": lambda: list(schedule_names()),
    }


def _choices(ctx: Any, spec: OptionSpec) -> list[str] | None:
    if spec.choices is not None:
        return list(spec.choices())
    make = _dynamic_choices(ctx).get(spec.key)
    return make() if make else None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _widget(ctx: Any, spec: OptionSpec, value: Any) -> Any:
    common = {"label": spec.label, "elem_id": f"setting_{spec.key}"}
    choices = _choices(ctx, spec)
    if choices is not None:
        if value not in choices and value not in ("", None):
            choices = [value, *choices]
        # "" (not None) keeps the API parameter optional; a blank dropdown is read as "no change"
        return gr.Dropdown(choices, value=value or "", allow_custom_value=True, **common)
    if spec.kind is bool:
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind in (int, float):
        # bounds are checked by the options store, so a bad value gets its OptionError message
        bounds = [f"{op} {_num(limit)}" for op, limit in ((">=", spec.minimum), ("<=", spec.maximum))
                  if limit is not None]
        return gr.Number(value=value, precision=0 if spec.kind is int else None, info=", ".join(bounds) or None,
                         **common)
    return gr.Textbox(value="" if value is None else str(value), **common)


def sections() -> dict[str, list[OptionSpec]]:
    grouped: dict[str, list[OptionSpec]] = {}
    for spec in OPTION_SPECS:
        grouped.setdefault(spec.section, []).append(spec)
    return grouped


def render(ctx: Any) -> dict[str, Any]:
    values = ctx.options.as_dict()
    c: dict[str, Any] = {}
    with gr.Row():
        c["apply"] = gr.Button("Apply settings", variant="primary", elem_id="settings_apply", scale=0,
                               min_width=160)
        c["reload"] = gr.Button("Reload", elem_id="settings_reload", scale=0, min_width=100)
        c["result"] = gr.HTML("", label="Result", elem_id="settings_result")
    for section, specs in sections().items():
        with gr.Accordion(section, open=True, elem_id=f"settings_section_{section.lower().replace(' ', '_')}"):
            with gr.Row(equal_height=False):
                for spec in specs:
                    with gr.Column(min_width=260):
                        c[f"opt.{spec.key}"] = _widget(ctx, spec, values.get(spec.key, spec.default))
    return c


def option_components(c: dict[str, Any]) -> dict[str, Any]:
    return {name[len("opt."):]: comp for name, comp in c.items() if name.startswith("opt.")}


def save_changes(ctx: Any, changes: dict[str, Any]) -> str:
    """Save option changes through ``ctx.set_options``; the status line to show (also for extension settings)."""
    if not changes:
        return status_html("Nothing changed.")
    try:
        saved = ctx.set_options(changes)
    except (OptionError, RequestError) as exc:
        return status_html(str(exc), kind="error")
    return status_html(f"Saved {len(saved)} setting(s): {', '.join(sorted(saved))}.", kind="ok")


def changed_values(values: dict[str, Any], current: dict[str, Any], *, blank_means_keep=()) -> dict[str, Any]:
    """Only the options whose submitted value differs from the stored one (after coercion).

    ``None`` (an empty number) and, for the keys in ``blank_means_keep`` (dropdowns of names), ``""``
    mean "leave it": an API client that omits them sends the page's initial values, not the current ones.
    """
    changes = {}
    by_key = {spec.key: spec for spec in OPTION_SPECS}
    for key, value in values.items():
        spec = by_key[key]
        if value is None or (value == "" and key in blank_means_keep):
            continue
        try:
            same = spec.coerce(value) == current.get(key, spec.default)
        except OptionError:
            same = False  # let set_options report it
        if not same:
            changes[key] = value
    return changes


def wire(ctx: Any, registry: Registry, blocks: gr.Blocks) -> None:
    c = registry.section(SECTION)
    opts = option_components(c)
    dropdowns = {key for key, comp in opts.items() if isinstance(comp, gr.Dropdown)}

    def apply(**values: Any):
        return save_changes(ctx, changed_values(values, ctx.options.as_dict(), blank_means_keep=dropdowns))

    c["apply"].click(apply, inputs_kwargs=opts, outputs=[c["result"]], api_name="apply_settings",
                     concurrency_limit=None)

    def reload():
        values = ctx.options.as_dict()
        return {comp: values.get(key) for key, comp in opts.items()}

    c["reload"].click(reload, outputs=list(opts.values()), api_visibility="private", concurrency_limit=None,
                      show_progress="hidden")
    blocks.load(reload, outputs=list(opts.values()), api_visibility="private", concurrency_limit=None,
                show_progress="hidden")
