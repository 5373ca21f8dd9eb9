"""Runtime options: one typed store behind the Settings tab and ``/sdapi/v1/options``.

Keys use A1111's option names so existing API clients work unchanged.  The store is saved atomically to
``config.json`` in the data dir; keys we do not know (from A1111 configs or newer versions) are kept as
they are and written back untouched.  Invalid values are rejected with a message and nothing is saved.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from webui.image_requests import MAX_CONTROL_UNITS
from webui.runtime.memory import FP8_CHOICES, MODES as MEMORY_MODES


class OptionError(ValueError):
    """An option value is invalid; the message names the key and the allowed values."""


@dataclass(frozen=True)
class OptionSpec:
    key: str
    default: Any
    kind: type
    label: str
    section: str
    minimum: float | None = None
    maximum: float | None = None
    choices: Callable[[], Iterable[str]] | None = None  # dynamic choices are validated by the caller
    strict: bool = False  # a fixed set of choices: coerce refuses anything else

    def coerce(self, value: Any) -> Any:
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    lowered = value.strip().lower()
                    if lowered not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = lowered in ("true", "1", "yes")
                elif not isinstance(value, (bool, int)):
                    raise ValueError
                value = bool(value)
            elif self.kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif self.kind is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            elif self.kind is str:
                if value is None:
                    value = ""
                if not isinstance(value, str):
                    raise ValueError
        except (TypeError, ValueError):
            raise OptionError(f"option {self.key!r} must be a {self.kind.__name__}, got {value!r}") from None
        if self.strict and self.choices is not None and value not in (allowed := tuple(self.choices())):
            raise OptionError(f"option {self.key!r} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise OptionError(f"option {self.key!r} must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(f"option {self.key!r} must be <= {self.maximum}, got {value}")
        return value


OPTION_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec("sd_model_checkpoint", "", str, "Checkpoint", "Models"),
    OptionSpec("sd_vae", "Automatic", str, "VAE", "Models"),
    OptionSpec("CLIP_stop_at_last_layers", 1, int, "Clip skip", "Models", 1, 12),
    OptionSpec("sd_checkpoint_cache_mb", 8192, int, "RAM cache budget for models (MB)", "Models", 0, 1 << 20),
    OptionSpec("memory_mode", "auto", str, "Memory mode on the accelerator (auto, full, model_offload, group_offload, "
               "sequential_offload)", "Models", choices=lambda: MEMORY_MODES, strict=True),
    OptionSpec("fp8_storage", "Disable", str, "FP8 weight: store the UNet / transformer weights in float8 (about half "
               "the memory of fp16, slightly different images; the model reloads when this changes)", "Models",
               choices=lambda: FP8_CHOICES, strict=True),
    OptionSpec("memory_headroom_mb", 512, int, "Accelerator memory kept free (MB)", "Models", 0, 1 << 20),
    OptionSpec("control_net_unit_count", 3, int, "ControlNet units in the txt2img / img2img / inpaint tabs (takes effect "
               "on restart)", "ControlNet", 1, MAX_CONTROL_UNITS),
    OptionSpec("control_net_no_detectmap", False, bool, "API: do not append ControlNet maps to the returned "
               "images", "ControlNet"),
    OptionSpec("outdir_samples", "", str, "Output folder (empty: <outdir>)", "Saving"),
    OptionSpec("samples_save", True, bool, "Save every generated image", "Saving"),
    OptionSpec("samples_filename_pattern", "[number]-[seed]", str, "File name pattern", "Saving"),
    OptionSpec("live_previews_enable", True, bool, "Show live previews", "Live previews"),
    OptionSpec("show_progress_every_n_steps", 1, int, "Preview every N steps", "Live previews", 1, 100),
    OptionSpec("default_sampler", "Euler a", str, "Default sampler", "Sampling"),
    OptionSpec("default_schedule", "Automatic", str, "Default schedule type", "Sampling"),
    OptionSpec("lora_stack_size", 3, int, "LoRA slots in the UI", "LoRA", 1, 16),
    OptionSpec("ESRGAN_tile", 192, int, "Tile size for upscaler models (0 = no tiling)", "Upscaling", 0, 4096),
    OptionSpec("ESRGAN_tile_overlap", 8, int, "Tile overlap for upscaler models (pixels)", "Upscaling", 0, 256),
)

SPECS_BY_KEY: Mapping[str, OptionSpec] = {spec.key: spec for spec in OPTION_SPECS}


class OptionsStore:
    """Thread-safe, validated, atomically persisted options."""

    def __init__(self, path: Path | None):
        self._path = path
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {spec.key: spec.default for spec in OPTION_SPECS}
        self._unknown: dict[str, Any] = {}
        self.load_warnings: list[str] = []
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("top level is not an object")
        except (OSError, ValueError) as exc:
            self.load_warnings.append(f"{path}: could not read settings ({exc}); using defaults, file left as is")
            return
        for key, value in data.items():
            spec = SPECS_BY_KEY.get(key)
            if spec is None:
                self._unknown[key] = value
                continue
            try:
                self._values[key] = spec.coerce(value)
            except OptionError as exc:
                self.load_warnings.append(f"{path}: {exc}; using the default {spec.default!r}")

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._values:
                return self._values[key]
            if key in self._unknown:
                return self._unknown[key]
        raise KeyError(key)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {**self._unknown, **self._values}

    def validate(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Coerce known keys; unknown keys pass through unchanged (A1111 clients send many)."""
        clean = {}
        for key, value in changes.items():
            spec = SPECS_BY_KEY.get(key) or getattr(self, "_extra_specs", {}).get(key)
            clean[key] = spec.coerce(value) if spec else value
        return clean

    def add_specs(self, specs: Iterable[OptionSpec]) -> list[str]:
        """Options contributed by extensions: validated like ours, stored with the unknown keys.

        A saved value that no longer validates falls back to the spec's default; returns warnings.
        """
        warnings = []
        with self._lock:
            self._extra_specs = {**getattr(self, "_extra_specs", {})}
            for spec in specs:
                if spec.key in SPECS_BY_KEY or spec.key in self._extra_specs:
                    warnings.append(f"option {spec.key!r} is defined twice; the extension's spec is ignored")
                    continue
                self._extra_specs[spec.key] = spec
                if spec.key in self._unknown:
                    try:
                        self._unknown[spec.key] = spec.coerce(self._unknown[spec.key])
                    except OptionError as exc:
                        warnings.append(f"{exc}; using the default {spec.default!r}")
                        self._unknown[spec.key] = spec.default
                else:
                    self._unknown[spec.key] = spec.default
        return warnings

    def extra_specs(self) -> list[OptionSpec]:
        return list(getattr(self, "_extra_specs", {}).values())

    def update(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Validate everything first, then apply and save; returns the coerced changes."""
        clean = self.validate(changes)
        with self._lock:
            for key, value in clean.items():
                if key in SPECS_BY_KEY:
                    self._values[key] = value
                else:
                    self._unknown[key] = value
            snapshot = {**self._unknown, **self._values}
            if self._path is not None:
                atomic_write_text(self._path, json.dumps(snapshot, indent=2, sort_keys=True))
        return clean


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
