"""What a LoRA slot needs to know about a LoRA file, as pure functions (no Gradio, no torch at call time).

Shared by the txt2img LoRA stack (``webui/ui/lora_stack.py``) and the LoRA browser.  Sources, in order of
precedence (the user's own notes win):

1. our user-editable sidecar ``<stem>.webui.json`` next to the file:
   ``{"trigger_words": [str], "preferred_weight": float | null, "notes": str, "category": str}``
   (``read_sidecar`` / ``write_sidecar``; written atomically);
2. A1111's sidecar ``<stem>.json`` (``"activation text"``, ``"preferred weight"`` (0 = unset), ``"notes"``)
   and civitai helpers' ``<stem>.civitai.info`` (``"trainedWords"``, ``"model": {"name"}``, ``"name"``);
3. the safetensors header metadata (``modelspec.trigger_phrase``, kohya ``ss_tag_frequency``,
   ``ss_network_weight``/``modelspec.preferred_weight``, ``ss_output_name``, ``modelspec.title``).

``slot_info(record, model_arch)`` combines them into a ``LoraSlotInfo``: default weight, trigger words,
speed-LoRA hint, and the architecture warning ("made for SDXL, current model is SD 1.5: it would do nothing").
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from webui.types import Arch

__all__ = [
    "ARCH_LABELS", "LoraSidecar", "LoraSlotInfo", "SpeedHint", "arch_warning", "default_weight",
    "external_info", "header_metadata", "insert_trigger_words", "read_sidecar", "remove_trigger_words",
    "sidecar_path", "slot_info", "speed_hint", "trigger_words_for", "weight_warning", "write_sidecar",
]

SIDECAR_SUFFIX = ".webui.json"
WEIGHT_MIN, WEIGHT_MAX = 0.0, 2.0
ARCH_LABELS: Mapping[Arch, str] = {Arch.SD1: "SD 1.5", Arch.SD2: "SD 2.x", Arch.SDXL: "SDXL",
                                   Arch.SDXL_REFINER: "SDXL Refiner", Arch.SD3: "SD3", Arch.FLUX: "Flux.1",
                                   Arch.QWEN_IMAGE: "Qwen-Image", Arch.UNKNOWN: "unknown"}
_FAMILY = {Arch.SD1: "sd", Arch.SD2: "sd", Arch.SDXL: "sdxl", Arch.SDXL_REFINER: "refiner", Arch.SD3: "sd3",
           Arch.FLUX: "flux", Arch.QWEN_IMAGE: "qwen_image"}


# ----------------------------------------------------------------------------- sidecars
@dataclass(frozen=True)
class LoraSidecar:
    """Our user-editable notes about one LoRA file (``<stem>.webui.json``)."""

    trigger_words: tuple[str, ...] = ()
    preferred_weight: float | None = None
    notes: str = ""
    category: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        data["trigger_words"] = list(self.trigger_words)
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _stem_path(lora_path: Path | str, suffix: str) -> Path:
    path = Path(lora_path)
    return path.with_name(path.stem + suffix)


def sidecar_path(lora_path: Path | str) -> Path:
    return _stem_path(lora_path, SIDECAR_SUFFIX)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _words(value: Any) -> tuple[str, ...]:
    """A list of words, or a comma-separated string -> stripped, de-duplicated words in order."""
    items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    out: list[str] = []
    for item in items:
        word = str(item).strip()
        if word and word not in out:
            out.append(word)
    return tuple(out)


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def read_sidecar(lora_path: Path | str) -> LoraSidecar:
    """The user's sidecar (empty ``LoraSidecar`` when there is none or it is unreadable)."""
    data = _read_json(sidecar_path(lora_path))
    return LoraSidecar(trigger_words=_words(data.get("trigger_words", ())),
                       preferred_weight=_float(data.get("preferred_weight")),
                       notes=str(data.get("notes") or ""), category=str(data.get("category") or ""))


def write_sidecar(lora_path: Path | str, sidecar: LoraSidecar) -> Path:
    """Write ``<stem>.webui.json`` atomically; returns its path."""
    from webui.options import atomic_write_text

    path = sidecar_path(lora_path)
    atomic_write_text(path, sidecar.to_json())
    return path


