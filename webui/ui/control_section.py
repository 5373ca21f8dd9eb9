"""ControlNet units and IP-Adapter reference images inside a generation tab (txt2img, img2img, inpaint).

``render(ctx, prefix)`` lays out two accordions and returns their components; the caller registers them
under its tab's section, so names are short and elem_ids are ``f"{prefix}_{name}"``:

- ControlNet (``{prefix}_controlnet``), per unit ``i`` (0-based, as sd-webui-controlnet and the infotext's
  "ControlNet 0" count): ``cn{i}_enabled``, ``cn{i}_image`` (empty: the tab's input image in img2img),
  ``cn{i}_module`` (preprocessor), ``cn{i}_model``, ``cn{i}_refresh``, ``cn{i}_weight``, ``cn{i}_guidance_start``,
  ``cn{i}_guidance_end``, ``cn{i}_control_mode``, ``cn{i}_resize_mode``, ``cn{i}_pixel_perfect``,
  ``cn{i}_processor_res``, ``cn{i}_threshold_a``, ``cn{i}_threshold_b``, ``cn{i}_preview_button``,
  ``cn{i}_preview``, ``cn{i}_status``; plus ``controlnet_hint`` (which folder to fill).
- Reference images (``{prefix}_ipadapter``), per slot ``j``: ``ip{j}_model``, ``ip{j}_images`` (Gallery),
  ``ip{j}_weight``; plus ``ipadapter_hint`` and ``ipadapter_refresh``.

``requests_from(values, prefix)`` (pure, in ``control_requests.py``, re-exported here) converts those values to
``ControlUnit`` / ``ReferenceImages``; ``input_names`` / ``optional_images`` help a tab pass them to its handler.
``wire(ctx, components, prefix)`` runs a unit's preprocessor for the Preview (in the UI thread pool, never a
worker job: it is CPU work), refreshes the model lists and follows the preprocessor's slider labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from webui.image_requests import CONTROL_MODES, MAX_CONTROL_UNITS
from webui.types import RequestError
from webui.ui.control_requests import (DEFAULT_RESOLUTION, IP_PARTS, RESIZE_MODES, UNIT_PARTS, UNSET, as_image,
                                       as_images, input_names, optional_images, requests_from, resize_mode_value,
                                       resolution_value, slot_indices, threshold_value, truthy, unit_indices)

__all__ = ["DEFAULT_UNITS", "IP_PARTS", "IP_SLOTS", "RESIZE_MODES", "UNIT_PARTS", "UNSET", "as_image", "as_images",
           "control_choices", "input_names", "ip_adapter_choices", "models_hint", "optional_images", "preprocessors",
           "render", "requests_from", "run_preview", "slider_updates", "slot_indices", "unit_count", "unit_indices",
           "wire"]

DEFAULT_UNITS = 3
IP_SLOTS = 2
PREVIEW_CONCURRENCY = 2  # preprocessor previews at once (CPU work in Gradio's thread pool)


# ---- preprocessor sliders -------------------------------------------------------------------------------
def preprocessors(ctx: Any) -> Any:
    """The app's preprocessor registry (built-in + extensions, annotators cached), or the built-in one."""
    from webui.generation.preprocessors import PreprocessorRegistry

    registry = getattr(ctx, "preprocessors", None)
    return registry if registry is not None else PreprocessorRegistry()


