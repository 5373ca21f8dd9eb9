"""Extensions tab: what was discovered (name, version, source, status, error), enable/disable (saved in
``extensions.json``), the extensions' own settings, and install from a git URL or folder (localhost only).

Also renders the extensions' UI parts (``webui_ui`` hook) into other tabs, each call isolated by the
plugin manager so a broken extension leaves the page working.
"""
from __future__ import annotations

import html
from typing import Any

import gradio as gr

from webui.ui.common import Registry, status_html
from webui.ui.settings_tab import save_changes

SECTION = "extensions"
WARNING = ("Extensions run Python code on this machine with the app's rights. Install only extensions "
           "you trust. Changes to an extension's UI or API routes take effect after a restart.")


def _plugins(ctx: Any):
    return getattr(ctx, "plugins", None)


def table_html(ctx: Any) -> str:
    plugins = _plugins(ctx)
    records = plugins.records() if plugins is not None else []
    if not records:
        return "<p>No extensions found.</p>"
    rows = []
    for r in records:
        error = (f"<details><summary>{html.escape(r.error.splitlines()[0][:200])}</summary>"
                 f"<pre>{html.escape(r.error)}</pre></details>") if r.error else ""
        rows.append(f'<tr data-ext="{html.escape(r.name)}"><td>{html.escape(r.name)}</td>'
                    f"<td>{html.escape(r.version)}</td><td>{html.escape(r.source)}</td>"
                    f'<td class="ext-status">{html.escape(r.status)}</td><td>{error}</td></tr>')
    return ('<table class="webui-ext-table"><thead><tr><th>Name</th><th>Version</th><th>Source</th>'
            "<th>Status</th><th>Error</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _choices(ctx: Any) -> tuple[list[str], list[str]]:
    plugins = _plugins(ctx)
    if plugins is None:
        return [], []
    names = [r.name for r in plugins.records() if r.status not in ("invalid", "duplicate")]
    return names, [n for n in names if plugins.is_enabled(n)]


def render(ctx: Any) -> dict[str, Any]:
    from webui.ui.settings_tab import _widget

    c: dict[str, Any] = {}
    gr.HTML(status_html(WARNING, kind="info"), elem_id="extensions_warning")
    c["table"] = gr.HTML(table_html(ctx), elem_id="extensions_table")
    names, enabled = _choices(ctx)
    with gr.Row():
        c["enabled"] = gr.CheckboxGroup(names, value=enabled, label="Enabled extensions", elem_id="extensions_enabled")
        c["apply"] = gr.Button("Apply and save", variant="primary", elem_id="extensions_apply", scale=0,
                               min_width=160)
    c["status"] = gr.HTML("", elem_id="extensions_status")
    extra = ctx.options.extra_specs() if _plugins(ctx) is not None else []
    if extra:
        with gr.Accordion("Extension settings", open=True, elem_id="extensions_settings"):
            values = ctx.options.as_dict()
            for spec in extra:
                c[f"opt.{spec.key}"] = _widget(ctx, spec, values.get(spec.key, spec.default))
            c["settings_apply"] = gr.Button("Apply extension settings", elem_id="extensions_settings_apply")
    allowed = ctx.settings.extension_install_allowed
    with gr.Accordion("Install from git URL or folder", open=False, elem_id="extensions_install_box"):
        if not allowed:
            from webui.plugins.install import REFUSED

            gr.HTML(status_html(REFUSED, kind="error"), elem_id="extensions_install_refused")
        c["source"] = gr.Textbox(label="Git URL or local folder", placeholder="https://github.com/user/ext.git",
                                 interactive=allowed, elem_id="extensions_install_source")
        c["install"] = gr.Button("Install", interactive=allowed, elem_id="extensions_install")
    return c


def wire(ctx: Any, registry: Registry, blocks: gr.Blocks) -> None:
    c = registry.section(SECTION)
    plugins = _plugins(ctx)
    if plugins is None:
        return

    def apply(chosen: list[str]):
        names, _ = _choices(ctx)
        changed = []
        for name in names:
            want = name in (chosen or [])
            if want != plugins.is_enabled(name):
                plugins.set_enabled(name, want)
                changed.append(f"{'enabled' if want else 'disabled'} {name}")
        text = ("; ".join(changed) + ". Saved; restart for UI/route changes.") if changed else "Nothing changed."
        return table_html(ctx), status_html(text, kind="ok" if changed else "info")

    c["apply"].click(apply, inputs=[c["enabled"]], outputs=[c["table"], c["status"]],
                     api_name="extensions_apply", api_visibility="private", concurrency_limit=None)

    def install(source: str):
        from webui.plugins.install import InstallError, install as do_install

        try:
            folder = do_install(source, target_root=_user_dir(ctx),
                                allowed=ctx.settings.extension_install_allowed)
        except (PermissionError, InstallError) as exc:
            return table_html(ctx), status_html(str(exc), kind="error"), gr.update()
        record = plugins.add_folder(folder)
        names, enabled = _choices(ctx)
        note = f"Installed {record.name} ({record.status}) into {folder}. Restart to show its UI."
        return (table_html(ctx), status_html(note, kind="error" if record.error else "ok"),
                gr.update(choices=names, value=enabled))

    c["install"].click(install, inputs=[c["source"]], outputs=[c["table"], c["status"], c["enabled"]],
                       api_name="extensions_install", api_visibility="private", concurrency_limit=1)

    opts = {name[len("opt."):]: comp for name, comp in c.items() if name.startswith("opt.")}

    def refresh():  # a new page shows the saved state, not the one at start-up
        names, enabled = _choices(ctx)
        values = ctx.options.as_dict()
        return [table_html(ctx), gr.update(choices=names, value=enabled), *(values.get(k) for k in opts)]

    blocks.load(refresh, outputs=[c["table"], c["enabled"], *opts.values()], api_name="extensions_refresh",
                api_visibility="private",
                concurrency_limit=None, show_progress="hidden")
    if opts:
        def apply_settings(**values: Any):
            current = ctx.options.as_dict()
            return save_changes(ctx, {k: v for k, v in values.items() if v is not None and v != current.get(k)})

        c["settings_apply"].click(apply_settings, inputs_kwargs=opts, outputs=[c["status"]],
                                  api_name="extensions_settings_apply", api_visibility="private",
                                  concurrency_limit=None)


def _user_dir(ctx: Any):
    from webui.plugins.manager import default_folders

    return default_folders(ctx.settings)[0]


# ---- extension UI parts (webui_ui hook) ------------------------------------------------------
def ui_parts(ctx: Any) -> list[tuple[str, Any]]:
    plugins = _plugins(ctx)
    return plugins.ui_parts() if plugins is not None else []


def _part_key(name: str, part: Any) -> str:
    key = part.key or part.label.lower()
    return f"ext_{name}_" + "".join(ch if ch.isalnum() else "_" for ch in key)


def _render_part(ctx: Any, registry: Registry, name: str, part: Any) -> dict[str, Any]:
    plugins = ctx.plugins
    comps = plugins.guard(name, f"UI {part.label!r}", part.render, plugins.get(name).facade) or {}
    try:
        registry.add(_part_key(name, part), dict(comps))
    except (KeyError, TypeError, ValueError):
        pass
    return {}


def render_accordions(ctx: Any, registry: Registry, tab_key: str, parts: list[tuple[str, Any]]) -> None:
    """Call inside ``gr.Tab(tab_key)``: one accordion per extension part aimed at this tab."""
    for name, part in parts:
        if part.tab == tab_key:
            with gr.Accordion(part.label, open=False, elem_id=_part_key(name, part)):
                _render_part(ctx, registry, name, part)


def extension_tabs(ctx: Any, parts: list[tuple[str, Any]]) -> list[tuple[str, str, Any]]:
    """``(key, label, render)`` for parts that want a tab of their own."""
    return [(_part_key(name, part), part.label,
             lambda ctx, registry, name=name, part=part: _render_part(ctx, registry, name, part))
            for name, part in parts if part.tab is None]