def external_info(lora_path: Path | str) -> dict[str, Any]:
    """A1111 ``<stem>.json`` and civitai ``<stem>.civitai.info`` merged into
    ``{"trigger_words": tuple, "preferred_weight": float | None, "notes": str, "title": str}``."""
    a1111 = _read_json(_stem_path(lora_path, ".json"))
    civitai = _read_json(_stem_path(lora_path, ".civitai.info"))
    words = _words(a1111.get("activation text", "")) + _words(civitai.get("trainedWords", ()))
    weight = _float(a1111.get("preferred weight"))
    model = civitai.get("model") if isinstance(civitai.get("model"), dict) else {}
    return {"trigger_words": tuple(dict.fromkeys(words)), "preferred_weight": weight or None,
            "notes": str(a1111.get("notes") or ""),
            "title": " ".join(str(x) for x in (model.get("name"), civitai.get("name")) if x)}


def header_metadata(lora_path: Path | str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (header only); ``{}`` for other or unreadable files."""
    from webui.models.safetensors_header import read_header

    if Path(lora_path).suffix.lower() != ".safetensors":
        return {}
    try:
        return dict(read_header(lora_path).metadata or {})
    except Exception:  # broken files are reported by the catalog; here they just have no metadata
        return {}


# ----------------------------------------------------------------------------- weights and words
def default_weight(metadata: Mapping[str, str], sidecar: LoraSidecar | None = None,
                   external: Mapping[str, Any] | None = None) -> float:
    """Sidecar ``preferred_weight``, then A1111's ``preferred weight``, then metadata
    (``ss_network_weight``, ``modelspec.preferred_weight``), else 1; clamped to the slider's 0..2."""
    candidates = [sidecar.preferred_weight if sidecar else None,
                  (external or {}).get("preferred_weight"),
                  _float(metadata.get("ss_network_weight")), _float(metadata.get("modelspec.preferred_weight"))]
    for value in candidates:
        if value is not None and value != 0:
            return min(WEIGHT_MAX, max(WEIGHT_MIN, float(value)))
    return 1.0


def trigger_words_for(metadata: Mapping[str, str], sidecar: LoraSidecar | None = None,
                      external: Mapping[str, Any] | None = None, limit: int = 5) -> tuple[str, ...]:
    """The user's sidecar words if any (they replace the rest); else civitai/A1111 words, then
    ``modelspec.trigger_phrase`` and the most frequent training tags (at most ``limit`` in all)."""
    if sidecar is not None and sidecar.trigger_words:
        return sidecar.trigger_words
    from webui.models.lora.loading import trigger_words

    words = list((external or {}).get("trigger_words", ()))
    for word in trigger_words(metadata, limit=limit):
        if word not in words:
            words.append(word)
    return tuple(words[:max(limit, len((external or {}).get("trigger_words", ())))])


def _split(prompt: str) -> list[str]:
    return [p.strip() for p in prompt.split(",")]


def insert_trigger_words(prompt: str, words: Sequence[str]) -> str:
    """Append the trigger words that the prompt does not contain yet (comma-separated, A1111 style)."""
    present = {p for p in _split(prompt) if p}
    missing = [w for w in words if w and w not in present and w not in prompt]
    if not missing:
        return prompt
    base = prompt.rstrip().rstrip(",").rstrip()
    return ", ".join([base, *missing]) if base else ", ".join(missing)


def remove_trigger_words(prompt: str, words: Sequence[str]) -> str:
    """Remove comma-separated entries equal to one of ``words`` (the inverse of ``insert_trigger_words``)."""
    drop = {w.strip() for w in words if w.strip()}
    if not drop:
        return prompt
    kept = [p for p in _split(prompt) if p and p not in drop]
    return ", ".join(kept)


def weight_warning(weight: float | None) -> str | None:
    if weight is None:
        return None
    if weight > 1.0:
        return f"weight {weight:g} is above 1: most LoRAs over-cook the image there; try 0.6-1"
    if weight < 0:
        return f"weight {weight:g} is negative: the LoRA's effect is inverted"
    return None


# ----------------------------------------------------------------------------- speed LoRAs
@dataclass(frozen=True)
class SpeedHint:
    kind: str  # "LCM", "Hyper-SD", "DMD2", "PCM", "Lightning", "TCD"
    sampler: str
    schedule: str
    steps: int
    cfg_scale: float

    @property
    def text(self) -> str:
        return (f"{self.kind} speed LoRA: use sampler {self.sampler} ({self.schedule}), {self.steps} steps, "
                f"CFG {self.cfg_scale:g}")


_SPEED_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Hyper-SD", re.compile(r"hyper[-_ ]?sd", re.I)),
    ("DMD2", re.compile(r"dmd2?", re.I)),
    ("PCM", re.compile(r"(^|[^a-z])pcm([^a-z]|$)", re.I)),
    ("Lightning", re.compile(r"lightning", re.I)),
    ("TCD", re.compile(r"(^|[^a-z])tcd([^a-z]|$)", re.I)),
    ("LCM", re.compile(r"(^|[^a-z])lcm([^a-z]|$)", re.I)),
)
_STEPS = re.compile(r"(\d+)[-_ ]?steps?", re.I)


