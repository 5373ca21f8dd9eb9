"""Wildcards: ``__name__`` in a prompt is replaced by a random line of ``<folder>/name.txt``.

The choice is seeded by the job's seed (same seed -> same expansion; the expanded prompt is what the
infotext records), nested wildcards expand up to ``MAX_DEPTH`` levels, unknown names stay as they are.
Shows the prompt-syntax hook, a setting and a UI accordion in the txt2img tab.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable

from webui.plugins.api import ExtensionAPI, SettingSpec, UIPart, hookimpl

WEBUI_API = ">=1.0,<2"
PATTERN = re.compile(r"__([A-Za-z0-9_\-/]+?)__")
MAX_DEPTH = 5
FOLDER_OPTION = "wildcards_folder"


def expand(text: str, lookup: Callable[[str], list[str] | None], rng: random.Random) -> str:
    """Pure: replace every known ``__name__`` with ``rng.choice(lookup(name))``, nested up to MAX_DEPTH."""
    for _ in range(MAX_DEPTH):
        changed = False

        def pick(match: re.Match) -> str:
            nonlocal changed
            choices = lookup(match.group(1))
            if not choices:
                return match.group(0)
            changed = True
            return rng.choice(choices)

        text = PATTERN.sub(pick, text)
        if not changed:
            break
    return text


def folder(api: ExtensionAPI) -> Path:
    configured = api.option(FOLDER_OPTION) or ""
    return Path(configured).expanduser() if configured else Path(api.folder or ".") / "wildcards"


def read_wildcard(root: Path, name: str) -> list[str] | None:
    path = (root / f"{name}.txt").resolve()
    if root.resolve() not in path.parents or not path.is_file():  # no ../ escapes
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [line for line in lines if line and not line.startswith("#")] or None


def names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.txt"))


def expand_for(api: ExtensionAPI, prompt: str, seed: int, negative: bool = False) -> str:
    if "__" not in prompt:
        return prompt
    root = folder(api)
    rng = random.Random(f"{seed}:{int(negative)}") if seed >= 0 else random.Random()
    return expand(prompt, lambda name: read_wildcard(root, name), rng)


@hookimpl
def webui_settings():
    return [SettingSpec(key=FOLDER_OPTION, default="", kind=str,
                        label="Wildcards folder (empty: the extension's wildcards/ folder)")]


@hookimpl
def webui_prompt_syntax(prompt, seed, negative, api):
    expanded = expand_for(api, prompt, seed, negative)
    return expanded if expanded != prompt else None


def _list_markdown(api: ExtensionAPI) -> str:
    found = names(folder(api))
    if not found:
        return f"No wildcard files in `{folder(api)}`."
    return "Available: " + ", ".join(f"`__{n}__`" for n in found)


def _render(api: ExtensionAPI):
    import gradio as gr

    listing = gr.Markdown(_list_markdown(api), elem_id="wildcards_list")
    with gr.Row():
        text = gr.Textbox(label="Try a prompt", value="a __color__ __animal__", elem_id="wildcards_try")
        seed = gr.Number(label="Seed", value=1, precision=0, elem_id="wildcards_seed", scale=0, min_width=120)
    with gr.Row():
        button = gr.Button("Expand", elem_id="wildcards_expand", scale=0, min_width=120)
        refresh = gr.Button("Refresh list", elem_id="wildcards_refresh", scale=0, min_width=120)
    out = gr.Textbox(label="Expanded", interactive=False, elem_id="wildcards_result")
    button.click(lambda t, s: expand_for(api, t or "", int(s if s is not None else -1)), inputs=[text, seed],
                 outputs=[out], api_name="wildcards_expand", api_visibility="private", concurrency_limit=None)
    refresh.click(lambda: _list_markdown(api), outputs=[listing], api_name="wildcards_refresh",
                  api_visibility="private", concurrency_limit=None)
    return {"list": listing, "try": text, "result": out}


@hookimpl
def webui_ui(api):
    return [UIPart(label="Wildcards", tab="txt2img", key="wildcards", render=_render)]