def slider_updates(registry: Any, name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Slider arguments (resolution, threshold A, threshold B) for preprocessor ``name``: its labels, ranges
    and defaults, hidden where it has no such parameter.  The first render uses "none" (thresholds hidden with a
    wide range and -1), so API callers may send any preprocessor's value, or -1 for "its default"."""
    try:
        pre = registry.get(name or "none")
    except (LookupError, RequestError):
        pre = None
    resolution = dict(minimum=64, maximum=2048, step=8, label="Preprocessor resolution",
                      visible=bool(pre is not None and pre.uses_resolution))
    out = [resolution]
    for slider, label in ((getattr(pre, "slider_a", None), "Threshold A"),
                          (getattr(pre, "slider_b", None), "Threshold B")):
        if slider is None:
            out.append(dict(minimum=UNSET, maximum=2048, value=UNSET, step=1, label=label, visible=False))
        else:
            out.append(dict(minimum=slider.minimum, maximum=slider.maximum, value=slider.value, step=slider.step,
                            label=slider.name, visible=True))
    return out[0], out[1], out[2]


# ---- model lists ----------------------------------------------------------------------------------------
def _records(ctx: Any, kind: str) -> list[Any]:
    try:
        return list(ctx.catalog.list(kind))
    except ValueError:  # this catalog has no such folder kind (yet)
        return []


def checkpoint_arch(ctx: Any, checkpoint: str | None = None) -> Any:
    """Architecture of ``checkpoint`` (a dropdown value) or the selected one; None when unknown."""
    try:
        name = checkpoint or ctx.selected_checkpoint()
        arch = ctx.catalog.get("checkpoint", name).arch if name else None
    except (LookupError, AttributeError, ValueError):
        return None
    return None if arch is None or getattr(arch, "value", arch) == "unknown" else arch


def _fits(record: Any, arch: Any) -> bool:
    own = getattr(record, "arch", None)
    return arch is None or own is None or getattr(own, "value", own) == "unknown" or own == arch


def control_choices(ctx: Any, arch: Any = None) -> list[str]:
    """Usable ControlNet names for checkpoints of ``arch`` (all usable ones when ``arch`` is None); the app's
    ``ControlNetLoader`` names them when there is one (a diffusers folder: the folder name)."""
    loader = getattr(ctx, "controlnets", None)
    if loader is not None:
        return list(loader.names_for(arch))
    return [r.name for r in _records(ctx, "controlnet") if r.usable and _fits(r, arch)]


def ip_adapter_choices(ctx: Any, arch: Any = None) -> list[str]:
    return [r.name for r in _records(ctx, "ip_adapter") if r.usable and _fits(r, arch)]


def ipadapter_dir(ctx: Any) -> Path:
    try:
        roots = ctx.catalog.roots("ip_adapter")
    except (ValueError, AttributeError):
        roots = ()
    if roots:
        return Path(roots[0])
    settings = ctx.settings
    return Path(getattr(settings, "ipadapter_dir", None) or Path(settings.data_dir) / "models" / "ipadapter")


def models_hint(ctx: Any, kind: str, arch: Any = None) -> str:
    """Markdown saying which folder to fill when no usable model of ``kind`` fits ``arch`` ("" when some do)."""
    what, folder = (("ControlNet", Path(ctx.settings.controlnet_dir)) if kind == "controlnet"
                    else ("IP-Adapter", ipadapter_dir(ctx)))
    if (control_choices if kind == "controlnet" else ip_adapter_choices)(ctx, arch):
        return ""
    records = _records(ctx, kind)
    usable = [r for r in records if r.usable]
    if usable:
        from webui.models.controlnet import arch_label

        text = (f"No {what} model for this checkpoint's architecture ({arch_label(arch) if arch else 'unknown'}) "
                f"in `{folder}`; found {len(usable)} for other architectures. Add a matching file, then press "
                "\U0001f504 (refresh).")
    else:
        text = (f"No {what} models found. Put {what} `.safetensors` files in `{folder}`, "
                "then press \U0001f504 (refresh).")
        if kind == "ip_adapter":
            text += " Their image encoders go in `models/clip_vision`."
    broken = [r for r in records if not r.usable][:3]
    for record in broken:
        text += f"\n\n`{record.filename}` cannot be used: {record.error}"
    return text


# ---- layout ---------------------------------------------------------------------------------------------
def unit_count(ctx: Any) -> int:
    """The ``control_net_unit_count`` option (validated 1..MAX_CONTROL_UNITS by the options store)."""
    try:
        value = int(ctx.options.as_dict().get("control_net_unit_count") or DEFAULT_UNITS)
    except (TypeError, ValueError):
        value = DEFAULT_UNITS
    return max(1, min(MAX_CONTROL_UNITS, value))


def render(ctx: Any, prefix: str) -> dict[str, Any]:
    """The ControlNet and reference-image accordions; returns ``{name: Component}`` (see the module doc)."""
    import gradio as gr

    arch, registry = checkpoint_arch(ctx), preprocessors(ctx)
    modules, models, adapters = registry.names(), control_choices(ctx, arch), ip_adapter_choices(ctx, arch)
    c: dict[str, Any] = {}
    with gr.Accordion("ControlNet", open=False, elem_id=f"{prefix}_controlnet"):
        c["controlnet_hint"] = gr.Markdown(models_hint(ctx, "controlnet", arch), elem_id=f"{prefix}_controlnet_hint")
        with gr.Tabs(elem_id=f"{prefix}_controlnet_units"):
            for i in range(unit_count(ctx)):
                with gr.Tab(f"Unit {i}", id=f"{prefix}_cn{i}", elem_id=f"{prefix}_cn{i}"):
                    c.update(_render_unit(gr, prefix, i, modules, models, slider_updates(registry, modules[0])))
    with gr.Accordion("Reference images (IP-Adapter)", open=False, elem_id=f"{prefix}_ipadapter"):
        c["ipadapter_hint"] = gr.Markdown(models_hint(ctx, "ip_adapter", arch), elem_id=f"{prefix}_ipadapter_hint")
        for j in range(IP_SLOTS):
            with gr.Row(elem_id=f"{prefix}_ip{j}", equal_height=False):
                with gr.Column(scale=1, min_width=200):
                    c[f"ip{j}_model"] = gr.Dropdown([("None", ""), *adapters], value="", label=f"IP-Adapter {j + 1}",
                                                    allow_custom_value=True, elem_id=f"{prefix}_ip{j}_model")
                    c[f"ip{j}_weight"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Weight",
                                                   elem_id=f"{prefix}_ip{j}_weight")
                c[f"ip{j}_images"] = gr.Gallery(label="Reference images", type="pil", format="png", interactive=True,
                                                file_types=["image"], columns=4, height=160, object_fit="contain",
                                                elem_id=f"{prefix}_ip{j}_images", scale=2, min_width=240)
        c["ipadapter_refresh"] = gr.Button("\U0001f504 Refresh", size="sm", elem_id=f"{prefix}_ipadapter_refresh")
    return c


def _render_unit(gr: Any, prefix: str, i: int, modules: list[str], models: list[str],
                 sliders: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    c: dict[str, Any] = {}

    def eid(part: str) -> str:
        return f"{prefix}_cn{i}_{part}"

    image_label = "Control image" if prefix == "txt2img" else "Control image (empty: the input image)"
    with gr.Row(equal_height=False):
        c[f"cn{i}_image"] = gr.Image(label=image_label, type="pil", image_mode="RGB", format="png", height=240,
                                     sources=["upload", "clipboard"], elem_id=eid("image"), min_width=200)
        c[f"cn{i}_preview"] = gr.Image(label="Preprocessor preview", type="pil", format="png", interactive=False,
                                       height=240, elem_id=eid("preview"), min_width=200)
    with gr.Row():
        c[f"cn{i}_enabled"] = gr.Checkbox(False, label="Enable", elem_id=eid("enabled"), min_width=100)
        c[f"cn{i}_pixel_perfect"] = gr.Checkbox(False, label="Pixel Perfect", elem_id=eid("pixel_perfect"),
                                                min_width=120)
        c[f"cn{i}_preview_button"] = gr.Button("Preview", size="sm", elem_id=eid("preview_button"), min_width=100)
    with gr.Row(equal_height=True):
        c[f"cn{i}_module"] = gr.Dropdown(modules, value=modules[0], label="Preprocessor", filterable=True,
                                         elem_id=eid("module"), min_width=160)
        c[f"cn{i}_model"] = gr.Dropdown([("None", ""), *models], value="", label="Model", allow_custom_value=True,
                                        elem_id=eid("model"), min_width=160)
        c[f"cn{i}_refresh"] = gr.Button("\U0001f504", scale=0, min_width=44, elem_classes="webui-tool",
                                        elem_id=eid("refresh"))  # refresh the model lists
    c[f"cn{i}_status"] = gr.HTML("", elem_id=eid("status"))
    with gr.Row():
        c[f"cn{i}_weight"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Control weight", elem_id=eid("weight"),
                                       min_width=140)
        c[f"cn{i}_guidance_start"] = gr.Slider(0, 1, value=0.0, step=0.01, label="Starting control step",
                                               elem_id=eid("guidance_start"), min_width=140)
        c[f"cn{i}_guidance_end"] = gr.Slider(0, 1, value=1.0, step=0.01, label="Ending control step",
                                             elem_id=eid("guidance_end"), min_width=140)
    with gr.Row():
        for part, args in zip(("processor_res", "threshold_a", "threshold_b"), sliders):
            args = {"value": DEFAULT_RESOLUTION, **args}
            c[f"cn{i}_{part}"] = gr.Slider(elem_id=eid(part), min_width=140, **args)
    c[f"cn{i}_control_mode"] = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control mode",
                                        elem_id=eid("control_mode"))
    c[f"cn{i}_resize_mode"] = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[1], label="Resize mode",
                                       elem_id=eid("resize_mode"))
    return c


