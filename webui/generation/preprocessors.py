"""ControlNet preprocessors ("modules"): image -> control map, under sd-webui-controlnet's names and defaults.

A registry of small ``Preprocessor`` records.  Weight-free ones (canny, shuffle, lineart_standard, invert,
scribble_xdog, threshold, blur_gaussian, tile_resample) are a few lines of OpenCV/numpy, the algorithms of
sd-webui-controlnet / controlnet-aux.  The others run controlnet-aux detectors whose weights ("annotators")
must already be in ``models/ControlNet/annotators`` (``annotators_dir(settings)``): they are loaded from
there with ``from_pretrained(<folder>)`` and never downloaded; a missing file is a ``RequestError`` that
names it and the folder.  Loaded detectors are kept in the ``ComponentCache`` when one is given.

Like sd-webui-controlnet, a map comes out with its short side at ``resolution`` (aspect kept); fitting it
to the output size (resize mode, pixel perfect) is ``webui.generation.control``'s job.  Extension
preprocessors (hook ``webui_controlnet_preprocessors``: ``factory(image, **params) -> image``) join a
registry through ``PreprocessorRegistry.with_entries`` / ``from_plugins``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from PIL import Image

from webui.types import RequestError

ANNOTATORS_FOLDER = "annotators"
DEFAULT_RESOLUTION = 512
RESOLUTION_SLIDER = {"name": "Preprocessor Resolution", "value": DEFAULT_RESOLUTION, "min": 64, "max": 2048,
                     "step": 8}


def annotators_dir(settings: Any) -> Path:
    """Where annotator weights go: ``<ControlNet folder>/annotators`` (skipped by the model catalog)."""
    return Path(settings.controlnet_dir) / ANNOTATORS_FOLDER


@dataclass(frozen=True)
class Slider:
    name: str
    value: float
    minimum: float
    maximum: float
    step: float = 1.0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


@dataclass(frozen=True, kw_only=True)
class Preprocessor:
    """``run(image, *, resolution, a, b, detector) -> PIL image``; ``needs``: annotator files it loads
    with ``load(folder)`` (the result is passed as ``detector``)."""

    name: str
    label: str
    run: Callable[..., Image.Image]
    needs: tuple[str, ...] = ()
    load: Callable[[Path], Any] | None = None
    slider_a: Slider | None = None
    slider_b: Slider | None = None
    uses_resolution: bool = True
    extension: str | None = None  # the extension that added it (None: built in)

    @property
    def model_free(self) -> bool:
        return not self.needs

    def describe(self) -> dict[str, Any]:
        """sd-webui-controlnet's ``module_detail`` entry: ``{"model_free", "sliders"}``."""
        sliders = [dict(RESOLUTION_SLIDER)] if self.uses_resolution else []
        sliders += [s.describe() for s in (self.slider_a, self.slider_b) if s is not None]
        return {"model_free": self.model_free, "sliders": sliders}


# ---------------------------------------------------------------------------------------------- helpers
def to_rgb_array(image: Any) -> np.ndarray:
    """HWC uint8 RGB; alpha is composited over white (sd-webui-controlnet's HWC3)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def detect_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) with the short side at ``resolution`` and the aspect kept (sd-webui-controlnet)."""
    k = float(resolution) / min(width, height)
    return max(1, int(round(width * k))), max(1, int(round(height * k)))


def resize_to(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if (array.shape[1], array.shape[0]) == size:
        return array
    upscale = size[0] * size[1] > array.shape[0] * array.shape[1]
    return cv2.resize(array, size, interpolation=cv2.INTER_LANCZOS4 if upscale else cv2.INTER_AREA)


def _rgb_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=2)
    return Image.fromarray(array.astype(np.uint8), "RGB")


def _prepared(image: Any, resolution: int) -> np.ndarray:
    rgb = to_rgb_array(image)
    return resize_to(rgb, detect_size(rgb.shape[1], rgb.shape[0], resolution))


# ---------------------------------------------------------------------------------------------- weight-free
def _none(image, *, resolution, a, b, detector=None):
    return Image.fromarray(to_rgb_array(image), "RGB")


