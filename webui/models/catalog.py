"""The model catalog: which files are in the model folders, what they are, and their hashes.

``Catalog.refresh()`` walks each folder kind's roots (subfolders included), detects every candidate with
``webui.models.detect`` and keeps one ``ModelRecord`` per file or diffusers folder.  Refreshing is
incremental: a file whose (size, mtime) did not change keeps its record without its header being read
again.  Files that cannot be used stay listed with ``error`` saying why (wrong folder, broken, pickle...)
instead of disappearing.  SHA-256 hashes are computed lazily and cached in a JSON file.

Thread safety: a refresh builds new immutable tuples and swaps them in under a lock, so UI threads can
``list``/``get`` while another thread refreshes; two refreshes never run at once.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Iterator, Mapping, Sequence

from webui.models.detect import BrokenModelFile, Detection, detect_path
from webui.settings import MODEL_FOLDERS
from webui.types import Arch, ModelKind, Prediction, Variant

__all__ = ["Catalog", "ModelNotFound", "ModelRecord", "FOLDER_KINDS"]
log = logging.getLogger(__name__)

# Root keys (as in Settings.model_dirs()) -> the kind of model that folder should hold.
FOLDER_KINDS = MappingProxyType({
    "checkpoint": ModelKind.CHECKPOINT, "vae": ModelKind.VAE, "lora": ModelKind.LORA,
    "embedding": ModelKind.EMBEDDING, "controlnet": ModelKind.CONTROLNET, "esrgan": ModelKind.UPSCALER,
    "upscaler": ModelKind.UPSCALER, "ip_adapter": ModelKind.IP_ADAPTER, "clip_vision": ModelKind.CLIP_VISION,
    "unet": ModelKind.CHECKPOINT, "text_encoder": ModelKind.TEXT_ENCODER,
})
EXTENSIONS = MappingProxyType({
    ModelKind.CHECKPOINT: (".safetensors", ".ckpt", ".gguf"),
    ModelKind.VAE: (".safetensors", ".pt", ".ckpt"),
    ModelKind.LORA: (".safetensors", ".pt"),
    ModelKind.EMBEDDING: (".safetensors", ".pt", ".bin"),
    ModelKind.CONTROLNET: (".safetensors", ".pth"),
    ModelKind.UPSCALER: (".pth", ".safetensors", ".pt"),
    ModelKind.IP_ADAPTER: (".safetensors",),
    ModelKind.CLIP_VISION: (".safetensors",),
    ModelKind.TEXT_ENCODER: (".safetensors", ".gguf"),  # GGUF text encoders: listed with why they cannot load
})
LABELS = MappingProxyType({
    ModelKind.CHECKPOINT: "checkpoint", ModelKind.VAE: "VAE", ModelKind.LORA: "LoRA",
    ModelKind.EMBEDDING: "textual-inversion embedding", ModelKind.CONTROLNET: "ControlNet",
    ModelKind.UPSCALER: "upscaler", ModelKind.IP_ADAPTER: "IP-Adapter", ModelKind.CLIP_VISION: "CLIP vision encoder",
    ModelKind.TEXT_ENCODER: "text encoder", ModelKind.UNKNOWN: "model",
})
FILE_FORMATS = MappingProxyType({".safetensors": "safetensors", ".gguf": "gguf"})  # anything else: pickle
HASH_CHUNK = 1024 * 1024
_TITLE_HASH = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")


class ModelNotFound(LookupError):
    def __init__(self, kind: ModelKind, query: str, suggestions: Sequence[str] = ()) -> None:
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"no {LABELS[kind]} matches {query!r}.{hint} "
                         "If you just added the file, press Refresh.")
        self.kind, self.query, self.suggestions = kind, query, tuple(suggestions)

    def __str__(self) -> str:  # LookupError would repr() the message
        return self.args[0]


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    name: str  # path under its root without extension, '/'-separated: "sdxl/illustrious_v1"
    filename: str  # base name on disk, with extension
    path: Path
    folder: ModelKind  # which list it is in (the folder it was found in)
    kind: ModelKind  # what the file is (differs from ``folder`` for misplaced files; see ``error``)
    arch: Arch = Arch.UNKNOWN
    variant: Variant = Variant.NORMAL
    prediction: Prediction | None = None
    family: str = ""
    size: int = 0
    mtime: float = 0.0
    format: str = "safetensors"  # "safetensors" | "diffusers" | "gguf" | "pickle"
    error: str | None = None  # why it cannot be used; None = usable
    sha256: str | None = None  # known once computed (Catalog.sha256) or found in the hash cache
    detection: Detection | None = field(default=None, compare=False, repr=False)

    @property
    def relative_filename(self) -> str:
        return self.name if self.format == "diffusers" else self.name + self.path.suffix

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        """A1111's form: ``"relative/name.safetensors [shorthash]"`` (without the hash until it is known)."""
        return f"{self.relative_filename} [{self.short_hash}]" if self.sha256 else self.relative_filename

    @property
    def usable(self) -> bool:
        return self.error is None


