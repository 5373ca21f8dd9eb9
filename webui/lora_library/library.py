"""``LoraLibrary``: the LoRA browser's service on ``AppContext`` (index + SQLite store + sidecars + hashes).

Thread-safe: the UI calls it from Gradio worker threads; the background hasher runs on its own daemon
thread and only reads files and writes the ``lora_hashes`` table.
"""
from __future__ import annotations

import hashlib
import io
import logging
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from webui.lora_library import sidecar
from webui.lora_library.index import LoraEntry, LoraIndex, ScanReport
from webui.lora_library.search import Page, Query, facets, search
from webui.lora_library.store import LibraryStore, path_key

log = logging.getLogger(__name__)
HASH_CHUNK = 1024 * 1024


class LoraLibrary:
    def __init__(self, roots: Sequence[Path | str], db_file: Path | str | None, *, allow_pickle: bool = False) -> None:
        self.store = LibraryStore(db_file)
        self.index = LoraIndex(roots, self.store, allow_pickle=allow_pickle)
        self._hash_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._hash_lock = threading.Lock()
        self._hashes: dict[str, tuple[int, int, str]] | None = None

    @classmethod
    def from_settings(cls, settings, roots: Sequence[Path | str] | None = None) -> "LoraLibrary":
        return cls(roots or [settings.lora_dir], Path(settings.data_dir) / "webui.db",
                   allow_pickle=settings.allow_pickle)

    def close(self) -> None:
        self._stop.set()
        if self._hash_thread is not None:
            self._hash_thread.join(timeout=5)
        self.store.close()

    # ---- index ----------------------------------------------------------------------------
    def refresh(self) -> ScanReport:
        return self.index.refresh()

    def ensure_scanned(self) -> None:
        if not self.index.scanned:
            self.index.refresh()

    def entries(self) -> tuple[LoraEntry, ...]:
        self.ensure_scanned()
        return self.index.entries()

    def get(self, name: str) -> LoraEntry | None:
        self.ensure_scanned()
        return self.index.get(name)

    def search(self, query: Query) -> Page:
        return search(self.entries(), query, bookmarks=self.store.bookmarks(), usage=self.store.usage())

    def facets(self) -> dict[str, list[str]]:
        return facets(self.entries())

    # ---- bookmarks and usage --------------------------------------------------------------
    def bookmarks(self) -> set[str]:
        return self.store.bookmarks()

    def is_bookmarked(self, name: str) -> bool:
        return name in self.store.bookmarks()

    def set_bookmark(self, name: str, on: bool) -> bool:
        self.store.set_bookmark(name, on)
        return on

    def toggle_bookmark(self, name: str) -> bool:
        return self.set_bookmark(name, not self.is_bookmarked(name))

    def record_use(self, names: Iterable[str]) -> None:
        """Count one use of each LoRA name (called once per generation job that applied them)."""
        try:
            self.store.record_use([self.canonical_name(n) for n in names])
        except Exception:  # noqa: BLE001 - statistics must never fail a generation
            log.exception("could not record LoRA usage")

    def canonical_name(self, name: str) -> str:
        """The library name a prompt/stack reference means (``x.safetensors``, a bare stem...)."""
        name = str(name).strip()
        for suffix in (".safetensors", ".pt"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        if not self.index.scanned or self.index.get(name) is not None:
            return name
        stem = name.rsplit("/", 1)[-1]
        return next((e.name for e in self.index.entries() if e.name.rsplit("/", 1)[-1] == stem), name)

    def usage(self) -> dict[str, tuple[int, float]]:
        return self.store.usage()

    # ---- editing --------------------------------------------------------------------------
    def _require(self, name: str) -> LoraEntry:
        entry = self.get(name)
        if entry is None:
            raise KeyError(f"no LoRA named {name!r}; press Refresh if you just added it")
        return entry

    def _real_path(self, entry: LoraEntry) -> Path:
        return self.index.real_path(entry)

    def save_details(self, name: str, changes: Mapping[str, Any]) -> LoraEntry:
        """Save editable fields into ``<stem>.webui.json`` (atomically; the LoRA file is never touched)."""
        entry = self._require(name)
        sidecar.save(self._real_path(entry), changes)
        return self.index.update_one(name) or entry

    def sidecar(self, name: str) -> dict[str, Any]:
        return sidecar.read_raw(self._real_path(self._require(name)))

    def set_preview(self, name: str, image: Any) -> LoraEntry:
        """Save ``image`` (PIL image, numpy array or file path) as ``<stem>.preview.png`` beside the LoRA."""
        from PIL import Image

        entry = self._require(name)
        path = self._real_path(entry)
        if isinstance(image, (str, Path)):
            image = Image.open(image)
        elif not isinstance(image, Image.Image):
            import numpy as np

            image = Image.fromarray(np.asarray(image).astype("uint8"))
        image = image.convert("RGB")
        image.thumbnail((768, 768))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        target = path.with_name(path.name[: -len(path.suffix)] + ".preview.png")
        _atomic_write_bytes(target, buffer.getvalue())
        return self.index.update_one(name) or entry

    def samples(self, name: str, limit: int = 12) -> list[str]:
        """Sample images: the preview, then images in a ``<stem>.samples/`` folder (paths relative to the root)."""
        entry = self._require(name)
        out = [entry.preview] if entry.preview else []
        folder = self._real_path(entry).with_suffix(".samples")
        if folder.is_dir():
            prefix = entry.folder + "/" if entry.folder else ""
            for p in sorted(folder.iterdir())[:200]:
                if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and not p.name.startswith("."):
                    out.append(f"{prefix}{folder.name}/{p.name}")
                if len(out) >= limit:
                    break
        return out

    # ---- hashes ---------------------------------------------------------------------------
    def _hash_table(self) -> dict[str, tuple[int, int, str]]:
        with self._hash_lock:
            if self._hashes is None:
                self._hashes = self.store.hashes()
            return self._hashes

    def sha256(self, name: str, *, compute: bool = True) -> str | None:
        """Full SHA-256 of the file, cached by path+size+mtime; computed now when ``compute``."""
        entry = self._require(name)
        return self._hash_entry(entry, compute=compute)

    def _hash_entry(self, entry: LoraEntry, *, compute: bool) -> str | None:
        path = self._real_path(entry)
        key = path_key(path)
        try:
            st = path.stat()
        except OSError:
            return None
        cached = self._hash_table().get(key)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        if not compute:
            return None
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
                if self._stop.is_set():
                    return None
        value = digest.hexdigest()
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
            self.store.put_hash(key, st.st_size, st.st_mtime_ns, value)
            table = self._hash_table()
            with self._hash_lock:
                table[key] = (st.st_size, st.st_mtime_ns, value)
        return value

    def start_hashing(self) -> None:
        """Hash every not-yet-hashed file on a background daemon thread (one pass; idempotent)."""
        if self._hash_thread is not None and self._hash_thread.is_alive():
            return

        def run() -> None:
            for entry in self.entries():
                if self._stop.is_set():
                    return
                try:
                    self._hash_entry(entry, compute=True)
                except OSError:
                    continue
                except Exception:  # noqa: BLE001
                    log.exception("hashing %s failed", entry.path)
                self._stop.wait(0.001)  # let the UI threads breathe on a 2-core machine

        self._hash_thread = threading.Thread(target=run, name="lora-hasher", daemon=True)
        self._hash_thread.start()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
