"""The LoRA tab: a searchable, filterable library of LoRA cards (one page at a time) with a detail panel.

Layout + wiring only; the work is in ``webui.lora_library`` (``ctx.lora_library``).  Cards are plain HTML;
a click writes ``"<action>|<nonce>|<name>"`` into the hidden ``lora_action`` textbox (see ``cards.py``).
"Use this LoRA" fills the first empty txt2img stack slot (``txt2img.lora_{i}_name``/``_weight``) and
switches to txt2img; without a stack it appends ``<lora:name:weight>`` to the txt2img prompt.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from webui.lora_library import cards
from webui.lora_library.infer import CATEGORIES, FAMILIES
from webui.lora_library.search import ALL, SORTS, Query
from webui.ui.common import status_html

SECTION = "lora"
TARGET = "txt2img"
FILTERS = ("search", "category", "family", "folder", "sort", "compatible", "bookmarked_only", "page", "selected")
PRIVATE = dict(api_visibility="private", show_progress="hidden")


def library(ctx: Any):
    """``ctx.lora_library``, created on first use for contexts built without ``AppContext.create``."""
    if getattr(ctx, "lora_library", None) is None:
        from webui.lora_library import LoraLibrary

        ctx.lora_library = LoraLibrary.from_settings(ctx.settings, ctx.catalog.roots("lora"))
    return ctx.lora_library


def checkpoint_arch(ctx: Any, chosen: str | None = None) -> str | None:
    """Architecture of ``chosen`` (the models bar's value) or of the checkpoint new jobs use; None if unknown."""
    try:
        name = chosen or ctx.selected_checkpoint()
        return ctx.catalog.get("checkpoint", name).arch.value if name else None
    except Exception:  # noqa: BLE001 - no checkpoint / unknown name: show everything
        return None


def render(ctx: Any) -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.HTML(cards.CSS, elem_id="lora_css", padding=False)
    with gr.Row(equal_height=True):
        c["search"] = gr.Textbox("", label="Search", placeholder="name, trigger word, tag, description...",
                                 elem_id="lora_search", scale=4)
        c["refresh"] = gr.Button("Refresh", elem_id="lora_refresh", scale=0, min_width=100)
    with gr.Row(equal_height=True):
        c["category"] = gr.Dropdown([ALL, *CATEGORIES], value=ALL, label="Category", elem_id="lora_category",
                                    min_width=140)
        c["family"] = gr.Dropdown([ALL, *FAMILIES], value=ALL, label="Base model", elem_id="lora_family",
                                  min_width=140)
        c["folder"] = gr.Dropdown([ALL], value=ALL, label="Folder", elem_id="lora_folder", min_width=140,
                                  allow_custom_value=True)
        c["sort"] = gr.Dropdown(list(SORTS), value="Newest", label="Sort", elem_id="lora_sort", min_width=140)
        with gr.Column(min_width=200):
            c["compatible"] = gr.Checkbox(True, label="Compatible with the loaded checkpoint only",
                                          elem_id="lora_compatible")
            c["bookmarked_only"] = gr.Checkbox(False, label="Bookmarked only", elem_id="lora_bookmarked_only")
    with gr.Row(equal_height=True):
        c["prev"] = gr.Button("◀ Previous", elem_id="lora_prev", scale=0, min_width=110, size="sm")
        c["page"] = gr.Number(1, label="Page", precision=0, minimum=1, elem_id="lora_page", scale=0, min_width=90)
        c["next"] = gr.Button("Next ▶", elem_id="lora_next", scale=0, min_width=110, size="sm")
        c["page_info"] = gr.HTML("", elem_id="lora_page_info")
    c["action"] = gr.Textbox("", elem_id="lora_action", show_label=False, container=False)
    with gr.Row():
        with gr.Column(scale=3):
            c["grid"] = gr.HTML("", elem_id="lora_grid")
        with gr.Column(scale=2, elem_id="lora_detail"):
            c["selected"] = gr.Textbox("", label="Selected LoRA", interactive=False, elem_id="lora_selected")
            with gr.Row():
                c["use"] = gr.Button("Use this LoRA", variant="primary", elem_id="lora_use")
                c["bookmark"] = gr.Button("☆ Bookmark", elem_id="lora_bookmark")
            c["use_triggers"] = gr.Checkbox(True, label="Also add its trigger words to the prompt",
                                            elem_id="lora_use_triggers")
            c["status"] = gr.HTML("", elem_id="lora_status")
            c["info"] = gr.HTML("<p>Click a card to see its details.</p>", elem_id="lora_detail_info")
            with gr.Accordion("Edit (saved beside the file in name.webui.json)", open=False, elem_id="lora_edit"):
                c["edit_description"] = gr.Textbox("", label="Description", lines=3, elem_id="lora_edit_description")
                c["edit_triggers"] = gr.Textbox("", label="Trigger words (comma-separated)",
                                                elem_id="lora_edit_triggers")
                with gr.Row():
                    c["edit_weight"] = gr.Number(1.0, label="Default weight", minimum=-4, maximum=4, step=0.05,
                                                 elem_id="lora_edit_weight")
                    c["edit_category"] = gr.Dropdown(["", *CATEGORIES], value="", label="Category",
                                                     elem_id="lora_edit_category")
                    c["edit_base"] = gr.Dropdown(["", *FAMILIES], value="", label="Base model",
                                                 elem_id="lora_edit_base")
                c["edit_notes"] = gr.Textbox("", label="Notes", lines=3, elem_id="lora_edit_notes")
                c["save"] = gr.Button("Save", elem_id="lora_save")
            with gr.Accordion("Use an image as its preview", open=False, elem_id="lora_preview_panel"):
                c["preview_image"] = gr.Image(type="pil", label="Image (drop a generated image here)",
                                              sources=["upload", "clipboard"], elem_id="lora_preview_image",
                                              height=240)
                c["set_preview"] = gr.Button("Use as preview", elem_id="lora_set_preview")
    return c


def _query(ctx: Any, v: dict[str, Any]) -> Query:
    try:
        page = max(1, int(v.get("page") or 1)) - 1
    except (TypeError, ValueError):
        page = 0
    return Query(text=str(v.get("search") or ""), category=v.get("category") or ALL, family=v.get("family") or ALL,
                 folder=v.get("folder") or ALL, sort=v.get("sort") or "Newest",
                 checkpoint_arch=checkpoint_arch(ctx, v.get("checkpoint")) if v.get("compatible") else None,
                 bookmarked_only=bool(v.get("bookmarked_only")), page=page)


def grid_updates(ctx: Any, c: dict[str, Any], v: dict[str, Any]) -> dict[Any, Any]:
    lib = library(ctx)
    result = lib.search(_query(ctx, v))
    bookmarks = lib.bookmarks()
    html = cards.grid(result.items, bookmarks=bookmarks, selected=v.get("selected") or None, total=result.total,
                      library=result.stats.get("library"))
    info = cards.stats_line(result.page, result.pages, result.total, result.stats.get("library", 0))
    return {c["grid"]: html, c["page_info"]: f'<span id="lora_page_text">{info}</span>', c["page"]: result.page + 1}


def detail_updates(ctx: Any, c: dict[str, Any], name: str) -> dict[Any, Any]:
    lib = library(ctx)
    entry = lib.get(name) if name else None
    if entry is None:
        return {c["selected"]: "", c["info"]: "<p>Click a card to see its details.</p>",
                c["bookmark"]: gr.update(value="☆ Bookmark")}
    sha = lib.sha256(name, compute=entry.size <= 64 * 1024 * 1024)
    side = lib.sidecar(name)
    marked = lib.is_bookmarked(name)
    html = cards.detail(entry, sha256=sha, samples=lib.samples(name), usage=lib.usage().get(name), bookmarked=marked)
    return {
        c["selected"]: name, c["info"]: html,
        c["bookmark"]: gr.update(value="★ Bookmarked" if marked else "☆ Bookmark"),
        c["edit_description"]: entry.description, c["edit_triggers"]: ", ".join(entry.trigger_words),
        c["edit_weight"]: entry.default_weight, c["edit_category"]: side.get("category", ""),
        c["edit_base"]: side.get("base_model", ""), c["edit_notes"]: entry.notes,
    }


def wire(ctx: Any, registry: Any, blocks: gr.Blocks) -> None:
    c = registry.section(SECTION)
    filters = {name: c[name] for name in FILTERS}
    checkpoint = registry.get("models.checkpoint")
    if checkpoint is not None:  # the compatibility filter follows the models bar
        filters["checkpoint"] = checkpoint
    grid_out = [c["grid"], c["page_info"], c["page"]]
    detail_out = [c["selected"], c["info"], c["bookmark"], c["edit_description"], c["edit_triggers"],
                  c["edit_weight"], c["edit_category"], c["edit_base"], c["edit_notes"]]

    def show(**v):
        return grid_updates(ctx, c, v)

    def first_page(**v):
        return grid_updates(ctx, c, {**v, "page": 1})

    for name in ("search",):  # .change: typing, pasting and programmatic fills alike
        c[name].change(first_page, inputs_kwargs=filters, outputs=grid_out, trigger_mode="always_last",
                      concurrency_limit=None, **PRIVATE)
    for name in ("category", "family", "folder", "sort", "compatible", "bookmarked_only"):
        c[name].change(first_page, inputs_kwargs=filters, outputs=grid_out, trigger_mode="always_last",
                      concurrency_limit=None, **PRIVATE)
    if checkpoint is not None:
        checkpoint.change(show, inputs_kwargs=filters, outputs=grid_out, trigger_mode="always_last", **PRIVATE)
    c["page"].submit(show, inputs_kwargs=filters, outputs=grid_out, **PRIVATE)
    c["prev"].click(lambda **v: show(**{**v, "page": (v.get("page") or 1) - 1}), inputs_kwargs=filters,
                    outputs=grid_out, **PRIVATE)
    c["next"].click(lambda **v: show(**{**v, "page": (v.get("page") or 1) + 1}), inputs_kwargs=filters,
                    outputs=grid_out, **PRIVATE)

    def facet_updates() -> dict[Any, Any]:
        f = library(ctx).facets()
        return {c["folder"]: gr.update(choices=f["folder"])}

    def load(**v):
        library(ctx).ensure_scanned()
        library(ctx).start_hashing()
        return {**grid_updates(ctx, c, v), **facet_updates()}

    def refresh(**v):
        report = library(ctx).refresh()
        try:
            ctx.refresh_models("lora")  # so that generation finds a LoRA added since start-up
        except Exception:  # noqa: BLE001 - the library view is still correct
            pass
        library(ctx).start_hashing()
        text = f"Rescanned: {report.files} files, {report.read} read, {report.removed} gone ({report.seconds:.2f} s)."
        return {**grid_updates(ctx, c, v), **facet_updates(), c["status"]: status_html(text, kind="ok")}

    blocks.load(load, inputs_kwargs=filters, outputs=[*grid_out, c["folder"]], **PRIVATE)
    c["refresh"].click(refresh, inputs_kwargs=filters, outputs=[*grid_out, c["folder"], c["status"]], **PRIVATE)

    def action(**v):
        raw = str(v.get("action") or "")
        kind, _, rest = raw.partition("|")
        _nonce, _, name = rest.partition("|")
        out: dict[Any, Any] = {}
        if kind == "open" and name:
            out.update(detail_updates(ctx, c, name))
            v = {**v, "selected": name}
        elif kind == "bookmark" and name:
            on = library(ctx).toggle_bookmark(name)
            out[c["status"]] = status_html(f"{'Bookmarked' if on else 'Removed the bookmark of'} {name}.", kind="ok")
            if name == v.get("selected"):
                out[c["bookmark"]] = gr.update(value="★ Bookmarked" if on else "☆ Bookmark")
        elif kind == "word" and name:
            out[c["status"]] = status_html(f"Copied “{name}”.", kind="ok")
            return out
        else:
            return out
        out.update(grid_updates(ctx, c, v))
        return out

    c["action"].change(action, inputs_kwargs={**filters, "action": c["action"]},
                      outputs=[*grid_out, *detail_out, c["status"]], concurrency_limit=None, **PRIVATE)

    def toggle(**v):
        name = v.get("selected")
        if not name:
            return {c["status"]: status_html("Pick a LoRA first.", kind="error")}
        on = library(ctx).toggle_bookmark(name)
        return {**grid_updates(ctx, c, v), c["bookmark"]: gr.update(value="★ Bookmarked" if on else "☆ Bookmark"),
                c["status"]: status_html(f"{'Bookmarked' if on else 'Removed the bookmark of'} {name}.", kind="ok")}

    c["bookmark"].click(toggle, inputs_kwargs=filters, outputs=[*grid_out, c["bookmark"], c["status"]], **PRIVATE)

    def save(**v):
        name = v.get("selected")
        if not name:
            return {c["status"]: status_html("Pick a LoRA first.", kind="error")}
        changes = {"description": v.get("edit_description") or "", "trigger_words": v.get("edit_triggers") or "",
                   "preferred_weight": v.get("edit_weight"), "category": v.get("edit_category") or "",
                   "base_model": v.get("edit_base") or "", "notes": v.get("edit_notes") or ""}
        try:
            library(ctx).save_details(name, changes)
        except (OSError, KeyError) as exc:
            return {c["status"]: status_html(f"Could not save: {exc}", kind="error")}
        return {**grid_updates(ctx, c, v), **detail_updates(ctx, c, name),
                c["status"]: status_html(f"Saved {name}.webui.json.", kind="ok")}

    edits = {k: c[k] for k in ("edit_description", "edit_triggers", "edit_weight", "edit_category", "edit_base",
                               "edit_notes")}
    c["save"].click(save, inputs_kwargs={**filters, **edits}, outputs=[*grid_out, *detail_out, c["status"]], **PRIVATE)

    def set_preview(**v):
        name, image = v.get("selected"), v.get("preview_image")
        if not name or image is None:
            return {c["status"]: status_html("Pick a LoRA and drop an image first.", kind="error")}
        try:
            library(ctx).set_preview(name, image)
        except (OSError, ValueError, KeyError) as exc:
            return {c["status"]: status_html(f"Could not save the preview: {exc}", kind="error")}
        return {**grid_updates(ctx, c, v), **detail_updates(ctx, c, name),
                c["status"]: status_html(f"Preview of {name} saved.", kind="ok")}

    c["set_preview"].click(set_preview, inputs_kwargs={**filters, "preview_image": c["preview_image"]},
                           outputs=[*grid_out, *detail_out, c["status"]], **PRIVATE)
    _wire_use(ctx, registry, c)


def _wire_use(ctx: Any, registry: Any, c: dict[str, Any]) -> None:
    """"Use this LoRA": first empty txt2img slot (or the prompt tag) + trigger words, then switch tabs."""
    from webui.models.lora_info import insert_trigger_words

    target = registry.section(TARGET)
    slots = []
    while f"lora_{len(slots)}_name" in target and f"lora_{len(slots)}_weight" in target:
        slots.append((target[f"lora_{len(slots)}_name"], target[f"lora_{len(slots)}_weight"]))
    prompt = target.get("prompt")
    tabs = registry.get("tabs")
    inputs = {"selected": c["selected"], "use_triggers": c["use_triggers"]}
    inputs.update({f"slot_{i}": name_c for i, (name_c, _w) in enumerate(slots)})
    if prompt is not None:
        inputs["prompt"] = prompt
    outputs = [c["status"], *(comp for pair in slots for comp in pair)]
    outputs += [x for x in (prompt, tabs) if x is not None]

    def use(**v):
        name = v.get("selected")
        entry = library(ctx).get(name) if name else None
        if entry is None:
            return {c["status"]: status_html("Pick a LoRA first.", kind="error")}
        out: dict[Any, Any] = {}
        text = v.get("prompt") or ""
        values = [str(v.get(f"slot_{i}") or "").strip() for i in range(len(slots))]
        if name in values:
            where = f"already in slot {values.index(name) + 1}"
        elif slots and "" in values:
            i = values.index("")
            out[slots[i][0]], out[slots[i][1]] = name, entry.default_weight
            where = f"slot {i + 1}"
        elif slots:
            i = len(slots) - 1
            out[slots[i][0]], out[slots[i][1]] = name, entry.default_weight
            where = f"slot {i + 1} (all slots were taken; it replaced the last one)"
        else:
            text = f"{text.rstrip()} <lora:{name}:{entry.default_weight:g}>".strip()
            where = "the prompt"
        if v.get("use_triggers") and entry.trigger_words and prompt is not None:
            text = insert_trigger_words(text, list(entry.trigger_words[:3]))
        if prompt is not None:
            out[prompt] = text
        if tabs is not None:
            out[tabs] = gr.Tabs(selected=TARGET)
        words = ", ".join(entry.trigger_words[:5])
        out[c["status"]] = status_html(f"Added {name} (weight {entry.default_weight:g}) to {where}."
                                       + (f" Trigger words: {words}" if words else ""), kind="ok")
        return out

    c["use"].click(use, inputs_kwargs=inputs, outputs=outputs, **PRIVATE)
