"""Upscaler registry and safe model loading (spandrel).

Entries: ``None``, ``Lanczos``, ``Nearest`` and one per model file under ``models/ESRGAN`` (the catalog's
upscaler root) and its sibling ``models/RealESRGAN``.  Names are the file names without extension, so users
keep the Real-ESRGAN names they know (``RealESRGAN_x4plus``, ``realesr-general-x4v3``, ``4x-UltraSharp``).

Loading never runs pickled code: ``.safetensors`` are read as tensors, ``.pth``/``.pt`` only through
``torch.load(weights_only=True)``; the state dict is handed to spandrel's ``load_from_state_dict`` (spandrel's
own ``load_from_file`` is not used).  Loaded models live in the shared ``ComponentCache``.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from webui.types import RequestError

BUILTIN = ("None", "Lanczos", "Nearest")
MODEL_EXTENSIONS = (".pth", ".pt", ".safetensors")
_SCALE_IN_NAME = re.compile(r"(?:^|[^a-z0-9])(\d)x|x(\d)(?:[^0-9]|$)", re.IGNORECASE)


class UpscalerError(RequestError):
    """A model file cannot be used as an upscaler; the message names the file and why."""


@dataclass(frozen=True)
class UpscalerEntry:
    name: str
    kind: str  # "none" | "resample" | "model" | "plugin"
    path: Path | None = None
    error: str | None = None
    factory: Any = field(default=None, compare=False)  # plugin upscalers: factory(image, scale) -> image

    @property
    def scale(self) -> int:
        """Nominal scale, guessed from the name (A1111's /upscalers ``scale``); the loaded model knows for sure."""
        if self.kind not in ("model", "plugin"):
            return 4 if self.kind == "resample" else 1
        match = _SCALE_IN_NAME.search(self.name)
        return int(match.group(1) or match.group(2)) if match else 4

    def as_api(self) -> dict[str, Any]:
        return {"name": self.name, "model_name": self.path.stem if self.path else None,
                "model_path": str(self.path) if self.path else None, "model_url": None, "scale": self.scale}


def _scan(folder: Path) -> Iterable[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS),
                  key=lambda p: p.name.casefold())


def list_upscalers(catalog: Any, esrgan_dir: Path) -> list[UpscalerEntry]:
    """Built-ins first, then model files (catalog's upscaler root + the sibling ``RealESRGAN`` folder)."""
    entries = [UpscalerEntry("None", "none")] + [UpscalerEntry(n, "resample") for n in BUILTIN[1:]]
    seen: set[Path] = set()
    paths: list[Path] = []
    try:
        paths += [r.path for r in catalog.list("upscaler")]
    except (ValueError, AttributeError):
        pass
    for folder in (Path(esrgan_dir), Path(esrgan_dir).parent / "RealESRGAN"):
        paths += list(_scan(folder))
    names = {e.name.casefold() for e in entries}
    for path in paths:
        resolved = path.resolve()
        if resolved in seen or path.suffix.lower() not in MODEL_EXTENSIONS:
            continue
        seen.add(resolved)
        name = path.stem
        if name.casefold() in names:  # same stem twice (x.pth + x.safetensors): keep both, distinguishable
            name = path.name
        names.add(name.casefold())
        entries.append(UpscalerEntry(name, "model", path))
    return entries


def find_upscaler(entries: list[UpscalerEntry], name: str | None) -> UpscalerEntry:
    wanted = (name or "None").strip()
    for entry in entries:
        if entry.name == wanted:
            return entry
    folded = wanted.casefold()
    for entry in entries:
        if folded in (entry.name.casefold(), entry.path.name.casefold() if entry.path else ""):
            return entry
    known = ", ".join(e.name for e in entries)
    raise RequestError(f"upscaler {wanted!r} not found; available: {known}. "
                       "Put ESRGAN/Real-ESRGAN models (.pth/.safetensors) into models/ESRGAN and press Refresh.")


def read_state_dict(path: Path) -> dict[str, Any]:
    """Tensors only: safetensors, or a ``.pth`` that ``torch.load(weights_only=True)`` accepts."""
    import torch

    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif suffix in (".pth", ".pt", ".ckpt"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise UpscalerError(f"{path.name}: unsupported file type {suffix!r}; use .pth or .safetensors")
    except UpscalerError:
        raise
    except pickle.UnpicklingError:
        raise UpscalerError(
            f"{path.name}: refused to load: the file contains pickled objects other than tensors, which could "
            "run code when loaded. Use a .safetensors version of this model.") from None
    except Exception as exc:  # truncated zip, bad header, random bytes...
        raise UpscalerError(f"{path.name}: the file is corrupt or not a model file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Download it again.") from None
    if not isinstance(state, dict):
        raise UpscalerError(f"{path.name}: not a state dict (found {type(state).__name__}); not an upscaler model")
    return state


def load_descriptor(path: Path) -> Any:
    """spandrel ImageModelDescriptor for a super-resolution model file; UpscalerError otherwise."""
    import spandrel

    state = read_state_dict(path)
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(f"{Path(path).name}: not an upscaler model spandrel recognises (ESRGAN, Real-ESRGAN, "
                            "SwinIR, HAT, DAT, OmniSR, ...); remove it from models/ESRGAN") from None
    except Exception as exc:
        raise UpscalerError(f"{Path(path).name}: could not build the model ({type(exc).__name__}: {exc})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscalerError(f"{Path(path).name}: a {descriptor.architecture.name} model is not an image upscaler")
    if descriptor.input_channels not in (1, 3) or descriptor.output_channels not in (1, 3):
        raise UpscalerError(f"{Path(path).name}: {descriptor.input_channels}-channel models are not supported")
    descriptor.model.eval()
    for param in descriptor.model.parameters():
        param.requires_grad_(False)
    return descriptor


def get_descriptor(cache: Any, entry: UpscalerEntry) -> Any:
    """Load (or reuse from ``cache``) the spandrel model of a ``model`` entry. Worker thread only."""
    from webui.models.cache import module_bytes

    stat = entry.path.stat()
    key = ("upscaler", str(entry.path.resolve()), stat.st_size, stat.st_mtime_ns)
    descriptor = cache.get(key) if cache is not None else None
    if descriptor is None:
        descriptor = load_descriptor(entry.path)
        if cache is not None:
            cache.put(key, descriptor, module_bytes(descriptor.model))
    return descriptor
