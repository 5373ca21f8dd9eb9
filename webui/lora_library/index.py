"""The LoRA index: one frozen ``LoraEntry`` per file, built from the safetensors header only (never tensors).

``header_facts(path)`` reads and digests one header into a small JSON-able dict (detected arch/family,
problem, training summary, top tags, a bounded subset of the metadata); those dicts are cached in SQLite
keyed by path + size + mtime, so a restart re-reads no unchanged header.  ``LoraIndex.refresh()`` walks the
roots with ``os.scandir`` (one directory listing gives previews, sidecars and A1111/civitai info files for
free), re-reads only new or changed files, reuses unchanged entries and swaps in a new tuple atomically.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from webui.lora_library import infer
from webui.lora_library.store import LibraryStore, path_key

log = logging.getLogger(__name__)

HEADER_VERSION = 1  # bump when header_facts changes: cached rows of other versions are re-read
_SPACES = re.compile(r"[ \t_\-]+")
LORA_SUFFIXES = (".safetensors", ".pt")
PREVIEW_SUFFIXES = (".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp", ".png", ".jpg", ".jpeg", ".webp")
SIDECAR_SUFFIX = ".webui.json"
KEPT_METADATA = (  # bounded subset of __metadata__ kept in the cache, for inference and display
    "modelspec.title", "modelspec.architecture", "modelspec.tags", "modelspec.category", "modelspec.trigger_phrase",
    "modelspec.preferred_weight", "modelspec.author", "modelspec.resolution", "modelspec.base_model",
    "ss_output_name", "ss_base_model_version", "ss_sd_model_name", "ss_network_weight", "ss_network_dim",
    "ss_network_alpha", "ss_network_module", "ss_resolution", "ss_num_epochs", "ss_epoch", "ss_max_train_steps",
    "ss_steps", "ss_num_train_images", "category",
)


@dataclass(frozen=True, kw_only=True)
class LoraEntry:
    name: str  # path under its root without extension, '/'-separated (the catalog's name)
    filename: str
    path: str
    root: int  # index of the root it was found under (0 = settings.lora_dir, served by the files route)
    folder: str  # subfolder under the root ('' at the top)
    size: int
    mtime: float
    arch: str = "unknown"  # webui.types.Arch value
    family: str = "Unknown"
    category: str = "Other"
    category_source: str = "default"
    trigger_words: tuple[str, ...] = ()
    tags: tuple[tuple[str, int], ...] = ()
    title: str = ""
    description: str = ""
    notes: str = ""
    default_weight: float = 1.0
    training: tuple[tuple[str, str], ...] = ()
    format: str = ""
    preview: str = ""  # preview image path relative to the root, '/'-separated
    problem: str | None = None  # why it cannot be used (shown as a badge); None = fine
    haystack: str = field(default="", compare=False, repr=False)  # lower-case search text
    words: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def usable(self) -> bool:
        return self.problem is None


def _safe_text(text: str) -> str:
    """Text that can go to JSON/HTML: surrogate escapes from non-UTF-8 file names become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def header_facts(path: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Digest one LoRA header into a small dict; a broken/odd file gives ``{"problem": ...}``, never raises."""
    from webui.models.detect import BrokenModelFile, detect, read_header
    from webui.types import ModelKind

    if path.suffix.lower() != ".safetensors":
        problem = None if allow_pickle else ("pickle file: it can run code when loaded. Convert it to "
                                             ".safetensors, or start with --allow-pickle if you trust it")
        return {"format": "pickle", "problem": problem, "meta": {}}
    try:
        header = read_header(path)
    except BrokenModelFile as exc:
        return {"problem": exc.reason, "meta": {}}
    except Exception as exc:  # noqa: BLE001 - a reader bug must not hide the other 9,999 files
        return {"problem": f"could not read the header ({type(exc).__name__}: {exc})", "meta": {}}
    metadata = {k: v for k, v in header.metadata.items() if isinstance(v, str)}
    meta = {k: metadata[k][:500] for k in KEPT_METADATA if metadata.get(k)}
    tags = infer.tag_frequency(metadata)
    facts: dict[str, Any] = {"meta": meta, "tags": [list(t) for t in tags],
                             "description": infer.description(metadata), "tensors": len(header.tensors)}
    try:
        det = detect(header)
    except BrokenModelFile as exc:
        facts["problem"] = exc.reason
        return facts
    except Exception as exc:  # noqa: BLE001
        facts["problem"] = f"could not inspect the file ({type(exc).__name__}: {exc})"
        return facts
    unsupported = det.details.get("unsupported") or ""
    facts.update(arch=det.arch.value, detected_family=det.family, format=str(det.details.get("format", "")),
                 rank=det.details.get("rank"), unsupported=unsupported)
    if det.kind is not ModelKind.LORA:
        facts["problem"] = (f"this is a {det.kind.value}, not a LoRA: move it to its own folder"
                            if det.kind is not ModelKind.UNKNOWN else "not a LoRA this WebUI recognises")
    elif unsupported:
        facts["problem"] = unsupported
    return facts


def build_entry(*, root: int, rel: str, path: Path, size: int, mtime_ns: int, facts: Mapping[str, Any],
                sidecar: Mapping[str, Any] | None = None, external: Mapping[str, Any] | None = None,
                preview: str = "") -> LoraEntry:
    """Combine header facts, the user's sidecar and A1111/civitai info into one entry (pure)."""
    from webui.models.lora_info import LoraSidecar, default_weight

    sidecar, external = dict(sidecar or {}), dict(external or {})
    meta = facts.get("meta") or {}
    rel = _safe_text(rel)
    stem = rel.rsplit("/", 1)[-1]
    name = rel[: -len(Path(rel).suffix)] if Path(rel).suffix else rel
    folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
    tags = tuple((str(t), int(n)) for t, n in facts.get("tags") or ())
    words = tuple(sidecar.get("trigger_words") or ()) or tuple(dict.fromkeys(
        [*external.get("trigger_words", ()), *infer.trigger_words(meta, tags)]))[:10]
    family = infer.base_family(facts.get("detected_family", ""), meta, override=sidecar.get("base_model", ""),
                               unsupported=facts.get("unsupported", ""))
    cat, source = infer.category(override=sidecar.get("category", ""), folder=folder, name=stem, metadata=meta,
                                 tags=[t for t, _ in tags])
    weight = default_weight(meta, LoraSidecar(preferred_weight=sidecar.get("preferred_weight")), external)
    title = meta.get("modelspec.title") or external.get("title") or meta.get("ss_output_name") or ""
    desc = sidecar.get("description") or facts.get("description") or ""
    notes = sidecar.get("notes") or external.get("notes") or ""
    training = tuple(infer.training_summary(meta, facts.get("rank")).items())
    hay_parts = [name, _safe_text(path.name), title, " ".join(words), " ".join(t for t, _ in tags), desc[:2000],
                 notes[:2000], cat, family]
    low = "\n".join(hay_parts).lower()
    haystack = low + "\n" + _SPACES.sub(" ", low)  # also with _ and - read as spaces
    return LoraEntry(
        name=name, filename=_safe_text(path.name), path=_safe_text(str(path)), root=root, folder=folder, size=size,
        mtime=mtime_ns / 1e9, arch=facts.get("arch", "unknown"), family=family, category=cat,
        category_source=source, trigger_words=words, tags=tags, title=title, description=desc, notes=notes,
        default_weight=weight, training=training, format=facts.get("format", ""), preview=preview,
        problem=_bad_name(rel, stem) or facts.get("problem"), haystack=haystack,
        words=infer.tokens(haystack))


def _bad_name(rel: str, stem: str) -> str | None:
    if "\ufffd" in rel:
        return "the file name is not valid UTF-8: rename it so that prompts and the stack can refer to it"
    return None


def _walk(root: Path) -> Iterator[tuple[Path, list[os.DirEntry]]]:
    """(folder, entries) for every folder under root; hidden entries skipped, symlink loops cut."""
    stack, seen = [root], set()
    while stack:
        folder = stack.pop()
        try:
            real = os.path.realpath(folder)
            if real in seen:
                continue
            seen.add(real)
            with os.scandir(folder) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError:
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir():
                    subdirs.append(Path(e.path))
            except OSError:
                continue
        stack.extend(sorted(subdirs, reverse=True))
        yield folder, entries


@dataclass(frozen=True)
class _Slot:
    signature: tuple  # (size, mtime_ns, sidecar mtime, preview, external stamps)
    entry: LoraEntry
    path: Path  # the real path (may hold surrogate escapes; entry.path is display-safe)


@dataclass(frozen=True)
class ScanReport:
    files: int
    read: int  # headers actually read this time
    removed: int
    seconds: float


class LoraIndex:
    def __init__(self, roots: Sequence[Path | str], store: LibraryStore, *, allow_pickle: bool = False) -> None:
        self.roots = tuple(Path(r) for r in roots)
        self._store = store
        self._allow_pickle = allow_pickle
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._entries: tuple[LoraEntry, ...] = ()
        self._by_name: dict[str, LoraEntry] = {}
        self._cache: dict[str, tuple[int, int, dict]] | None = None
        self.scanned = False
        self.last_report: ScanReport | None = None

    def entries(self) -> tuple[LoraEntry, ...]:
        with self._lock:
            return self._entries

    def get(self, name: str) -> LoraEntry | None:
        with self._lock:
            return self._by_name.get(name)

    def refresh(self) -> ScanReport:
        """Incremental rescan: only new or changed files (size, mtime, sidecar, preview) are rebuilt."""
        start = time.perf_counter()
        with self._scan_lock:
            if self._cache is None:
                self._cache = self._store.headers(HEADER_VERSION)
            with self._lock:
                old = dict(self._slots)
            slots: dict[str, _Slot] = {}
            new_facts: dict[str, tuple[int, int, dict]] = {}
            for i, root in enumerate(self.roots):
                for folder, dir_entries in _walk(root):
                    names = {e.name for e in dir_entries}
                    for e in dir_entries:
                        if not e.name.lower().endswith(LORA_SUFFIXES):
                            continue
                        try:
                            if not e.is_file():
                                continue
                            st = e.stat()
                        except OSError:
                            continue  # vanished while scanning
                        key = path_key(e.path)
                        slot = self._slot(i, root, Path(e.path), key, st, names, old.get(key), new_facts)
                        slots[key] = slot
            removed = [k for k in old if k not in slots]
            gone = [k for k in self._cache if k not in slots and k not in new_facts]
            if new_facts:
                self._store.put_headers(HEADER_VERSION, new_facts)
                self._cache.update(new_facts)
            if gone:
                self._store.drop_headers(gone)
                for k in gone:
                    self._cache.pop(k, None)
            entries = tuple(sorted((s.entry for s in slots.values()), key=lambda x: (x.name.casefold(), x.name)))
            with self._lock:
                self._slots = slots
                self._entries = entries
                self._by_name = {}
                for entry in entries:
                    self._by_name.setdefault(entry.name, entry)
                self.scanned = True
            report = ScanReport(len(slots), len(new_facts), len(removed), time.perf_counter() - start)
            self.last_report = report
            return report

    def _slot(self, root_i: int, root: Path, path: Path, key: str, st: os.stat_result, names: set[str],
              previous: _Slot | None, new_facts: dict) -> _Slot:
        stem = path.name[: -len(path.suffix)]
        side_name = stem + SIDECAR_SUFFIX
        side_mtime = _mtime(path.with_name(side_name)) if side_name in names else 0
        ext_names = [n for n in (stem + ".json", stem + ".civitai.info") if n in names]
        ext_stamp = tuple((n, _mtime(path.with_name(n))) for n in ext_names)
        preview_name = next((stem + s for s in PREVIEW_SUFFIXES if stem + s in names), "")
        signature = (st.st_size, st.st_mtime_ns, side_mtime, preview_name, ext_stamp)
        if previous is not None and previous.signature == signature:
            return previous
        cached = self._cache.get(key) if self._cache is not None else None
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            facts = cached[2]
        else:
            facts = header_facts(path, allow_pickle=self._allow_pickle)
            new_facts[key] = (st.st_size, st.st_mtime_ns, facts)
        from webui.lora_library.sidecar import read_raw
        from webui.models.lora_info import external_info

        sidecar = read_raw(path) if side_mtime else {}
        external = external_info(path) if ext_names else {}
        rel = path.relative_to(root).as_posix()
        rel_dir = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
        try:
            entry = build_entry(root=root_i, rel=rel, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                facts=facts, sidecar=sidecar, external=external,
                                preview=_safe_text(rel_dir + preview_name) if preview_name else "")
        except Exception as exc:  # noqa: BLE001 - odd metadata must not break the page
            log.exception("could not index %s", path)
            entry = build_entry(root=root_i, rel=rel, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                facts={"problem": f"could not index this file ({type(exc).__name__}: {exc})"})
        return _Slot(signature, entry, path)

    def real_path(self, entry: LoraEntry) -> Path:
        """The on-disk path of ``entry`` (``entry.path`` is display-safe text)."""
        with self._lock:
            slot = next((s for s in self._slots.values() if s.entry is entry), None)
        return slot.path if slot is not None else Path(entry.path)

    def update_one(self, name: str) -> LoraEntry | None:
        """Rebuild the entry of ``name`` alone (after its sidecar or preview changed); None if unknown."""
        with self._scan_lock:
            with self._lock:
                found = next(((k, s) for k, s in self._slots.items() if s.entry.name == name), None)
            if found is None:
                return None
            key, slot = found
            root, path = self.roots[slot.entry.root], slot.path
            try:
                st = path.stat()
                names = {p.name for p in path.parent.iterdir()}
            except OSError:
                return None
            new_facts: dict = {}
            fresh = self._slot(slot.entry.root, root, path, key, st, names, None, new_facts)
            if new_facts:
                self._store.put_headers(HEADER_VERSION, new_facts)
                self._cache.update(new_facts)
            with self._lock:
                self._slots[key] = fresh
                self._entries = tuple(fresh.entry if e.name == name and e.path == slot.entry.path else e
                                      for e in self._entries)
                self._by_name[name] = fresh.entry
            return fresh.entry


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
