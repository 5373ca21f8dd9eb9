"""HTML for the LoRA browser (pure string building, everything escaped): the card grid of one page and
the read-only part of the detail view.  Cards talk back to Python through a hidden textbox
(``#lora_action``): a click writes ``"<action>|<nonce>|<name>"`` into it and fires an ``input`` event.
"""
from __future__ import annotations

import html
import time
from typing import Iterable, Mapping, Sequence
from urllib.parse import quote

from webui.lora_library.index import LoraEntry

FILES_PREFIX = "/webui/v1/files/models/lora/"
_SEND = ("var t=document.querySelector('#lora_action textarea')||document.querySelector('#lora_action input');"
         "if(t){t.value='{act}|'+Date.now()+'|'+{name};t.dispatchEvent(new Event('input',{bubbles:true}));}")
_COPY = ("var w=this.dataset.word;try{navigator.clipboard.writeText(w)}catch(e){};"
         "var t=document.querySelector('#lora_action textarea')||document.querySelector('#lora_action input');"
         "if(t){t.value='word|'+Date.now()+'|'+w;t.dispatchEvent(new Event('input',{bubbles:true}));}")

CSS = """
<style>
#lora_grid .lora-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: .6em; }
.lora-card { position: relative; border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg);
             overflow: hidden; cursor: pointer; background: var(--block-background-fill); }
.lora-card:hover { border-color: var(--color-accent); }
.lora-card.lora-selected { outline: 2px solid var(--color-accent); }
.lora-thumb { aspect-ratio: 3 / 4; background: var(--background-fill-secondary); display: flex;
              align-items: center; justify-content: center; overflow: hidden; }
.lora-thumb img { width: 100%; height: 100%; object-fit: cover; }
.lora-noimg { font-size: 2em; opacity: .35; font-weight: bold; }
.lora-star { position: absolute; top: .2em; right: .3em; font-size: 1.4em; background: none; border: none;
             cursor: pointer; color: #aaa; text-shadow: 0 0 3px #000; }
.lora-star.on { color: #f5b301; }
.lora-body { padding: .35em .5em; font-size: var(--text-sm); }
.lora-name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.lora-meta { display: flex; flex-wrap: wrap; gap: .25em; margin-top: .2em; }
.lora-chip { padding: 0 .4em; border-radius: 999px; background: var(--background-fill-secondary);
             font-size: var(--text-xs); }
.lora-problem { margin-top: .2em; color: var(--error-text-color); font-size: var(--text-xs); }
.lora-badge-problem { position: absolute; top: .3em; left: .3em; background: var(--error-background-fill);
                      color: var(--error-text-color); border-radius: 999px; padding: 0 .45em; font-size: var(--text-xs); }
.lora-empty { padding: 2em; text-align: center; opacity: .7; }
.lora-word { cursor: pointer; border: 1px solid var(--border-color-primary); border-radius: 999px;
             padding: .05em .6em; margin: .1em; display: inline-block; background: var(--background-fill-secondary); }
.lora-samples img { max-height: 160px; margin: .2em; border-radius: var(--radius-md); }
.lora-detail-table td { padding: .1em .6em .1em 0; vertical-align: top; }
#lora_action { display: none !important; }
</style>
"""


