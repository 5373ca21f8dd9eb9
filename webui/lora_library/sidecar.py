"""The user's editable notes about a LoRA, in ``<stem>.webui.json`` beside the file (never in the LoRA).

The format and the reader belong to ``webui.models.lora_info`` (shared with the txt2img LoRA stack):
``{"trigger_words": [str], "preferred_weight": float | null, "notes": str, "category": str}``.  The browser
adds ``description`` and ``base_model``; ``save`` merges into the existing JSON so that keys written by
anyone else survive, and writes atomically (temp file + ``os.replace``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from webui.models.lora_info import sidecar_path
from webui.options import atomic_write_text

EDITABLE = ("trigger_words", "preferred_weight", "notes", "category", "description", "base_model")


def read_raw(lora_path: Path | str) -> dict[str, Any]:
    """The sidecar's JSON object normalised to the editable fields ({} when missing or unreadable)."""
    try:
        data = json.loads(sidecar_path(lora_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return normalise(data) if isinstance(data, dict) else {}


def normalise(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    words = data.get("trigger_words")
    if words is not None:
        items = words if isinstance(words, (list, tuple)) else str(words).split(",")
        out["trigger_words"] = list(dict.fromkeys(str(w).strip()[:200] for w in items if str(w).strip()))[:50]
    if "preferred_weight" in data:
        try:
            weight = float(data["preferred_weight"])
            out["preferred_weight"] = weight if weight == weight and abs(weight) <= 4 else None
        except (TypeError, ValueError):
            out["preferred_weight"] = None
    for key, limit in (("notes", 20_000), ("category", 50), ("description", 20_000), ("base_model", 50)):
        if data.get(key) is not None:
            out[key] = str(data[key])[:limit]
    return out


def save(lora_path: Path | str, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``changes`` (editable fields only) into the sidecar and write it atomically; returns it."""
    path = sidecar_path(lora_path)
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
        existing = existing if isinstance(existing, dict) else {}
    except (OSError, ValueError):
        existing = {}
    clean = normalise({k: v for k, v in changes.items() if k in EDITABLE})
    merged = {**existing, **clean}
    atomic_write_text(path, json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    return normalise(merged)