# ---- events ---------------------------------------------------------------------------------------------
def run_preview(ctx: Any, values: Mapping[str, Any], fallback: Any = None,
                target: tuple[int, int] | None = None) -> Any:
    """One unit's preprocessed map (``values``: that unit's parts without the ``cn{i}_`` prefix); ``fallback``
    is the tab's input image, ``target`` the output (width, height) for Pixel Perfect.  CPU work, no job."""
    from webui.generation.control import pixel_perfect_resolution
    from webui.generation.preprocessors import run_preprocessor

    image = as_image(values.get("image"), "control image") or as_image(fallback, "input image")
    if image is None:
        raise RequestError("no control image: upload one in this unit first")
    resolution = resolution_value(values.get("processor_res"), "Preview")
    if truthy(values.get("pixel_perfect")) and target:
        resize = resize_mode_value(values.get("resize_mode"), "Preview")
        resolution = pixel_perfect_resolution(image.size, target[0], target[1], resize)
    return run_preprocessor(str(values.get("module") or "none"), image, resolution=resolution,
                            threshold_a=threshold_value("threshold A", values.get("threshold_a")),
                            threshold_b=threshold_value("threshold B", values.get("threshold_b")),
                            annotators_dir=Path(ctx.settings.controlnet_dir) / "annotators",
                            extra=preprocessors(ctx))


