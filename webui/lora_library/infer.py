"""Pure inference over a LoRA's header metadata, tags, file name and folder: what it is for (category),
which base model family it fits, and its training summary.  No I/O; everything is bounded so a header with
a million tags or odd value types cannot slow a scan down or crash it.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Iterable, Mapping

CATEGORIES = ("Character", "Style", "Outfit", "Pose", "Concept", "Detail/Slider", "Speed", "Other")
FAMILIES = ("SD 1.5", "SD 2.x", "SDXL", "Pony", "Illustrious", "NoobAI", "SDXL Refiner", "Flux", "SD3", "Unknown")
MAX_TAGS = 20  # top training tags kept per LoRA
MAX_TAG_SCAN = 20_000  # tags looked at in ss_tag_frequency (a huge list must not stall the scan)
MAX_TEXT = 4000  # characters kept of a description

# Words that name a category, matched as whole words (or word prefixes where noted) in folder names
# first, then in the file name / title / modelspec tags.  Order matters: the first category that matches wins.
_CATEGORY_WORDS: tuple[tuple[str, re.Pattern], ...] = (
    ("Speed", re.compile(r"\b(lcm|turbo|lightning|hyper(?:sd)?|dmd2?|tcd|speed|fast|\d+[-_ ]?steps?)\b", re.I)),
    ("Detail/Slider", re.compile(r"\b(slider|sliders|detail\w*|tweaker|enhancer|add[-_ ]?detail|"
                                 r"contrast|brightness|exposure|quality)\b", re.I)),
    ("Pose", re.compile(r"\b(pose|poses|posing|position|gesture)\b", re.I)),
    ("Outfit", re.compile(r"\b(outfits?|clothes|clothing|costumes?|dress(?:es)?|uniforms?|armou?r|cloth|"
                          r"swimsuit|bikini|kimono|wear)\b", re.I)),
    ("Style", re.compile(r"\b(style|styles|artist|artists|art|aesthetic|painting|anime[-_ ]?style|"
                         r"lineart|watercolou?r|pixel[-_ ]?art|realism|photoreal\w*)\b", re.I)),
    ("Character", re.compile(r"\b(character|characters|char|chara|person|people|celeb\w*|waifu|oc)\b", re.I)),
    ("Concept", re.compile(r"\b(concept|concepts|object|objects|background|scene|effect|effects|"
                           r"vehicle|building|item|items)\b", re.I)),
)
# Base-model words in free text (metadata values, sidecar) -> family; first match wins.
_FAMILY_WORDS: tuple[tuple[str, re.Pattern], ...] = (
    ("NoobAI", re.compile(r"noob", re.I)),
    ("Illustrious", re.compile(r"illustrious|\bilxl\b", re.I)),
    ("Pony", re.compile(r"(?<![a-z])pony(?!tail)", re.I)),
    ("Flux", re.compile(r"flux", re.I)),
    ("SD3", re.compile(r"\bsd[-_ ]?3|stable[-_ ]diffusion[-_ ]v?3", re.I)),
    ("SDXL Refiner", re.compile(r"refiner", re.I)),
    ("SDXL", re.compile(r"sdxl|\bxl\b|stable[-_ ]diffusion[-_ ]xl", re.I)),
    ("SD 2.x", re.compile(r"sd[-_ ]?v?2|stable[-_ ]diffusion[-_ ]v?2", re.I)),
    ("SD 1.5", re.compile(r"sd[-_ ]?v?1|stable[-_ ]diffusion[-_ ]v?1", re.I)),
)
_WORD_SPLIT = re.compile(r"[\s_\-./\\()\[\]{}:,;|+]+")


def tokens(text: str) -> frozenset[str]:
    """Lower-case word tokens of ``text`` (split on spaces, punctuation, ``_`` and ``-``)."""
    return frozenset(t for t in _WORD_SPLIT.split(text.lower()) if t)


def _clean(text: Any, limit: int = 200) -> str:
    return str(text).strip()[:limit] if text is not None else ""


def _words(text: str) -> str:
    """``my_style-lora`` -> ``my style lora`` so that ``\\b`` matches inside snake/kebab names."""
    return _WORD_SPLIT.sub(" ", text)


def tag_frequency(metadata: Mapping[str, str], limit: int = MAX_TAGS) -> tuple[tuple[str, int], ...]:
    """Top ``limit`` training tags with counts from kohya's ``ss_tag_frequency`` ``{dataset: {tag: n}}``.
    Malformed JSON, odd value types and giant lists are tolerated (only the first ``MAX_TAG_SCAN`` read)."""
    raw = metadata.get("ss_tag_frequency")
    if not raw or not isinstance(raw, str):
        return ()
    try:
        datasets = json.loads(raw)
    except (ValueError, RecursionError):
        return ()
    counts: Counter[str] = Counter()
    seen = 0
    for tags in datasets.values() if isinstance(datasets, dict) else ():
        if not isinstance(tags, dict):
            continue
        for tag, n in tags.items():
            seen += 1
            if seen > MAX_TAG_SCAN:
                break
            tag = str(tag).strip()[:100]
            if tag and isinstance(n, (int, float)) and not isinstance(n, bool) and n == n:
                counts[tag] += int(min(max(n, 0), 1e12))
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit])


def trigger_words(metadata: Mapping[str, str], tags: Iterable[tuple[str, int]] = (), limit: int = 10) -> tuple[str, ...]:
    """``modelspec.trigger_phrase`` first, then the most frequent training tags (as ``lora.loading`` does)."""
    words: list[str] = []
    phrase = metadata.get("modelspec.trigger_phrase") or ""
    for w in str(phrase).split(","):
        w = w.strip()[:100]
        if w and w not in words:
            words.append(w)
    for tag, _n in tags:
        if tag not in words:
            words.append(tag)
    return tuple(words[:limit])


def base_family(arch_family: str, metadata: Mapping[str, str], *, override: str = "", unsupported: str = "") -> str:
    """Display family: the user's sidecar choice, else a derivative/DiT named in the metadata, else the
    header detection's family (SD 1.5 / SD 2.x / SDXL ...), else ``Unknown``."""
    if override:
        return canonical_family(override) or override
    text = " ".join(_clean(metadata.get(k), 300) for k in (
        "modelspec.architecture", "ss_base_model_version", "ss_sd_model_name", "modelspec.base_model"))
    named = canonical_family(text) if text.strip() else None
    if unsupported and named is None:
        named = canonical_family(unsupported)
    if named in ("NoobAI", "Illustrious", "Pony") and arch_family in ("SD 1.5", "SD 2.x"):
        named = None  # the file's structure contradicts the metadata: trust the structure
    if named in ("Flux", "SD3") or (named and not arch_family):
        return named
    if arch_family == "SDXL" and named in ("NoobAI", "Illustrious", "Pony"):
        return named
    return arch_family or named or "Unknown"


