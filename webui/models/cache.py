"""RAM cache of loaded components (UNets, text encoders, VAEs, ...) with a byte budget and refcount locks.

Policy (after InvokeAI's ``cache_record``/``_make_room_internal``, without its multi-GPU machinery):

- Entries live in LRU order.  ``get``, ``lock`` and ``put`` make an entry the most recently used.
- ``put`` evicts least-recently-used *unlocked* entries (never the one being put) until the total fits
  the budget, or until only locked entries are left: locked entries are never evicted, so the budget can
  be exceeded while components are in use.
- An entry larger than the whole budget is kept only while it is in use: it survives its own ``put`` (so
  the caller can lock and use it), and is evicted as soon as it is unlocked or the next ``put`` runs.
  With ``budget_bytes=0`` the cache therefore holds exactly what is locked right now.
- When the last lock on an entry is released and the cache is over budget, eviction runs again.
- Evicted objects are dropped from every internal structure (no lingering references), then handed to
  ``on_evict`` (outside the internal lock) so the owner can log or free device memory.

Only the worker thread mutates the cache; one internal lock makes every method safe from other threads
anyway (e.g. a UI thread reading ``stats()``).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["CacheStats", "ComponentCache", "estimate_bytes", "module_bytes"]


def module_bytes(module: Any) -> int:
    """Bytes held by a ``torch.nn.Module``'s parameters and buffers (shared tensors counted once)."""
    return _tensor_bytes(list(module.parameters()) + list(module.buffers()))


def _tensor_bytes(tensors: list[Any]) -> int:
    seen: set[tuple[Any, int]] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        try:
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # meta / exotic tensors: count the view
            key, size = (t.device, id(t)), t.numel() * t.element_size()
        if key[1] == 0 or key not in seen:  # data_ptr 0: meta or empty, cannot be shared
            seen.add(key)
            total += size
    return total


def estimate_bytes(value: Any) -> int:
    """Size of a Module, a Tensor, or a Mapping/list/tuple of them (shared storage counted once)."""
    import torch

    tensors: list[Any] = []

    def collect(v: Any) -> None:
        if isinstance(v, torch.nn.Module):
            tensors.extend(v.parameters())
            tensors.extend(v.buffers())
        elif isinstance(v, torch.Tensor):
            tensors.append(v)
        elif isinstance(v, Mapping):
            for item in v.values():
                collect(item)
        elif isinstance(v, (list, tuple)):
            for item in v:
                collect(item)
        elif v is not None and not isinstance(v, (str, int, float, bool)):
            raise TypeError(f"cannot estimate the size of {type(v).__name__}; pass size_bytes to put()")

    collect(value)
    return _tensor_bytes(tensors)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int
    entries: int
    locked: int
    budget_bytes: int


class _Entry:
    __slots__ = ("value", "size", "locks")

    def __init__(self, value: Any, size: int) -> None:
        self.value = value
        self.size = size
        self.locks = 0


class ComponentCache:
    def __init__(self, budget_bytes: int, *, on_evict: Callable[[Hashable, Any], None] | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self._budget = int(budget_bytes)
        self._on_evict = on_evict
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # oldest first
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._mutex = threading.RLock()

    # ---- queries ---------------------------------------------------------------------------
    @property
    def budget_bytes(self) -> int:
        return self._budget

    def __contains__(self, key: Hashable) -> bool:  # does not count as a use
        with self._mutex:
            return key in self._entries

    def __len__(self) -> int:
        with self._mutex:
            return len(self._entries)

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._mutex:
            return list(self._entries)

    def is_locked(self, key: Hashable) -> bool:
        with self._mutex:
            entry = self._entries.get(key)
            return entry is not None and entry.locks > 0

    def stats(self) -> CacheStats:
        with self._mutex:
            return CacheStats(self._hits, self._misses, self._evictions, self._bytes, len(self._entries),
                              sum(1 for e in self._entries.values() if e.locks), self._budget)

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The cached value (marking it most recently used), or ``default`` on a miss."""
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return default
            self._hits += 1
            self._entries.move_to_end(key)
            return entry.value

    # ---- mutation --------------------------------------------------------------------------
    def put(self, key: Hashable, value: Any, size_bytes: int | None = None) -> None:
        """Insert or replace ``key`` (replacing a locked entry is refused), then evict to fit the budget."""
        size = estimate_bytes(value) if size_bytes is None else int(size_bytes)
        if size < 0:
            raise ValueError(f"size_bytes must be >= 0, got {size}")
        with self._mutex:
            old = self._entries.get(key)
            if old is not None:
                if old.locks:
                    raise RuntimeError(f"cache entry {key!r} is in use; it cannot be replaced now")
                self._bytes -= old.size
                del self._entries[key]
            self._entries[key] = _Entry(value, size)
            self._bytes += size
            evicted = self._make_room(keep=key)
        self._notify(evicted)

    def pop(self, key: Hashable) -> Any:
        """Remove ``key`` and return its value (``KeyError`` if absent, ``RuntimeError`` if locked)."""
        with self._mutex:
            entry = self._entries[key]
            if entry.locks:
                raise RuntimeError(f"cache entry {key!r} is in use; it cannot be removed now")
            del self._entries[key]
            self._bytes -= entry.size
            return entry.value

    def clear(self) -> None:
        """Drop every unlocked entry (locked ones stay)."""
        with self._mutex:
            evicted = self._evict_where(lambda _key, _entry: True)
        self._notify(evicted)

    def set_budget(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        with self._mutex:
            self._budget = int(budget_bytes)
            evicted = self._make_room(keep=None)
        self._notify(evicted)

    @contextmanager
    def lock(self, key: Hashable) -> Iterator[Any]:
        """``with cache.lock(key) as value:`` pins the entry (never evicted) for the body; the pin is
        released in ``finally`` even when the body raises.  ``KeyError`` if the key is not cached."""
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                raise KeyError(key)
            self._hits += 1
            entry.locks += 1
            self._entries.move_to_end(key)
            value = entry.value
        try:
            yield value
        finally:
            del value
            with self._mutex:
                entry.locks -= 1
                evicted = self._make_room(keep=None) if entry.locks == 0 else []
            self._notify(evicted)

    # ---- internals (call with self._mutex held) --------------------------------------------
    def _make_room(self, keep: Hashable | None) -> list[tuple[Hashable, Any]]:
        if self._bytes <= self._budget:
            return []
        return self._evict_where(lambda key, entry: key != keep, stop_when_fits=True)

    def _evict_where(self, wanted: Callable[[Hashable, _Entry], bool], *,
                     stop_when_fits: bool = False) -> list[tuple[Hashable, Any]]:
        evicted = []
        for key in list(self._entries):  # least recently used first
            if stop_when_fits and self._bytes <= self._budget:
                break
            entry = self._entries[key]
            if entry.locks or not wanted(key, entry):
                continue
            del self._entries[key]
            self._bytes -= entry.size
            self._evictions += 1
            evicted.append((key, entry.value))
            entry.value = None
        return evicted

    def _notify(self, evicted: list[tuple[Hashable, Any]]) -> None:
        if self._on_evict is not None:
            for key, value in evicted:
                self._on_evict(key, value)
        evicted.clear()