class _HashCache:
    """``{path: {"size", "mtime_ns", "sha256"}}`` in a JSON file, written atomically."""

    def __init__(self, file: Path | None) -> None:
        self._file, self._lock, self._data = file, threading.Lock(), None

    def _load(self) -> dict:
        if self._data is None:
            self._data = {}
            if self._file is not None and self._file.exists():
                try:
                    data = json.loads(self._file.read_text(encoding="utf-8"))
                    self._data = dict(data.get("files", {})) if isinstance(data, dict) else {}
                except (OSError, ValueError) as exc:
                    log.warning("ignoring unreadable hash cache %s: %s", self._file, exc)
        return self._data

    def get(self, path: Path, stamp: tuple[int, int]) -> str | None:
        with self._lock:
            entry = self._load().get(str(path))
        if isinstance(entry, dict) and (entry.get("size"), entry.get("mtime_ns")) == stamp:
            return entry.get("sha256")
        return None

    def put(self, path: Path, stamp: tuple[int, int], digest: str) -> None:
        with self._lock:
            self._load()[str(path)] = {"size": stamp[0], "mtime_ns": stamp[1], "sha256": digest}
            if self._file is None:
                return
            self._file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self._file.name + ".", suffix=".tmp", dir=self._file.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"version": 1, "files": self._data}, f, indent=0, sort_keys=True)
                os.replace(tmp, self._file)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


def _stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file, or of a diffusers folder (total size, newest file)."""
    if not path.is_dir():
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    size = newest = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        st = file.stat()
        size, newest = size + st.st_size, max(newest, st.st_mtime_ns)
    return size, newest


def _hash_path(path: Path) -> str:
    """SHA-256 of a file, streamed in 1 MB chunks; for a diffusers folder, of its files' relative names
    and contents in sorted order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _walk(root: Path, extensions: tuple[str, ...]) -> Iterator[Path]:
    """Model files and diffusers folders under ``root``; hidden entries skipped, symlink loops cut."""
    stack, seen = [root], set()
    while stack:
        folder = stack.pop()
        try:
            real = folder.resolve()
            if real in seen:
                continue
            seen.add(real)
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    if (path / "model_index.json").is_file():
                        yield path  # a diffusers pipeline: one record, never descend
                    else:
                        stack.append(path)
                elif entry.is_file() and path.suffix.lower() in extensions:
                    yield path
            except OSError:
                continue


def _is_listed(path: Path, roots: list[Path]) -> bool:
    """``path`` is one of ``roots`` (``models/vae`` is ``models/VAE`` on a case-insensitive file system)."""
    for root in roots:
        try:
            if root.is_dir() and path.samefile(root):
                return True
        except OSError:
            continue
    return False


