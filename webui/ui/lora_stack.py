"""The LoRA stack of a generation tab: N slots (option ``lora_stack_size``, default 3).

Components (registered under the tab's section, e.g. ``txt2img.lora_0_name``), for i in 0..N-1:
``lora_{i}_name`` (Dropdown of LoRA names, "" = empty slot), ``lora_{i}_weight`` (Slider 0-2, step 0.05),
``lora_{i}_te_weight`` (Slider -1..2; -1, None or "" = same as the weight), ``lora_{i}_blocks`` (Dropdown of block-weight
presets, "" = none), ``lora_{i}_insert`` / ``lora_{i}_remove`` (trigger-word buttons), ``lora_{i}_last``
(State: the slot's last LoRA, whose trigger words "remove" takes out), and one ``lora_warning`` (Markdown:
wrong architecture, unusable file, weight above 1, speed-LoRA hints, trigger words).

UI slots and ``<lora:>`` tags are two views of one list: the request carries the slots
(``slots_to_refs``), the worker merges them with the prompt's tags (a tag wins over a slot of the same
name), and the infotext writes the slots as tags after the prompt, so "Send to txt2img" restores the
whole stack through the prompt (the slots are left empty).
"""
from __future__ import annotations

from typing import Any, Mapping

from webui.models.lora.blocks import SD_PRESETS, SDXL_PRESETS
from webui.types import LoraRef
from webui.ui.requests import parse_number

__all__ = ["BLOCK_PRESETS", "input_names", "render", "slot_count", "slots_to_refs", "stack_warnings", "wire"]

BLOCK_PRESETS: tuple[str, ...] = ("",) + tuple(dict.fromkeys([*SD_PRESETS, *SDXL_PRESETS]))
DEFAULT_SLOTS = 3
SAME = -1.0  # te_weight slider value meaning "same as the weight" (None and "" mean the same)


def slot_count(values: Mapping[str, Any]) -> int:
    n = 0
    while f"lora_{n}_name" in values:
        n += 1
    return n


def input_names(count: int) -> tuple[str, ...]:
    return tuple(f"lora_{i}_{part}" for i in range(count) for part in ("name", "weight", "te_weight", "blocks"))


def slots_to_refs(values: Mapping[str, Any]) -> tuple[LoraRef, ...]:
    """``{"lora_0_name": ..., "lora_0_weight": ...}`` -> the slots' ``LoraRef``s (empty slots skipped).

    A LoRA in two slots is one entry (the later slot wins), like ``merge_lora_refs``."""
    refs: dict[str, LoraRef] = {}
    for i in range(slot_count(values)):
        name = str(values.get(f"lora_{i}_name") or "").strip()
        if not name:
            continue
        label = f"LoRA slot {i + 1} ({name})"
        weight = parse_number(f"{label} weight", values.get(f"lora_{i}_weight"), 1.0)
        te = parse_number(f"{label} text-encoder weight", values.get(f"lora_{i}_te_weight"), None)
        te = None if te is not None and te < 0 else te  # the slider's -1: same as the weight
        blocks = str(values.get(f"lora_{i}_blocks") or "").strip() or None
        refs[name] = LoraRef(name=name, weight=weight, te_weight=te, block_weights=blocks)
    return tuple(refs.values())


def _model_arch(ctx: Any):
    """Architecture of the selected checkpoint, from the catalog (no torch in the UI)."""
    try:
        name = ctx.selected_checkpoint()
        return ctx.catalog.get("checkpoint", name).arch if name else None
    except (LookupError, AttributeError):
        return None


def stack_warnings(ctx: Any, values: Mapping[str, Any]) -> str:
    """Markdown for the slots' warnings and hints ("" when there is nothing to say)."""
    from webui.models.lora_info import slot_info, weight_warning

    arch = _model_arch(ctx)
    lines: list[str] = []
    for i in range(slot_count(values)):
        name = str(values.get(f"lora_{i}_name") or "").strip()
        if not name:
            continue
        try:
            record = ctx.catalog.get("lora", name)
        except LookupError as exc:
            lines.append(f"**Warning** slot {i + 1}: {exc}")
            continue
        info = slot_info(record, arch)
        if info.warning:
            lines.append(f"**Warning** slot {i + 1}: {info.warning}")
        weight = _safe_float(values.get(f"lora_{i}_weight"))
        if (text := weight_warning(weight)) is not None:
            lines.append(f"**Warning** slot {i + 1} {name}: {text}")
        if info.hint is not None:
            lines.append(f"**Hint** slot {i + 1} {name}: {info.hint.text}")
        if info.trigger_words:
            lines.append(f"Slot {i + 1} {name} trigger words: {', '.join(info.trigger_words)}")
    return "\n\n".join(lines)


def _safe_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def lora_choices(ctx: Any) -> list[str]:
    return [""] + [r.name for r in ctx.catalog.list("lora")]