def _invert(image, *, resolution, a, b, detector=None):
    return _rgb_image(255 - _prepared(image, resolution))


def _canny(image, *, resolution, a, b, detector=None):
    import cv2

    return _rgb_image(cv2.Canny(_prepared(image, resolution), int(a), int(b)))


def _noise_disk(rng: np.random.Generator, height: int, width: int, f: int) -> np.ndarray:
    import cv2

    noise = rng.uniform(0, 1, size=(height // f + 2, width // f + 2))
    noise = cv2.resize(noise, (width + 2 * f, height + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + height, f:f + width]
    noise -= noise.min()
    return noise / max(noise.max(), 1e-8)


def _shuffle(image, *, resolution, a, b, detector=None):
    """Content shuffle: a smooth random warp (fixed seed, so the same job gives the same map)."""
    import cv2

    img = _prepared(image, resolution)
    height, width = img.shape[:2]
    rng = np.random.default_rng(0)
    flow = np.stack([_noise_disk(rng, height, width, 256) * (width - 1),
                     _noise_disk(rng, height, width, 256) * (height - 1)], axis=2).astype(np.float32)
    return _rgb_image(cv2.remap(img, flow, None, cv2.INTER_LINEAR))


def _lineart_standard(image, *, resolution, a, b, detector=None):
    import cv2

    x = _prepared(image, resolution).astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    bright = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(bright)) if bright.size else 16.0)
    return _rgb_image((intensity * 127).clip(0, 255))


def _scribble_xdog(image, *, resolution, a, b, detector=None):
    import cv2

    img = _prepared(image, resolution).astype(np.float32)
    dog = (255 - np.min(cv2.GaussianBlur(img, (0, 0), 5.0) - cv2.GaussianBlur(img, (0, 0), 0.5), axis=2)).clip(0, 255)
    return _rgb_image(np.where(2 * (255 - dog) > a, 255, 0))


def _threshold(image, *, resolution, a, b, detector=None):
    return _rgb_image(np.where(np.min(_prepared(image, resolution), axis=2) > a, 255, 0))


def _blur_gaussian(image, *, resolution, a, b, detector=None):
    import cv2

    return _rgb_image(cv2.GaussianBlur(_prepared(image, resolution), (0, 0), float(a)))


def _tile_resample(image, *, resolution, a, b, detector=None):
    """Down-sampled input (rate ``a``); the processor resolution is not used (sd-webui-controlnet)."""
    rgb = to_rgb_array(image)
    if a <= 1:
        return _rgb_image(rgb)
    size = (max(1, int(rgb.shape[1] / a)), max(1, int(rgb.shape[0] / a)))
    return _rgb_image(resize_to(rgb, size))


# ---------------------------------------------------------------------------------------------- annotators
def _aux_loader(module: str, cls: str, **kwargs: Any) -> Callable[[Path], Any]:
    """``controlnet_aux.<module>.<cls>.from_pretrained(folder)``: a local folder, so nothing is downloaded."""

    def load(folder: Path) -> Any:
        detector_cls = getattr(importlib.import_module(f"controlnet_aux.{module}"), cls)
        return detector_cls.from_pretrained(str(folder), **kwargs)

    return load


def _aux_run(**fixed: Any) -> Callable[..., Image.Image]:
    """Run a controlnet-aux detector at ``resolution``; ``fixed`` values may name ``"a"``/``"b"`` to pass
    the thresholds."""

    def run(image, *, resolution, a, b, detector):
        kwargs = {k: {"a": a, "b": b}.get(v, v) if isinstance(v, str) else v for k, v in fixed.items()}
        rgb = Image.fromarray(to_rgb_array(image), "RGB")
        out = detector(rgb, detect_resolution=resolution, image_resolution=resolution, output_type="pil", **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return _rgb_image(resize_to(to_rgb_array(out), detect_size(rgb.width, rgb.height, resolution)))

    return run


def _builtin(name: str, label: str, run: Callable[..., Image.Image], **kw: Any) -> tuple[str, Preprocessor]:
    return name, Preprocessor(name=name, label=label, run=run, **kw)


_OPENPOSE = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
_LINEART = ("sk_model.pth", "sk_model2.pth")
BUILTINS: Mapping[str, Preprocessor] = MappingProxyType(dict([
    _builtin("none", "None (the image is the control map)", _none, uses_resolution=False),
    _builtin("invert", "Invert (from white bg & black line)", _invert),
    _builtin("canny", "Canny edges", _canny, slider_a=Slider("Canny Low Threshold", 100, 1, 255),
             slider_b=Slider("Canny High Threshold", 200, 1, 255)),
    _builtin("shuffle", "Content shuffle", _shuffle),
    _builtin("lineart_standard", "Lineart standard (from white bg & black line)", _lineart_standard),
    _builtin("scribble_xdog", "Scribble (XDoG)", _scribble_xdog, slider_a=Slider("XDoG Threshold", 32, 1, 64)),
    _builtin("threshold", "Threshold", _threshold, slider_a=Slider("Binarization Threshold", 127, 0, 255)),
    _builtin("blur_gaussian", "Gaussian blur", _blur_gaussian, slider_a=Slider("Sigma", 9.0, 0.01, 64.0, 0.01)),
    _builtin("tile_resample", "Tile (resample)", _tile_resample, uses_resolution=False,
             slider_a=Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01)),
    _builtin("depth_midas", "Depth (MiDaS)", _aux_run(), needs=("dpt_hybrid-midas-501f0c75.pt",),
             load=_aux_loader("midas", "MidasDetector")),
    _builtin("depth_zoe", "Depth (ZoeDepth)", _aux_run(), needs=("ZoeD_M12_N.pt",), load=_aux_loader("zoe", "ZoeDetector")),
    _builtin("openpose", "OpenPose (body)", _aux_run(include_hand=False, include_face=False), needs=_OPENPOSE,
             load=_aux_loader("open_pose", "OpenposeDetector")),
    _builtin("openpose_full", "OpenPose (body, hands, face)", _aux_run(include_hand=True, include_face=True),
             needs=_OPENPOSE, load=_aux_loader("open_pose", "OpenposeDetector")),
    _builtin("softedge_hed", "Soft edge (HED)", _aux_run(safe=False), needs=("ControlNetHED.pth",),
             load=_aux_loader("hed", "HEDdetector")),
    _builtin("softedge_pidinet", "Soft edge (PiDiNet)", _aux_run(safe=False), needs=("table5_pidinet.pth",),
             load=_aux_loader("pidi", "PidiNetDetector")),
    _builtin("normal_bae", "Normal map (BAE)", _aux_run(), needs=("scannet.pt",),
             load=_aux_loader("normalbae", "NormalBaeDetector")),
    _builtin("lineart_realistic", "Lineart (realistic)", _aux_run(coarse=False), needs=_LINEART,
             load=_aux_loader("lineart", "LineartDetector")),
    _builtin("lineart_coarse", "Lineart (coarse)", _aux_run(coarse=True), needs=_LINEART,
             load=_aux_loader("lineart", "LineartDetector")),
    _builtin("lineart_anime", "Lineart (anime)", _aux_run(), needs=("netG.pth",),
             load=_aux_loader("lineart_anime", "LineartAnimeDetector")),
    _builtin("mlsd", "M-LSD straight lines", _aux_run(thr_v="a", thr_d="b"), needs=("mlsd_large_512_fp32.pth",),
             load=_aux_loader("mlsd", "MLSDdetector"), slider_a=Slider("MLSD Value Threshold", 0.1, 0.01, 2.0, 0.01),
             slider_b=Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0, 0.01)),
]))
ALIASES = MappingProxyType({"lineart": "lineart_realistic", "hed": "softedge_hed", "pidinet": "softedge_pidinet",
                            "depth": "depth_midas", "normal_map": "normal_bae"})


