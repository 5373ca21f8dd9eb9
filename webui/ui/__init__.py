"""The Gradio UI: ``build_ui(ctx) -> gr.Blocks``.

Each tab is a module with ``render(ctx) -> dict[name, Component]`` (layout) and optionally
``wire(ctx, registry, blocks)`` (events); this function only composes them (FaceFusion's render/listen,
LLaMA-Factory's component dict).  Theme and CSS travel to ``launch()`` via ``blocks.webui_launch_kwargs``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from webui.ui import extensions_tab, models_bar, placeholders, png_info, settings_tab, txt2img, upscale
from webui.ui import img2img, inpaint, lora_browser, send_to
from webui.ui.common import CSS, Registry, theme


@dataclass(frozen=True)
class TabSpec:
    key: str  # tab id (gr.Tabs(selected=key)) and registry section
    label: str
    render: Callable[[Any], dict[str, Any]]
    wire: Callable[[Any, Registry, gr.Blocks], None] | None = None


def tabs() -> tuple[TabSpec, ...]:
    """The tab registry, in display order."""
    coming = [TabSpec(key, label, placeholders.render_for(key)) for key, (label, _) in placeholders.COMING.items()]
    return (
        TabSpec(txt2img.SECTION, "txt2img", txt2img.render, txt2img.wire),
        TabSpec(img2img.SECTION, "img2img / edit", img2img.render, img2img.wire),
        TabSpec(inpaint.SECTION, "Inpaint", inpaint.render, inpaint.wire),
        *coming,
        TabSpec(upscale.SECTION, "Upscale", upscale.render, upscale.wire),
        TabSpec(lora_browser.SECTION, "LoRA", lora_browser.render, lora_browser.wire),
        TabSpec(png_info.SECTION, "PNG info", png_info.render, png_info.wire),
        TabSpec(extensions_tab.SECTION, "Extensions", extensions_tab.render, extensions_tab.wire),
        TabSpec(settings_tab.SECTION, "Settings", settings_tab.render, settings_tab.wire),
    )


def build_ui(ctx: Any) -> gr.Blocks:
    registry = Registry()
    specs = tabs()
    parts = extensions_tab.ui_parts(ctx)  # extensions' tabs/accordions (webui_ui hook), isolated
    with gr.Blocks(title="WebUI", analytics_enabled=False, fill_width=True) as blocks:
        registry.add(models_bar.SECTION, models_bar.render(ctx))
        with gr.Tabs(elem_id="tabs") as tab_group:
            for spec in specs:
                with gr.Tab(spec.label, id=spec.key, elem_id=f"tab_{spec.key}"):
                    registry.add(spec.key, spec.render(ctx))
                    extensions_tab.render_accordions(ctx, registry, spec.key, parts)
            for key, label, render_part in extensions_tab.extension_tabs(ctx, parts):
                with gr.Tab(label, id=key, elem_id=f"tab_{key}"):
                    render_part(ctx, registry)
        registry["tabs"] = tab_group
        models_bar.wire(ctx, registry, blocks)
        for spec in specs:
            if spec.wire is not None:
                spec.wire(ctx, registry, blocks)
        send_to.wire(ctx, registry)  # "Send to img2img / inpaint / upscale" across tabs
    blocks.webui_launch_kwargs = {"theme": theme(), "css": CSS}
    blocks.webui_components = registry  # for plugins/tests: {"tab.name": Component}
    return blocks