def wire(ctx: Any, components: Mapping[str, Any], prefix: str, *, checkpoint: Any = None) -> None:
    """Preview, Refresh and preprocessor-slider events of the section in ``components`` (the tab's dict).

    ``checkpoint`` (the models bar dropdown, optional) re-filters the model lists when it changes."""
    import gradio as gr

    c, registry = components, preprocessors(ctx)
    private = dict(api_visibility="private", show_progress="hidden")
    units, slots = unit_indices(c), slot_indices(c)
    for i in units:
        names = ("image", "module", "processor_res", "threshold_a", "threshold_b", "pixel_perfect", "resize_mode")
        inputs = {f"cn{i}_{n}": c[f"cn{i}_{n}"] for n in names}
        source = c.get("image", c.get("editor"))  # img2img / inpaint: an empty unit image means the input image
        if source is not None:
            inputs["source"] = source
        if c.get("width") is not None and c.get("height") is not None:
            inputs.update(target_width=c["width"], target_height=c["height"])
        c[f"cn{i}_preview_button"].click(_preview_handler(ctx, i), inputs_kwargs=inputs,
                                         outputs=[c[f"cn{i}_preview"], c[f"cn{i}_status"]],
                                         concurrency_limit=PREVIEW_CONCURRENCY,
                                         concurrency_id=f"{prefix}_controlnet_preview", **private)

        def sliders(name: str):
            return tuple(gr.update(**args) for args in slider_updates(registry, name))

        c[f"cn{i}_module"].change(sliders, inputs=[c[f"cn{i}_module"]], queue=False, **private,
                                  outputs=[c[f"cn{i}_{n}"] for n in ("processor_res", "threshold_a", "threshold_b")])
        # an uploaded control image turns its unit on (as sd-webui-controlnet does)
        c[f"cn{i}_image"].upload(lambda: True, outputs=[c[f"cn{i}_enabled"]], queue=False, **private)

    current = [c[f"cn{i}_model"] for i in units] + [c[f"ip{j}_model"] for j in slots]
    outputs = [*current[:len(units)], c["controlnet_hint"], *current[len(units):], c["ipadapter_hint"]]

    def lists(checkpoint_value: Any, *picked: Any) -> list[Any]:
        arch = checkpoint_arch(ctx, checkpoint_value or None)
        controls, adapters = control_choices(ctx, arch), ip_adapter_choices(ctx, arch)
        out = [_choices_update(gr, controls, value) for value in picked[:len(units)]]
        out.append(models_hint(ctx, "controlnet", arch))
        out += [_choices_update(gr, adapters, value) for value in picked[len(units):]]
        return [*out, models_hint(ctx, "ip_adapter", arch)]

    def refresh(checkpoint_value: Any, *picked: Any) -> list[Any]:
        for kind in ("controlnet", "ip_adapter"):
            try:
                ctx.refresh_models(kind)
            except ValueError:  # no such folder kind in this catalog
                pass
        return lists(checkpoint_value, *picked)

    for button in [c[f"cn{i}_refresh"] for i in units] + [c["ipadapter_refresh"]]:
        if checkpoint is not None:
            button.click(refresh, inputs=[checkpoint, *current], outputs=outputs, concurrency_limit=None, **private)
        else:
            button.click(lambda *picked: refresh(None, *picked), inputs=current, outputs=outputs,
                         concurrency_limit=None, **private)
    if checkpoint is not None:
        checkpoint.change(lists, inputs=[checkpoint, *current], outputs=outputs, queue=False, **private)


def _preview_handler(ctx: Any, i: int) -> Any:
    """The Preview button of unit ``i``: the map, or a warning + status text (never a crash)."""
    import gradio as gr

    from webui.ui.common import status_html

    def preview(**values: Any):
        parts = {k[len(f"cn{i}_"):]: v for k, v in values.items() if k.startswith(f"cn{i}_")}
        width, height = values.get("target_width"), values.get("target_height")
        try:
            target = (int(width), int(height)) if width and height else None
            result = run_preview(ctx, parts, values.get("source"), target)
        except Exception as exc:  # noqa: BLE001 - any preprocessor failure is shown to the user, not raised
            gr.Warning(f"Preview failed: {exc}")
            return gr.skip(), status_html(f"Preview failed: {exc}", kind="error")
        return result, status_html(f"{parts.get('module') or 'none'}: {result.width}x{result.height}", kind="ok")

    return preview


def _choices_update(gr: Any, names: list[str], current: Any) -> Any:
    """New choices; the pick is kept when it is still listed, else cleared (a wrong-arch model)."""
    return gr.update(choices=[("None", ""), *names], value=current if current in names else "")
