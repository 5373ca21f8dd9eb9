"""Shared UI pieces: the component registry, status boxes, theme and CSS.

The registry is LLaMA-Factory's idea: every tab's ``render`` returns ``{name: Component}``; the builder
stores them as ``"<tab>.<name>"`` so that one tab's ``wire`` can reach another tab's widgets (PNG info ->
txt2img) without module-level globals.  It lives for one ``build_ui`` call.
"""
from __future__ import annotations

import html
from typing import Any, Mapping

import gradio as gr


class Registry(dict):
    """``{"tab.name": Component}`` for one Blocks; ``section("tab")`` gives ``{name: Component}``."""

    def add(self, section: str, components: Mapping[str, Any]) -> dict[str, Any]:
        for name, component in components.items():
            key = f"{section}.{name}"
            if key in self:
                raise KeyError(f"UI component {key!r} registered twice")
            self[key] = component
        return dict(components)

    def section(self, section: str) -> dict[str, Any]:
        prefix = f"{section}."
        return {key[len(prefix):]: comp for key, comp in self.items() if key.startswith(prefix)}


def session_id(request: gr.Request | None) -> str | None:
    """The browser session (one per page load) or gradio_client instance that sent an event."""
    if request is None:
        return None
    return getattr(request, "session_hash", None) or None


def status_html(text: str, *, kind: str = "info") -> str:
    """A one-line message box; ``kind`` is info | ok | error | busy. ``text`` is escaped."""
    if not text:
        return ""
    return f'<div class="webui-status webui-status-{kind}">{html.escape(text)}</div>'


def message_html(text: str, *, kind: str = "warning") -> str:
    """A prominent multi-sentence notice (empty models folder, ...)."""
    if not text:
        return ""
    return f'<div class="webui-notice webui-notice-{kind}">{html.escape(text)}</div>'


def theme() -> gr.themes.Base:
    return gr.themes.Default(primary_hue="orange", secondary_hue="blue", neutral_hue="slate")


CSS = """
.webui-status { padding: .35em .7em; border-radius: var(--radius-md); font-size: var(--text-sm); }
.webui-status-ok { color: var(--color-green-600, #16a34a); }
.webui-status-busy { color: var(--body-text-color-subdued); }
.webui-status-error { color: var(--error-text-color); background: var(--error-background-fill);
                      border: 1px solid var(--error-border-color); }
.webui-notice { padding: .8em 1em; border-radius: var(--radius-lg); border: 2px solid var(--color-accent);
                background: var(--color-accent-soft); font-size: var(--text-md); line-height: 1.5; }
.webui-progress { position: relative; min-height: 2em; border-radius: var(--radius-md); overflow: hidden;
                  border: 1px solid var(--border-color-primary); background: var(--block-background-fill); }
.webui-progress-fill { position: absolute; top: 0; bottom: 0; left: 0; background: var(--color-accent-soft);
                       transition: width .25s ease; }
.webui-progress-text { position: relative; display: block; padding: 0 .7em; line-height: 2em;
                       font-variant-numeric: tabular-nums; }
.webui-progress-error { border-color: var(--error-border-color); color: var(--error-text-color); }
.webui-progress-idle .webui-progress-fill { background: transparent; }
.webui-tool { flex-grow: 0 !important; min-width: 2.8em !important; max-width: 3.2em; align-self: end; }
#txt2img_generate, .webui-generate { min-height: 3.6em; font-size: var(--text-lg); }
#txt2img_actions { gap: .5em; }
#models_bar { align-items: end; }
@media (max-width: 720px) {
  .webui-toprow { flex-direction: column !important; }
  .webui-toprow > * { width: 100% !important; min-width: 0 !important; }
  #txt2img_generate, .webui-generate { min-height: 3em; }
}
"""