# ---------------------------------------------------------------------------------------------- registry
def _extension_preprocessor(extension: str | None, entry: Any, calls: Any) -> Preprocessor:
    """Wrap a ``NamedEntry`` (``factory(image, **params) -> image``); run isolated through ``calls``
    (the PluginManager's ``call_entry``: a failing extension is disabled, the job gets a RequestError)."""
    where = f"ControlNet preprocessor {entry.name!r}"

    def run(image, *, resolution, a, b, detector=None):
        params = {"resolution": resolution, "threshold_a": a, "threshold_b": b}
        if calls is not None and extension is not None:
            result = calls.call_entry(extension, where, entry.factory, image, **params)
        else:
            result = entry.factory(image, **params)
        if result is None or not hasattr(result, "size") and not isinstance(result, np.ndarray):
            raise RequestError(f"{where} returned {type(result).__name__}, not an image")
        return Image.fromarray(to_rgb_array(result), "RGB")

    return Preprocessor(name=entry.name, label=getattr(entry, "description", "") or entry.name, run=run,
                        extension=extension,
                        slider_a=Slider("Threshold A", 0.0, 0.0, 1024.0, 0.01),
                        slider_b=Slider("Threshold B", 0.0, 0.0, 1024.0, 0.01))


def _detector_bytes(detector: Any) -> int:
    """Bytes of the torch modules a controlnet-aux detector holds (attributes, one level deep)."""
    import torch

    from webui.models.cache import module_bytes

    modules, seen = [], set()
    for value in list(vars(detector).values()) + [v for o in vars(detector).values() if hasattr(o, "__dict__")
                                                  for v in vars(o).values()]:
        if isinstance(value, torch.nn.Module) and id(value) not in seen:
            seen.add(id(value))
            modules.append(value)
    return sum(module_bytes(m) for m in modules)


