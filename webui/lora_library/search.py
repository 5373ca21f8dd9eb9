"""Pure search over ``LoraEntry`` tuples: text query, filters, sort and one page of results.

Every entry carries a precomputed lower-case ``haystack`` (name, file name, title, trigger words, tags,
description, notes) and its token set, so a query is a few substring tests per entry: 10,000 entries take
a few milliseconds.  Each whitespace-separated query word must match (AND), as a substring of the haystack
or, with ``_``/``-`` read as spaces, of its words ("my_style" finds "my style" and the other way round).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from webui.lora_library.index import LoraEntry

ALL = "All"
SORTS = ("Newest", "Name", "Most used", "Recently used")
PAGE_SIZE = 48
_SEP = re.compile(r"[\s_\-]+")
# A LoRA fits a checkpoint when their architectures are in the same group (SD 1 and SD 2 differ).
_ARCH_GROUP = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sdxl_refiner": "sdxl_refiner", "sd3": "sd3",
               "flux": "flux", "qwen_image": "qwen_image"}
_FAMILY_ARCH = {"Flux": "flux", "SD3": "sd3", "Qwen-Image": "qwen_image"}  # family known from metadata only


@dataclass(frozen=True, kw_only=True)
class Query:
    text: str = ""
    category: str = ALL
    family: str = ALL
    folder: str = ALL  # a subfolder: matches it and everything below it
    checkpoint_arch: str | None = None  # "compatible with the loaded checkpoint only" when set
    bookmarked_only: bool = False
    sort: str = "Newest"
    page: int = 0  # 0-based
    page_size: int = PAGE_SIZE


@dataclass(frozen=True)
class Page:
    items: tuple[LoraEntry, ...]
    total: int  # matches over all pages
    page: int  # 0-based, clamped
    pages: int
    stats: Mapping[str, int] = field(default_factory=dict)


def compatible(entry: LoraEntry, checkpoint_arch: str | None) -> bool:
    """True when the LoRA fits a checkpoint of ``checkpoint_arch``, or when either side is unknown."""
    if not checkpoint_arch or checkpoint_arch == "unknown":
        return True
    arch = entry.arch if entry.arch != "unknown" else _FAMILY_ARCH.get(entry.family, "unknown")
    if arch == "unknown":
        return True
    return _ARCH_GROUP.get(arch) == _ARCH_GROUP.get(checkpoint_arch)


def _matcher(text: str):
    terms = [t for t in text.lower().split() if t]
    if not terms:
        return None
    spaced = [_SEP.sub(" ", t).strip() for t in terms]

    def match(entry: LoraEntry) -> bool:
        hay = entry.haystack
        for term, alt in zip(terms, spaced):
            if term in hay or term in entry.words:
                continue
            if alt and alt != term and alt in hay:
                continue
            return False
        return True

    return match


def filter_entries(entries: Iterable[LoraEntry], query: Query, bookmarks: set[str] | frozenset[str] = frozenset()
                   ) -> list[LoraEntry]:
    match = _matcher(query.text)
    folder = query.folder if query.folder not in ("", ALL) else None
    out = []
    for e in entries:
        if query.category not in ("", ALL) and e.category != query.category:
            continue
        if query.family not in ("", ALL) and e.family != query.family:
            continue
        if folder is not None and not (e.folder == folder or e.folder.startswith(folder + "/")):
            continue
        if query.bookmarked_only and e.name not in bookmarks:
            continue
        if query.checkpoint_arch and not compatible(e, query.checkpoint_arch):
            continue
        if match is not None and not match(e):
            continue
        out.append(e)
    return out


def sort_entries(entries: list[LoraEntry], sort: str, usage: Mapping[str, tuple[int, float]] | None = None
                 ) -> list[LoraEntry]:
    usage = usage or {}
    by_name = entries  # the index keeps entries sorted by name; filtering keeps that order
    if sort == "Name":
        return list(by_name)
    if sort == "Most used":
        return sorted(by_name, key=lambda e: -usage.get(e.name, (0, 0.0))[0])
    if sort == "Recently used":
        return sorted(by_name, key=lambda e: -usage.get(e.name, (0, 0.0))[1])
    return sorted(by_name, key=lambda e: -e.mtime)  # Newest


def search(entries: Sequence[LoraEntry], query: Query, *, bookmarks: set[str] | frozenset[str] = frozenset(),
           usage: Mapping[str, tuple[int, float]] | None = None) -> Page:
    """Filter, sort and cut one page; the page number is clamped into range."""
    found = sort_entries(filter_entries(entries, query, bookmarks), query.sort, usage)
    size = max(1, int(query.page_size))
    pages = max(1, math.ceil(len(found) / size))
    page = min(max(0, int(query.page)), pages - 1)
    items = tuple(found[page * size:(page + 1) * size])
    return Page(items, len(found), page, pages, {"library": len(entries)})


def facets(entries: Iterable[LoraEntry]) -> dict[str, list[str]]:
    """Choices for the filter dropdowns: categories, families and folders present in the library."""
    from webui.lora_library.infer import CATEGORIES, FAMILIES

    cats, fams, folders = set(), set(), set()
    for e in entries:
        cats.add(e.category)
        fams.add(e.family)
        if e.folder:
            parts = e.folder.split("/")
            folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    order = {c: i for i, c in enumerate(CATEGORIES)}
    forder = {f: i for i, f in enumerate(FAMILIES)}
    return {"category": [ALL, *sorted(cats, key=lambda c: (order.get(c, 99), c))],
            "family": [ALL, *sorted(fams, key=lambda f: (forder.get(f, 99), f))],
            "folder": [ALL, *sorted(folders, key=str.casefold)]}
