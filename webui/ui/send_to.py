""""Send to img2img / inpaint / upscale" buttons: move a result (and its parameters) to another tab.

A source tab renders the buttons with ``render_buttons(prefix)`` under its gallery (``send_<target>``,
elem_id ``<prefix>_send_<target>``); ``wire(ctx, registry)`` connects every source found in the registry:
a tab with ``gallery`` + ``selected`` (+ ``infotexts``) sends its selected image, PNG info sends the
dropped file.  The image goes into the target's input (img2img ``image``, inpaint ``editor`` background,
upscale ``image``); img2img / inpaint also get the prompt and parameters from the image's infotext and the
image's size.  Pure helpers (``gallery_image``, ``parameter_values``) carry the logic; no module state.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from PIL import Image

from webui.io.metadata import control_units_from_infotext, infotext_to_request_fields, parse_infotext
from webui.types import RequestError
from webui.ui.control_requests import unit_indices, unit_setting_names, unit_values_from_infotext
from webui.ui.img2img_requests import SOFT_INPAINT_FIELDS, infotext_values, size_from_image

# target tab -> (button label, the target tab's input component)
TARGETS: Mapping[str, tuple[str, str]] = {
    "img2img": ("Send to img2img", "image"),
    "inpaint": ("Send to inpaint", "editor"),
    "upscale": ("Send to upscale", "image"),
}
PARAMETER_TARGETS = ("img2img", "inpaint")  # tabs whose prompt/parameters are filled from the infotext
PARAMETER_NAMES = ("prompt", "negative_prompt", "steps", "sampler", "schedule", "cfg_scale", "seed", "clip_skip",
                   "denoising_strength", "width", "height", *SOFT_INPAINT_FIELDS)  # soft inpainting: inpaint only


def render_buttons(prefix: str, targets: Sequence[str] = tuple(TARGETS)) -> dict[str, Any]:
    """One row of "Send to ..." buttons, elem_ids ``<prefix>_send_<target>`` (call inside the source tab)."""
    import gradio as gr

    c: dict[str, Any] = {}
    with gr.Row(elem_id=f"{prefix}_send_to"):
        for target in targets:
            c[f"send_{target}"] = gr.Button(TARGETS[target][0], size="sm", min_width=110,
                                            elem_id=f"{prefix}_send_{target}")
    return c


def open_image(value: Any) -> Image.Image | None:
    """A PIL copy of a gallery/file value (path, PIL image or numpy array); None for nothing."""
    if value is None or value == "":
        return None
    if isinstance(value, Image.Image):
        return value.copy()
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        try:
            with Image.open(value) as opened:
                opened.load()
                return opened.copy()
        except (OSError, ValueError) as exc:
            raise RequestError(f"cannot read the image to send ({exc})") from None
    return Image.fromarray(value)


def gallery_image(gallery: Sequence[Any] | None, index: int | None) -> Image.Image | None:
    """The ``index``-th image of a Gradio gallery value (``[(media, caption), ...]``); the first if out of range."""
    items = list(gallery or [])
    if not items:
        return None
    index = index if isinstance(index, int) and 0 <= index < len(items) else 0
    item = items[index]
    media = item[0] if isinstance(item, (tuple, list)) else item
    if isinstance(media, Mapping):  # a GalleryImage / FileData dict (gradio_client callers)
        media = media.get("image", media)
        media = media.get("path") if isinstance(media, Mapping) else media
    return open_image(media)


def parameter_values(infotext: str | None, image: Image.Image | None, unit_count: int = 0) -> dict[str, Any]:
    """Widget values for an image tab from an infotext (prompt, sampler, seed... and the settings of its
    ``unit_count`` ControlNet units) and the image's size."""
    values: dict[str, Any] = {}
    if infotext:
        parsed = parse_infotext(infotext)
        values.update(infotext_values(infotext_to_request_fields(parsed)))
        values.update(unit_values_from_infotext(control_units_from_infotext(parsed), unit_count))
    if image is not None:
        values["width"], values["height"] = size_from_image(image)
    return values


def _selected_infotext(infotexts: Sequence[str] | None, index: int | None, image: Image.Image | None) -> str:
    texts = list(infotexts or [])
    if texts:
        return texts[index] if isinstance(index, int) and 0 <= index < len(texts) else texts[0]
    return str((image.info or {}).get("parameters") or "") if image is not None else ""


def _target_outputs(registry: Any, target: str) -> tuple[Any, list[str]]:
    comps = registry.section(target)
    if target not in PARAMETER_TARGETS:
        return comps, []
    return comps, [n for n in PARAMETER_NAMES if n in comps] + unit_setting_names(comps)


def wire(ctx: Any, registry: Any) -> None:
    """Connect every "send to" button in the registry whose target tab exists."""
    if "tabs" not in registry:
        return
    sections = {key.split(".", 1)[0] for key in registry if "." in key}
    for section in sorted(sections):
        source = registry.section(section)
        for target in TARGETS:
            button = source.get(f"send_{target}")
            if button is None or f"{target}.{TARGETS[target][1]}" not in registry:
                continue
            comps, names = _target_outputs(registry, target)
            outputs = [comps[TARGETS[target][1]], *(comps[n] for n in names), registry["tabs"]]
            if all(name in source for name in ("gallery", "selected", "infotexts")):
                inputs = [source["gallery"], source["selected"], source["infotexts"]]
                handler = _gallery_sender(target, names)
            elif "image" in source and "text" in source:  # PNG info: the dropped file and its parameters
                inputs = [source["image"], source["text"]]
                handler = _file_sender(target, names)
            else:
                continue
            button.click(handler, inputs=inputs, outputs=outputs, api_visibility="private",
                         concurrency_limit=None, show_progress="hidden")


def _updates(target: str, names: list[str], image: Image.Image | None, infotext: str) -> list[Any]:
    import gradio as gr

    if image is None:
        raise gr.Error("Nothing to send: generate (or drop) an image first", print_exception=False)
    values = parameter_values(infotext, image, len(unit_indices(dict.fromkeys(names)))) if names else {}
    return [image, *(values.get(n, gr.skip()) for n in names), gr.Tabs(selected=target)]


def _checked(function: Any, *args: Any) -> Image.Image | None:
    import gradio as gr

    try:
        return function(*args)
    except RequestError as exc:
        raise gr.Error(str(exc), print_exception=False) from None


def _gallery_sender(target: str, names: list[str]):
    def send(gallery: Any, selected: Any, infotexts: Any) -> list[Any]:
        index = selected if isinstance(selected, int) else 0
        image = _checked(gallery_image, gallery, index)
        texts = infotexts if isinstance(infotexts, list) and all(isinstance(t, str) for t in infotexts) else []
        return _updates(target, names, image, _selected_infotext(texts, index, image))

    return send


def _file_sender(target: str, names: list[str]):
    def send(path: Any, text: str | None) -> list[Any]:
        image = _checked(open_image, path)
        return _updates(target, names, image, text or _selected_infotext([], 0, image))

    return send
