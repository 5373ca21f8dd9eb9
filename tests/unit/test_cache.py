"""ComponentCache: LRU order, byte budget, refcount locks, release of evicted objects."""
from __future__ import annotations

import gc
import threading
import weakref

import pytest

from webui.models.cache import ComponentCache, estimate_bytes, module_bytes


class Blob:  # weakref-able stand-in for a loaded component
    def __init__(self, name: str) -> None:
        self.name = name


def filled(budget: int, *sizes: int) -> ComponentCache:
    cache = ComponentCache(budget)
    for i, size in enumerate(sizes):
        cache.put(f"k{i}", Blob(f"k{i}"), size)
    return cache


def test_lru_order_and_eviction_of_least_recently_used():
    cache = filled(300, 100, 100, 100)
    assert cache.keys() == ["k0", "k1", "k2"]
    assert cache.get("k0").name == "k0"  # k0 becomes most recent
    assert cache.keys() == ["k1", "k2", "k0"]
    cache.put("k3", Blob("k3"), 100)
    assert cache.keys() == ["k2", "k0", "k3"]  # k1 was least recently used
    assert "k1" not in cache


def test_budget_is_respected():
    cache = filled(250, 100, 100, 100, 100)
    stats = cache.stats()
    assert stats.bytes <= 250 and stats.entries == 2 and stats.evictions == 2
    cache.set_budget(100)
    assert cache.keys() == ["k3"] and cache.stats().bytes == 100


def test_locked_entries_are_never_evicted():
    cache = filled(200, 100, 100)
    with cache.lock("k0") as value:
        assert value.name == "k0"
        cache.put("k2", Blob("k2"), 100)
        cache.put("k3", Blob("k3"), 100)
        assert "k0" in cache and cache.is_locked("k0")
        cache.clear()
        assert cache.keys() == ["k0"]  # clear() leaves locked entries alone
        with pytest.raises(RuntimeError, match="in use"):
            cache.pop("k0")
        with pytest.raises(RuntimeError, match="in use"):
            cache.put("k0", Blob("again"), 1)
    assert not cache.is_locked("k0")


def test_nested_locks_are_counted():
    cache = filled(100, 100)
    with cache.lock("k0"):
        with cache.lock("k0"):
            pass
        assert cache.is_locked("k0")
        cache.put("k1", Blob("k1"), 100)
        assert "k0" in cache
    assert not cache.is_locked("k0")


def test_lock_is_released_when_the_body_raises():
    cache = filled(100, 100)
    with pytest.raises(ValueError):
        with cache.lock("k0"):
            raise ValueError("boom")
    assert not cache.is_locked("k0")
    cache.put("k1", Blob("k1"), 100)
    assert "k0" not in cache  # it was evictable again


def test_lock_of_missing_key_is_a_miss():
    cache = ComponentCache(10)
    with pytest.raises(KeyError):
        with cache.lock("nope"):
            pass
    assert cache.stats().misses == 1


def test_oversized_entry_lives_only_while_in_use():
    cache = filled(100, 50)
    cache.put("big", Blob("big"), 500)
    assert "big" in cache and "k0" not in cache  # survives its own put; others make room
    with cache.lock("big") as big:
        cache.put("small", Blob("small"), 10)
        assert "big" in cache
        assert big.name == "big"
    assert "big" not in cache and "small" in cache  # evicted on unlock: over budget
    assert cache.stats().bytes == 10


def test_zero_budget_holds_only_locked_entries():
    cache = ComponentCache(0)
    cache.put("a", Blob("a"), 10)
    with cache.lock("a"):
        cache.put("b", Blob("b"), 10)
        assert cache.keys() == ["a", "b"]
    assert cache.keys() == []


def test_stats_hits_misses():
    cache = filled(1000, 10, 20)
    cache.get("k0")
    cache.get("k1")
    cache.get("zzz")
    with cache.lock("k0"):
        stats = cache.stats()
    assert (stats.hits, stats.misses, stats.bytes, stats.entries, stats.locked) == (3, 1, 30, 2, 1)
    assert cache.get("zzz", "default") == "default"
    assert "k0" in cache and cache.stats().hits == 3  # membership is not a use


def test_evicted_objects_are_released():
    cache = ComponentCache(100)
    blob = Blob("x")
    ref = weakref.ref(blob)
    cache.put("x", blob, 100)
    del blob
    cache.put("y", Blob("y"), 100)
    gc.collect()
    assert ref() is None


def test_on_evict_callback_and_replacing_an_entry():
    seen = []
    cache = ComponentCache(100, on_evict=lambda key, value: seen.append((key, value.name)))
    cache.put("a", Blob("a1"), 60)
    cache.put("a", Blob("a2"), 60)  # replace: no eviction, bytes not double counted
    assert cache.stats().bytes == 60 and seen == []
    cache.put("b", Blob("b"), 60)
    assert seen == [("a", "a2")]


def test_module_bytes_and_estimate():
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(10, 20)  # 200 weights + 20 bias, fp32
    assert module_bytes(lin) == 220 * 4
    bn = torch.nn.BatchNorm1d(8)  # 16 params + running mean/var (8 each) + num_batches_tracked int64
    assert module_bytes(bn) == (16 + 16) * 4 + 8
    shared = torch.nn.Sequential(lin, lin)
    assert module_bytes(shared) == 220 * 4
    half = torch.nn.Linear(10, 20).half()
    assert estimate_bytes({"a": lin, "b": (half, lin.weight)}) == 220 * 4 + 220 * 2
    cache = ComponentCache(10_000)
    cache.put("lin", lin)
    assert cache.stats().bytes == 880
    with pytest.raises(TypeError, match="size_bytes"):
        cache.put("obj", object())


def test_concurrent_use_keeps_accounting_consistent():
    cache = ComponentCache(500)
    errors = []

    def worker(n: int) -> None:
        try:
            for i in range(300):
                key = f"{n}-{i % 7}"
                cache.put(key, Blob(key), 50)
                try:
                    with cache.lock(key):
                        cache.get(f"{n}-{(i + 1) % 7}")
                except KeyError:
                    pass  # evicted by another thread between put and lock
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = cache.stats()
    assert stats.locked == 0 and stats.bytes == 50 * stats.entries <= 500
