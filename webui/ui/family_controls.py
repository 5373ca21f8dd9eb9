"""Family-adaptive generation controls (txt2img / img2img tabs) for DiT checkpoints.

When the models-bar checkpoint changes, ``wire`` adapts the tab to the model family (``profile_for``, pure):
* Flux: no negative prompt (hidden), the CFG slider becomes "Distilled guidance" (3.5), schnell gets 4 steps,
  Fill (inpaint) 30;
* Chroma (a Flux derivative): negative prompt kept, real CFG (4.0);
* SD3 / Qwen-Image: negative prompt kept, real / true CFG (4.5 / 4.0);
* every DiT family: sampler "Euler", schedule "Simple" (the only ones they take) and a natural-language hint.
Values are only set when switching *to* a DiT family; switching back to SD only restores labels/visibility.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from webui.types import Arch, Variant

DEFAULT_PLACEHOLDER = "Prompt (A1111 syntax: (word:1.2), [from:to:0.5], <lora:name:0.8>)"
NATURAL = "Describe the image in natural language (full sentences); (word:1.2) weights and [a:b:N] are ignored"
EDIT = "Describe the edit (e.g. 'make the car red'); the input image(s) are the references"


@dataclass(frozen=True)
class FamilyProfile:
    negative_visible: bool = True
    cfg_label: str = "CFG scale"
    placeholder: str = DEFAULT_PLACEHOLDER
    sampler: str | None = None  # set on switching to this family (None: keep the user's value)
    schedule: str | None = None
    cfg: float | None = None
    steps: int | None = None


def profile_for(arch: Arch | str | None, variant: Variant | str | None = None, name: str = "",
                family: str = "") -> FamilyProfile:
    try:
        arch = Arch(arch) if arch is not None else None
    except ValueError:
        arch = None
    edit = variant is not None and str(getattr(variant, "value", variant)) == Variant.EDIT.value
    hint = EDIT if edit else NATURAL
    if arch is Arch.FLUX and family == "Chroma":
        return FamilyProfile(cfg_label="CFG scale (Chroma: real CFG)", placeholder=hint, sampler="Euler",
                             schedule="Simple", cfg=4.0)
    if arch is Arch.FLUX and str(getattr(variant, "value", variant)) == Variant.INPAINT.value:
        return FamilyProfile(negative_visible=False, cfg_label="Distilled guidance (Flux.1 Fill)", placeholder=hint,
                             sampler="Euler", schedule="Simple", cfg=30.0)
    if arch is Arch.FLUX:
        schnell = "schnell" in name.lower()
        return FamilyProfile(negative_visible=False, cfg_label="Distilled guidance (Flux; schnell ignores it)",
                             placeholder=hint, sampler="Euler", schedule="Simple", cfg=3.5,
                             steps=4 if schnell else None)
    if arch is Arch.SD3:
        return FamilyProfile(cfg_label="CFG scale", placeholder=hint, sampler="Euler", schedule="Simple", cfg=4.5)
    if arch is Arch.QWEN_IMAGE:
        return FamilyProfile(cfg_label="CFG scale (true CFG)", placeholder=hint, sampler="Euler", schedule="Simple",
                             cfg=4.0)
    return FamilyProfile()


def _record(ctx: Any, name: str | None) -> Any:
    try:
        name = name or ctx.selected_checkpoint()
        return ctx.catalog.get("checkpoint", name) if name else None
    except (LookupError, AttributeError, ValueError):
        return None


def updates(gr: Any, profile: FamilyProfile) -> list[Any]:
    """Updates for (prompt, negative_prompt, cfg_scale, sampler, schedule, steps)."""
    keep = gr.update()
    return [
        gr.update(placeholder=profile.placeholder),
        gr.update(visible=profile.negative_visible),
        gr.update(label=profile.cfg_label, **({"value": profile.cfg} if profile.cfg is not None else {})),
        gr.update(value=profile.sampler) if profile.sampler else keep,
        gr.update(value=profile.schedule) if profile.schedule else keep,
        gr.update(value=profile.steps) if profile.steps else keep,
    ]


def wire(ctx: Any, c: Mapping[str, Any], checkpoint: Any) -> None:
    """Adapt ``c``'s prompt / CFG / sampler controls whenever ``checkpoint`` (models-bar dropdown) changes."""
    import gradio as gr

    names = ("prompt", "negative_prompt", "cfg_scale", "sampler", "schedule", "steps")
    if checkpoint is None or not all(n in c for n in names):
        return

    def adapt(value: Any) -> list[Any]:
        record = _record(ctx, value or None)
        profile = profile_for(getattr(record, "arch", None), getattr(record, "variant", None),
                              str(getattr(record, "name", "") or ""), str(getattr(record, "family", "") or ""))
        return updates(gr, profile)

    checkpoint.change(adapt, inputs=[checkpoint], outputs=[c[n] for n in names], api_visibility="private",
                      queue=False, show_progress="hidden")