class Catalog:
    def __init__(self, roots: Mapping[str, Sequence[Path | str]], hash_cache_file: Path | None = None, *,
                 allow_pickle: bool = False) -> None:
        unknown = sorted(set(roots) - set(FOLDER_KINDS))
        if unknown:
            raise ValueError(f"unknown model folder kind(s) {unknown}; expected some of {sorted(FOLDER_KINDS)}")
        self._roots: dict[ModelKind, tuple[Path, ...]] = {}
        for key, paths in roots.items():
            kind = FOLDER_KINDS[key]
            self._roots[kind] = self._roots.get(kind, ()) + tuple(Path(p) for p in paths)
        self._allow_pickle = allow_pickle
        self._hashes = _HashCache(Path(hash_cache_file) if hash_cache_file else None)
        self._lock = threading.Lock()  # guards _records / _stamps swaps and record updates
        self._refresh_lock = threading.Lock()  # one scan at a time
        self._records: dict[ModelKind, tuple[ModelRecord, ...]] = {kind: () for kind in self._roots}
        self._stamps: dict[Path, tuple[int, int]] = {}

    @classmethod
    def from_settings(cls, settings) -> "Catalog":
        roots = {key: [path] for key, path in settings.model_dirs().items()}
        for key, paths in settings.alias_model_dirs().items():  # ComfyUI folder names, when present
            roots[key] = roots[key] + [p for p in paths if p.is_dir() and not _is_listed(p, roots[key])]
        roots["unet"] = roots["unet"] + list(settings.extra_ckpt_dirs)  # last checkpoint roots (same kind)
        return cls(roots, settings.cache_dir / "hashes.json", allow_pickle=settings.allow_pickle)

    # ---- reading ---------------------------------------------------------------------------
    @staticmethod
    def _kind(kind: ModelKind | str) -> ModelKind:
        if isinstance(kind, ModelKind):
            return kind
        try:
            return FOLDER_KINDS[kind]
        except KeyError:
            raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(FOLDER_KINDS)}") from None

    def roots(self, kind: ModelKind | str) -> tuple[Path, ...]:
        return self._roots.get(self._kind(kind), ())

    def list(self, kind: ModelKind | str) -> list[ModelRecord]:
        """Records of one folder kind, sorted by name (case-insensitive); unusable ones included."""
        with self._lock:
            return list(self._records.get(self._kind(kind), ()))

    def get(self, kind: ModelKind | str, query: str) -> ModelRecord:
        """Find by title, name, relative filename, filename, or short/full hash; else ``ModelNotFound``."""
        kind = self._kind(kind)
        records, q = self.list(kind), query.strip()
        titled = _TITLE_HASH.match(q)
        base = titled.group("name") if titled else q
        tests = (
            lambda r: r.title == q,
            lambda r: base in (r.name, r.relative_filename),
            lambda r: base in (r.filename, Path(r.filename).stem),
            lambda r: r.sha256 is not None and len(q) >= 8 and r.sha256.startswith(q.lower()),
            lambda r: titled is not None and r.sha256 is not None and r.sha256.startswith(titled["hash"].lower()),
            lambda r: base.casefold() in (r.name.casefold(), r.relative_filename.casefold(), r.filename.casefold()),
        )
        for test in tests:
            hit = next((r for r in records if test(r)), None)
            if hit is not None:
                return hit
        names = sorted({n for r in records for n in (r.name, r.filename)})
        raise ModelNotFound(kind, query, difflib.get_close_matches(base, names, n=3, cutoff=0.5))

    # ---- hashing ---------------------------------------------------------------------------
    def sha256(self, record: ModelRecord) -> str:
        """Full SHA-256 (hex) of the record's file, from the cache when (path, size, mtime) still match."""
        stamp = _stamp(record.path)
        digest = self._hashes.get(record.path, stamp)
        if digest is None:
            digest = _hash_path(record.path)
            if _stamp(record.path) == stamp:  # the file did not change while we read it
                self._hashes.put(record.path, stamp, digest)
        with self._lock:
            if self._stamps.get(record.path) == stamp:
                kind = record.folder
                self._records[kind] = tuple(replace(r, sha256=digest) if r.path == record.path else r
                                            for r in self._records.get(kind, ()))
        return digest

    # ---- scanning --------------------------------------------------------------------------
    def refresh(self, kind: ModelKind | str | None = None) -> None:
        """Rescan one folder kind (or all); unchanged files keep their records without re-reading."""
        kinds = list(self._roots) if kind is None else [self._kind(kind)]
        with self._refresh_lock:
            for k in kinds:
                with self._lock:
                    previous = {r.path: r for r in self._records.get(k, ())}
                    old_stamps = dict(self._stamps)
                records, stamps = [], {}
                for root in self._roots.get(k, ()):
                    for path in _walk(root, EXTENSIONS[k]):
                        if k is ModelKind.CONTROLNET and path.relative_to(root).parts[0] == "annotators":
                            continue  # preprocessor weights (webui.generation.preprocessors), not ControlNets
                        try:
                            stamp = _stamp(path)
                        except OSError:
                            continue  # vanished while scanning
                        record = previous.get(path)
                        if record is None or old_stamps.get(path) != stamp:
                            record = self._make_record(k, root, path, stamp)
                        if record.sha256 is None:
                            digest = self._hashes.get(path, stamp)
                            record = replace(record, sha256=digest) if digest else record
                        records.append(record)
                        stamps[path] = stamp
                records.sort(key=lambda r: (r.name.casefold(), r.name, str(r.path)))
                with self._lock:
                    for path in previous:
                        self._stamps.pop(path, None)
                    self._stamps.update(stamps)
                    self._records[k] = tuple(records)

    def _make_record(self, folder: ModelKind, root: Path, path: Path, stamp: tuple[int, int]) -> ModelRecord:
        rel = path.relative_to(root).as_posix()
        is_dir = path.is_dir()
        fmt = "diffusers" if is_dir else FILE_FORMATS.get(path.suffix.lower(), "pickle")
        common = dict(name=rel if is_dir else rel[: -len(path.suffix)], filename=path.name, path=path,
                      folder=folder, size=stamp[0], mtime=stamp[1] / 1e9, format=fmt)
        if folder is ModelKind.UPSCALER:  # identified by spandrel when loaded
            return ModelRecord(kind=ModelKind.UPSCALER, **common)
        try:
            det = detect_path(path, hint=folder)
        except BrokenModelFile as exc:
            return ModelRecord(kind=ModelKind.UNKNOWN, error=exc.reason, **common)
        except Exception as exc:  # a detector bug must not hide every other model
            log.exception("could not inspect %s", path)
            return ModelRecord(kind=ModelKind.UNKNOWN, error=f"could not inspect the file ({exc!r})", **common)
        return ModelRecord(kind=det.kind, arch=det.arch, variant=det.variant, prediction=det.prediction,
                           family=det.family, error=self._problem(folder, det, fmt), detection=det, **common)

    def _problem(self, folder: ModelKind, det: Detection, fmt: str) -> str | None:
        if det.kind is ModelKind.UNKNOWN:
            return det.message or "not a model type this WebUI recognises"
        if det.kind is not folder:
            where = MODEL_FOLDERS.get(det.kind.value)
            move = f": move it to models/{where}" if where else ""
            return f"this is a {LABELS[det.kind]}, not a {LABELS[folder]}{move}"
        if det.unsupported:
            return det.unsupported
        if fmt == "pickle" and not self._allow_pickle:
            return ("pickle file: it can run code when loaded. Convert it to .safetensors, "
                    "or start with --allow-pickle if you trust its source")
        if folder is ModelKind.CHECKPOINT and det.arch is Arch.UNKNOWN and not det.details.get("pickle"):
            return "architecture not recognised (supported: SD 1.x, SD 2.x, SDXL, SD3/3.5, Flux.1, Qwen-Image)"
        return None