def render(ctx: Any, section: str = "txt2img") -> dict[str, Any]:
    """The slots inside an accordion; returns the components (caller registers them under ``section``)."""
    import gradio as gr

    count = int(ctx.options.get("lora_stack_size") or DEFAULT_SLOTS)
    choices = lora_choices(ctx)
    c: dict[str, Any] = {}
    with gr.Accordion("LoRA", open=False, elem_id=f"{section}_lora_stack"):
        for i in range(count):
            with gr.Row(elem_id=f"{section}_lora_{i}", equal_height=True):
                c[f"lora_{i}_name"] = gr.Dropdown(choices, value="", label=f"LoRA {i + 1}", allow_custom_value=True,
                                                  filterable=True, elem_id=f"{section}_lora_{i}_name", min_width=160,
                                                  scale=3)
                c[f"lora_{i}_weight"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Weight", scale=2,
                                                  elem_id=f"{section}_lora_{i}_weight", min_width=140)
                c[f"lora_{i}_te_weight"] = gr.Slider(-1, 2, value=SAME, step=0.05, label="TE weight (-1 = same)",
                                                     elem_id=f"{section}_lora_{i}_te_weight", scale=1, min_width=120)
                c[f"lora_{i}_blocks"] = gr.Dropdown(list(BLOCK_PRESETS), value="", label="Blocks",
                                                    allow_custom_value=True, elem_id=f"{section}_lora_{i}_blocks",
                                                    scale=1, min_width=90)
                c[f"lora_{i}_insert"] = gr.Button("+ triggers", size="sm", scale=0, min_width=80,
                                                  elem_id=f"{section}_lora_{i}_insert")
                c[f"lora_{i}_remove"] = gr.Button("− triggers", size="sm", scale=0, min_width=80, visible=False,
                                                  elem_id=f"{section}_lora_{i}_remove")
            c[f"lora_{i}_last"] = gr.State("")
        c["lora_warning"] = gr.Markdown("", elem_id=f"{section}_lora_warning")
    return c


def wire(ctx: Any, registry: Any, section: str = "txt2img") -> None:
    """Slot events: default weight on pick, warnings, trigger-word insert/remove, refresh of the names."""
    import gradio as gr

    from webui.models.lora_info import insert_trigger_words, remove_trigger_words, slot_info

    c = registry.section(section)
    count = slot_count(c)
    prompt = c["prompt"]
    slot_inputs = {name: c[name] for name in input_names(count)}
    private = dict(api_visibility="private", queue=False, show_progress="hidden")

    def words(name: str) -> tuple[str, ...]:
        try:
            return slot_info(ctx.catalog.get("lora", name)).trigger_words if name else ()
        except LookupError:
            return ()

    def warn(**values: Any) -> str:
        return stack_warnings(ctx, values)

    for i in range(count):
        name_c, weight_c, last_c = c[f"lora_{i}_name"], c[f"lora_{i}_weight"], c[f"lora_{i}_last"]
        insert_c, remove_c = c[f"lora_{i}_insert"], c[f"lora_{i}_remove"]

        def picked(name: str, last: str, text: str):
            name = (name or "").strip()
            remove_visible = bool(last and last != name and any(w in (text or "") for w in words(last)))
            weight = gr.skip()
            if name and name != last:
                try:
                    weight = slot_info(ctx.catalog.get("lora", name)).default_weight
                except LookupError:
                    pass
            return weight, (last if remove_visible else (name or last)), gr.update(visible=remove_visible)

        # .input: only the user's pick sets the default weight (a value set by code keeps its weight)
        name_c.input(picked, inputs=[name_c, last_c, prompt], outputs=[weight_c, last_c, remove_c], **private)
        for comp in (name_c, weight_c):
            comp.change(warn, inputs_kwargs=slot_inputs, outputs=[c["lora_warning"]], **private)

        def insert(name: str, text: str):
            return insert_trigger_words(text or "", words((name or "").strip()))

        def remove(name: str, last: str, text: str):
            target = last or name
            return remove_trigger_words(text or "", words(target)), (name or ""), gr.update(visible=False)

        insert_c.click(insert, inputs=[name_c, prompt], outputs=[prompt], **private)
        remove_c.click(remove, inputs=[name_c, last_c, prompt], outputs=[prompt, last_c, remove_c], **private)

    refresh = registry.get("models.refresh")
    if refresh is not None:
        def names():
            choices = lora_choices(ctx)
            return [gr.update(choices=choices) for _ in range(count)]

        refresh.click(names, outputs=[c[f"lora_{i}_name"] for i in range(count)], **private)


def result_notes(info: Mapping[str, Any]) -> str:
    """HTML after a job: warnings (skipped embeddings, partial LoRA matches) and LoRA layers matched."""
    from webui.ui.common import status_html

    parts = []
    warnings = list(info.get("warnings") or ())
    if warnings:
        parts.append(status_html("Warning: " + " | ".join(warnings), kind="error"))
    layers = info.get("lora_layers") or {}
    if layers:
        text = "; ".join(f"LoRA {name}: {m} of {t} layers applied" for name, (m, t) in layers.items())
        parts.append(status_html(text, kind="ok"))
    return "".join(parts)