def canonical_family(text: str) -> str | None:
    """The family a free-text base-model name refers to, or None."""
    if not text:
        return None
    for family in FAMILIES:
        if text.strip().lower() == family.lower():
            return family
    return next((family for family, pattern in _FAMILY_WORDS if pattern.search(text)), None)


def category(*, override: str = "", folder: str = "", name: str = "", metadata: Mapping[str, str] | None = None,
             tags: Iterable[str] = ()) -> tuple[str, str]:
    """``(category, source)``: the user's choice; else an explicit category in the metadata; else words in
    the subfolder path, then the file name / title / modelspec tags, then the training tags; else Other."""
    metadata = metadata or {}
    if override:
        return _canonical_category(override) or "Other", "user"
    explicit = _clean(metadata.get("modelspec.category") or metadata.get("category") or "", 100)
    if explicit and (found := _canonical_category(explicit)):
        return found, "metadata"
    for source, text in (("folder", folder), ("name", " ".join((name, _clean(metadata.get("modelspec.title")),
                                                                   _clean(metadata.get("ss_output_name")),
                                                                   _clean(metadata.get("modelspec.tags"), 500)))),
                         ("tags", " ".join(list(tags)[:5]))):
        text = _words(text)
        if not text.strip():
            continue
        for cat, pattern in _CATEGORY_WORDS:
            if pattern.search(text):
                return cat, source
    return "Other", "default"


def _canonical_category(text: str) -> str | None:
    low = text.strip().lower()
    for cat in CATEGORIES:
        if low == cat.lower() or low in cat.lower().split("/"):
            return cat
    if low in ("slider", "sliders", "detail", "details", "tool", "tools"):
        return "Detail/Slider"
    for cat, pattern in _CATEGORY_WORDS:
        if pattern.search(_words(text)):
            return cat
    return None


def _number(metadata: Mapping[str, str], *keys: str) -> str:
    for key in keys:
        value = _clean(metadata.get(key), 40)
        if value and value.lower() not in ("none", "null"):
            return value
    return ""


def training_summary(metadata: Mapping[str, str], rank: int | None = None) -> dict[str, str]:
    """Rank, alpha, resolution, epochs, steps, images, base model name, trainer: strings for display."""
    out = {
        "rank": _number(metadata, "ss_network_dim") or (str(rank) if rank else ""),
        "alpha": _number(metadata, "ss_network_alpha"),
        "resolution": _number(metadata, "ss_resolution", "modelspec.resolution"),
        "epochs": _number(metadata, "ss_num_epochs", "ss_epoch"),
        "steps": _number(metadata, "ss_max_train_steps", "ss_steps"),
        "images": _number(metadata, "ss_num_train_images"),
        "base_model": _clean(metadata.get("ss_sd_model_name"), 200),
        "network": _clean(metadata.get("ss_network_module"), 100),
        "author": _clean(metadata.get("modelspec.author"), 200),
    }
    return {k: v for k, v in out.items() if v}


def description(metadata: Mapping[str, str]) -> str:
    for key in ("modelspec.description", "ss_training_comment", "description"):
        text = _clean(metadata.get(key), MAX_TEXT)
        if text and text.lower() not in ("none", "null"):
            return text
    return ""