def speed_hint(name: str, metadata: Mapping[str, str] | None = None) -> SpeedHint | None:
    """Recognise LCM / Hyper-SD / DMD2 / PCM / Lightning / TCD LoRAs by file name or metadata titles."""
    metadata = metadata or {}
    text = " ".join([name] + [str(metadata.get(k) or "") for k in
                              ("ss_output_name", "modelspec.title", "modelspec.description", "ss_training_comment")])
    for kind, pattern in _SPEED_PATTERNS:
        if pattern.search(text):
            break
    else:
        return None
    found = _STEPS.search(text)
    steps = int(found.group(1)) if found else None
    if kind == "LCM":
        return SpeedHint(kind, "LCM", "Automatic", steps or 6, 1.5)
    if kind == "DMD2":
        return SpeedHint(kind, "LCM", "Automatic", steps or 4, 1.0)
    if kind == "Lightning":
        return SpeedHint(kind, "Euler", "SGM Uniform", steps or 4, 1.0)
    if kind == "Hyper-SD":
        cfg = 5.0 if re.search(r"cfg", text, re.I) else 1.0
        return SpeedHint(kind, "DDIM" if (steps or 8) > 1 else "LCM", "SGM Uniform", steps or 8, cfg)
    if kind == "PCM":
        cfg = 2.0 if re.search(r"smallcfg", text, re.I) else (5.0 if re.search(r"normalcfg", text, re.I) else 1.0)
        return SpeedHint(kind, "DDIM", "SGM Uniform", steps or 4, cfg)
    return SpeedHint(kind, "Euler a", "SGM Uniform", steps or 4, 1.0)  # TCD


# ----------------------------------------------------------------------------- architecture
def arch_warning(lora_arch: Arch, model_arch: Arch | None) -> str | None:
    """"made for SDXL, current model is SD 1.5: it would do nothing" (None when it fits or is unknown)."""
    if model_arch is None or Arch.UNKNOWN in (lora_arch, model_arch):
        return None
    if _FAMILY.get(lora_arch) == _FAMILY.get(model_arch) and not (
            {lora_arch, model_arch} == {Arch.SD1, Arch.SD2}):
        return None
    return (f"made for {ARCH_LABELS[lora_arch]}, current model is {ARCH_LABELS[model_arch]}: it would do nothing; "
            f"it is skipped")


@dataclass(frozen=True)
class LoraSlotInfo:
    name: str
    arch: Arch
    default_weight: float
    trigger_words: tuple[str, ...]
    hint: SpeedHint | None
    warning: str | None  # unusable file or wrong architecture
    notes: str = ""

    @property
    def usable(self) -> bool:
        return self.warning is None


def slot_info(record: Any, model_arch: Arch | None = None, *, metadata: Mapping[str, str] | None = None,
              ) -> LoraSlotInfo:
    """Everything a slot shows for a catalog ``ModelRecord`` of a LoRA (reads sidecars and the header)."""
    path = Path(record.path)
    metadata = header_metadata(path) if metadata is None else metadata
    sidecar = read_sidecar(path)
    external = external_info(path)
    warning = f"{record.filename}: {record.error}" if getattr(record, "error", None) else None
    if warning is None:
        mismatch = arch_warning(record.arch, model_arch)
        warning = f"{record.name}: {mismatch}" if mismatch else None
    return LoraSlotInfo(name=record.name, arch=record.arch, default_weight=default_weight(metadata, sidecar, external),
                        trigger_words=trigger_words_for(metadata, sidecar, external),
                        hint=speed_hint(record.name, metadata), warning=warning,
                        notes=sidecar.notes or external.get("notes", ""))
