"""Tabs that arrive in later versions: each says so, and what to use meanwhile.

``COMING`` is empty now (img2img / edit and Inpaint have their own modules); a tab announced for a later
version is added here with its label and what it will do, and ``webui.ui.tabs()`` shows it after the
generation tabs.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

# key -> (tab label, what it will do)
COMING: dict[str, tuple[str, str]] = {}


def render_for(key: str) -> Any:
    """A ``render(ctx)`` for the placeholder tab ``key``."""

    def render(ctx: Any) -> dict[str, Any]:
        label, what = COMING[key]
        note = gr.Markdown(
            f"### {label}\n{what}: **coming in a later version.**\n\n"
            "Meanwhile, txt2img is complete, and PNG info reads the parameters of any A1111-style image.",
            elem_id=f"{key}_coming_soon",
        )
        return {"note": note}

    return render