@dataclass(frozen=True)
class PreprocessorRegistry:
    """Built-in preprocessors plus extension ones; ``cache``: a ComponentCache for loaded annotators."""

    entries: Mapping[str, Preprocessor] = field(default_factory=lambda: BUILTINS)
    cache: Any = None
    device: str = "cpu"
    refused: tuple[str, ...] = ()  # extension entries that were not added, with the reason

    def with_entries(self, entries: Iterable[Any], calls: Any = None) -> "PreprocessorRegistry":
        """A registry with extension entries added: ``(extension, NamedEntry)`` pairs (as
        ``PluginManager.registry_entries`` returns them) or bare ``NamedEntry``/``Preprocessor`` objects.
        A name that is taken (built-in, alias or earlier entry) is refused and reported, not replaced."""
        merged, refused = dict(self.entries), list(self.refused)
        for item in entries:
            extension, entry = item if isinstance(item, tuple) else (getattr(item, "extension", None), item)
            name = getattr(entry, "name", "")
            folded = {n.casefold() for n in merged} | set(ALIASES)
            if not name or not isinstance(name, str) or name.casefold() in folded:
                message = f"ControlNet preprocessor {name!r} from {extension or 'an extension'}: the name is taken"
                refused.append(message)
                if calls is not None and extension and hasattr(calls, "report_problem"):
                    calls.report_problem(extension, message)
                continue
            merged[name] = entry if isinstance(entry, Preprocessor) else _extension_preprocessor(extension, entry, calls)
        return PreprocessorRegistry(MappingProxyType(merged), self.cache, self.device, tuple(refused))

    @classmethod
    def from_plugins(cls, plugins: Any, *, cache: Any = None, device: str = "cpu") -> "PreprocessorRegistry":
        registry = cls(cache=cache, device=device)
        if plugins is None:
            return registry
        return registry.with_entries(plugins.registry_entries("webui_controlnet_preprocessors"), calls=plugins)

    # ---- lookups --------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.entries)

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name`` (any case, or an old alias); RequestError listing the names."""
        key = (name or "none").strip()
        if key in self.entries:
            return key
        folded = {n.casefold(): n for n in self.entries}
        key = ALIASES.get(key.casefold(), key).casefold()
        if key in folded:
            return folded[key]
        raise RequestError(f"{name!r} is not a ControlNet preprocessor; choose one of: {', '.join(self.entries)}")

    def get(self, name: str) -> Preprocessor:
        return self.entries[self.canonical(name)]

    def describe(self, name: str) -> dict[str, Any]:
        return self.get(name).describe()

    def missing_files(self, name: str, folder: Path | None) -> list[str]:
        needs = self.get(name).needs
        return [f for f in needs if folder is None or not (Path(folder) / f).is_file()]

    # ---- running --------------------------------------------------------------------------
    def _detector(self, pre: Preprocessor, folder: Path | None) -> Any:
        if pre.load is None:
            return None
        missing = self.missing_files(pre.name, folder)
        if missing:
            where = folder if folder is not None else f"models/ControlNet/{ANNOTATORS_FOLDER}"
            raise RequestError(
                f"preprocessor {pre.name} needs the annotator file(s) {', '.join(missing)}, not found in {where}. "
                "Download them (e.g. from the Hugging Face repo lllyasviel/Annotators) and put them in that "
                "folder; this app never downloads them itself. Or pick a preprocessor that needs no weights "
                "(canny, lineart_standard, shuffle...), or 'none' with a ready control map.")
        folder = Path(folder)
        stamps = tuple((f, (folder / f).stat().st_mtime_ns) for f in pre.needs)
        key = ("annotator", str(folder), stamps)
        if self.cache is not None:
            detector = self.cache.get(key)
            if detector is not None:
                return detector
        try:
            detector = pre.load(folder)
        except Exception as exc:  # noqa: BLE001 - a damaged/wrong weights file: say which
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise RequestError(f"preprocessor {pre.name}: could not load {', '.join(pre.needs)} from {folder} "
                               f"({type(exc).__name__}: {first}); the file may be damaged or a different model") from None
        if self.device != "cpu" and hasattr(detector, "to"):
            detector = detector.to(self.device) or detector
        if self.cache is not None:
            self.cache.put(key, detector, size_bytes=_detector_bytes(detector))
        return detector

    def run(self, name: str, image: Any, *, resolution: int = DEFAULT_RESOLUTION, threshold_a: float | None = None,
            threshold_b: float | None = None, annotators_dir: Path | None = None) -> Image.Image:
        """The control map of ``image`` (RGB, short side ``resolution`` unless the module keeps the size)."""
        pre = self.get(name)
        a = _value(pre.slider_a, threshold_a)
        b = _value(pre.slider_b, threshold_b)
        detector = self._detector(pre, annotators_dir)
        return pre.run(image, resolution=int(resolution or DEFAULT_RESOLUTION), a=a, b=b, detector=detector)


def _value(slider: Slider | None, given: float | None) -> float:
    """The slider's default for None (or -1, sd-webui-controlnet's "unset"), else the value clamped to it."""
    if slider is None:
        return 0.0 if given is None else float(given)
    if given is None or given == -1:
        return float(slider.value)
    return float(min(max(float(given), slider.minimum), slider.maximum))


# ---------------------------------------------------------------------------------------------- module API
def _registry(extra: Mapping[str, Any] | Iterable[Any] | None) -> PreprocessorRegistry:
    registry = PreprocessorRegistry()
    if not extra:
        return registry
    if isinstance(extra, PreprocessorRegistry):
        return extra
    if isinstance(extra, Mapping):  # {name: factory}
        from types import SimpleNamespace

        extra = [SimpleNamespace(name=n, factory=f, description="") for n, f in extra.items()]
    return registry.with_entries(extra)


def preprocessor_names(extra: Any = None) -> list[str]:
    return _registry(extra).names()


def describe_preprocessor(name: str, extra: Any = None) -> dict[str, Any]:
    return _registry(extra).describe(name)


def run_preprocessor(name: str, image: Any, *, resolution: int = DEFAULT_RESOLUTION, threshold_a: float | None = None,
                     threshold_b: float | None = None, annotators_dir: Path | None = None, extra: Any = None) -> Image.Image:
    """Run one preprocessor (built-in, or from ``extra``: a registry, ``{name: factory}`` or NamedEntry list)."""
    return _registry(extra).run(name, image, resolution=resolution, threshold_a=threshold_a, threshold_b=threshold_b,
                                annotators_dir=annotators_dir)