def preview_url(entry: LoraEntry, rel: str | None = None) -> str | None:
    rel = entry.preview if rel is None else rel
    if not rel or entry.root != 0:
        return None
    return FILES_PREFIX + quote(rel, safe="/") + f"?v={int(entry.mtime)}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def card(entry: LoraEntry, index: int, *, bookmarked: bool, selected: bool = False) -> str:
    e = html.escape
    url = preview_url(entry)
    thumb = (f'<img loading="lazy" alt="" src="{e(url)}">' if url
             else f'<div class="lora-noimg">{e((entry.name.rsplit("/", 1)[-1][:2] or "?").upper())}</div>')
    star_js = ("event.stopPropagation();" + _SEND.replace("{act}", "bookmark")
               .replace("{name}", "this.closest('.lora-card').dataset.name"))
    open_js = _SEND.replace("{act}", "open").replace("{name}", "this.dataset.name")
    problem = (f'<span class="lora-badge-problem" title="{e(entry.problem)}">problem</span>'
               f'<div class="lora-problem" title="{e(entry.problem)}">{e(entry.problem[:80])}</div>'
               if entry.problem else "")
    return (
        f'<div class="lora-card{" lora-selected" if selected else ""}" id="lora_card_{index}" '
        f'data-name="{e(entry.name)}" data-family="{e(entry.family)}" data-category="{e(entry.category)}" '
        f'data-bookmarked="{int(bookmarked)}" title="{e(entry.name)}" onclick="{e(open_js)}">'
        f'<div class="lora-thumb">{thumb}</div>'
        f'<button class="lora-star{" on" if bookmarked else ""}" aria-label="bookmark" '
        f'onclick="{e(star_js)}">{"&#9733;" if bookmarked else "&#9734;"}</button>'
        f'<div class="lora-body"><div class="lora-name">{e(entry.name.rsplit("/", 1)[-1])}</div>'
        f'<div class="lora-meta"><span class="lora-chip">{e(entry.family)}</span>'
        f'<span class="lora-chip">{e(entry.category)}</span>'
        f'<span class="lora-chip">w {entry.default_weight:g}</span></div>{problem}</div></div>'
    )


def grid(entries: Sequence[LoraEntry], *, bookmarks: set[str], selected: str | None = None, total: int | None = None,
         library: int | None = None) -> str:
    if not entries:
        text = ("No LoRA files yet: put .safetensors LoRAs into the Lora folder and press Refresh."
                if not library else "No LoRA matches the search and filters.")
        return f'<div class="lora-grid" data-count="0"><div class="lora-empty">{html.escape(text)}</div></div>'
    cards = "".join(card(x, i, bookmarked=x.name in bookmarks, selected=x.name == selected)
                    for i, x in enumerate(entries))
    return f'<div class="lora-grid" data-count="{len(entries)}" data-total="{total or len(entries)}">{cards}</div>'


def detail(entry: LoraEntry, *, sha256: str | None, samples: Iterable[str] = (), usage: tuple[int, float] | None = None,
           bookmarked: bool = False) -> str:
    e = html.escape
    words = "".join(f'<span class="lora-word" data-word="{e(w)}" title="click to copy" '
                    f'onclick="{e(_COPY)}">{e(w)}</span>' for w in entry.trigger_words) or "<i>none known</i>"
    rows: list[tuple[str, str]] = [
        ("Base model", e(entry.family) + (f" ({e(entry.arch)})" if entry.arch != "unknown" else "")),
        ("Category", f"{e(entry.category)} <small>({e(entry.category_source)})</small>"),
        ("Default weight", f"{entry.default_weight:g}"),
        ("SHA-256", f"<code>{e(sha256[:10])}</code>" if sha256 else "<i>computing in the background</i>"),
        ("File", f"{e(entry.filename)} &middot; {_size(entry.size)} &middot; {e(time.strftime('%Y-%m-%d %H:%M', time.localtime(entry.mtime)))}"),
        ("Used", f"{usage[0]} times, last {time.strftime('%Y-%m-%d %H:%M', time.localtime(usage[1]))}" if usage else "never"),
    ]
    rows += [(k.replace("_", " ").capitalize(), e(v)) for k, v in entry.training]
    table = "".join(f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in rows)
    tags = ", ".join(f"{e(t)} <small>({n})</small>" for t, n in entry.tags[:20]) or "<i>no training tags</i>"
    imgs = "".join(f'<img loading="lazy" alt="" src="{e(u)}">' for u in (preview_url(entry, s) for s in samples) if u)
    problem = (f'<div class="webui-status webui-status-error">{e(entry.problem)}</div>' if entry.problem else "")
    star = "&#9733; bookmarked" if bookmarked else ""
    return (f'<div class="lora-detail" data-name="{e(entry.name)}"><h3>{e(entry.title or entry.name)} {star}</h3>'
            f'{problem}<div><b>Trigger words</b> (click to copy): {words}</div>'
            f'<table class="lora-detail-table">{table}</table><div><b>Dataset tags (top 20):</b> {tags}</div>'
            f'<div class="lora-samples">{imgs}</div></div>')


def stats_line(page: int, pages: int, total: int, library: int, scan: Mapping | None = None) -> str:
    return f"Page {page + 1} of {pages} · {total} matching · {library} LoRAs in the library"
