"""LoRA library at scale (issue #6): 10,000 tiny LoRA files with real headers and varied metadata.

Reports: time to write the files; first scan (no cache: every header read, SQLite cache filled); restart
(a new library on the same database: headers come from the cache, files are only stat'ed); rescan after
10 files changed; search latency p50/p95 over a mix of text queries, filters and sorts; and the size of
the first page the UI sends (card grid HTML for one page).

    python bench/lora_library.py [--files 10000] [--changed 10] [--queries 200] [--keep DIR]

Goals (on the 2-core dev machine): first scan <= 30 s, rescan <= 2 s, search p95 <= 100 ms.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.lora_library_factory import WORDS, library_item, touch_later, write_library  # noqa: E402
from webui.lora_library import LoraLibrary, Query  # noqa: E402
from webui.lora_library import cards  # noqa: E402
from webui.lora_library.infer import CATEGORIES, FAMILIES  # noqa: E402
from webui.lora_library.search import ALL, SORTS  # noqa: E402


def queries(n: int, files: int, seed: int = 0) -> list[Query]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        i = rng.randrange(files)
        text = ""
        if kind < 0.35:
            text = f"{WORDS[i % len(WORDS)]}{i}_trigger"  # a trigger word: one hit
        elif kind < 0.55:
            text = rng.choice(WORDS)[: rng.randint(2, 5)]  # typing a prefix: many hits
        elif kind < 0.7:
            text = f"{rng.choice(WORDS)} lora"
        elif kind < 0.8:
            text = "zzz_nothing"
        filtered = rng.random() < 0.4  # the rest: text only (plus the default compatibility filter)
        out.append(Query(text=text, category=rng.choice([ALL, *CATEGORIES]) if filtered else ALL,
                         family=rng.choice([ALL, *FAMILIES[:6]]) if filtered else ALL, sort=rng.choice(SORTS),
                         checkpoint_arch=rng.choice([None, "sd1", "sdxl"]),
                         bookmarked_only=filtered and rng.random() < 0.2, page=rng.choice([0, 0, 0, 1, 5])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--changed", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--keep", type=Path, default=None, help="write the library here and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="lora-bench-"))
    lora_dir, db = work / "Lora", work / "webui.db"
    try:
        t = time.perf_counter()
        if not lora_dir.exists():
            write_library(lora_dir, args.files)
        write_s = time.perf_counter() - t
        db.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)

        lib = LoraLibrary([lora_dir], db)
        first = lib.refresh()
        lib.close()

        t = time.perf_counter()
        lib = LoraLibrary([lora_dir], db)  # a restart: parsed headers come from SQLite
        restart = lib.refresh()
        restart_s = time.perf_counter() - t

        noop = lib.refresh()
        rng = random.Random(1)
        for i in rng.sample(range(args.files), args.changed):
            touch_later(lora_dir / library_item(i)[0])
        rescan = lib.refresh()

        for i in range(0, args.files, max(1, args.files // 200)):  # some bookmarks and usage for the filters
            lib.set_bookmark(library_item(i)[0].rsplit(".", 1)[0], True)
        lib.record_use([library_item(i)[0].rsplit(".", 1)[0] for i in range(0, args.files, 37)])

        times, hits = [], []
        for q in queries(args.queries, args.files):
            t = time.perf_counter()
            page = lib.search(q)
            times.append((time.perf_counter() - t) * 1000)
            hits.append(page.total)
        times.sort()
        p50 = statistics.median(times)
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]

        page = lib.search(Query(checkpoint_arch=None))
        t = time.perf_counter()
        html = cards.grid(page.items, bookmarks=lib.bookmarks(), total=page.total, library=len(lib.entries()))
        render_ms = (time.perf_counter() - t) * 1000
        lib.close()

        print(f"files: {args.files} ({write_s:.1f} s to write, {sum(p.stat().st_size for p in lora_dir.rglob('*.safetensors')) / 1e6:.1f} MB)")
        print(f"first scan: {first.seconds:.2f} s ({first.read} headers read)          goal <= 30 s")
        print(f"restart scan (SQLite cache): {restart.seconds:.2f} s ({restart.read} headers read; {restart_s:.2f} s incl. open)")
        print(f"no-change rescan: {noop.seconds:.3f} s")
        print(f"rescan with {args.changed} changed: {rescan.seconds:.3f} s ({rescan.read} headers read)   goal <= 2 s")
        print(f"search over {args.queries} queries: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {times[-1]:.1f} ms "
              f"(mean hits {statistics.mean(hits):.0f} of {args.files})   goal p95 <= 100 ms")
        print(f"first page: {len(page.items)} cards of {page.total}, grid HTML {len(html.encode()) / 1024:.1f} KiB "
              f"(+ {len(cards.CSS.encode()) / 1024:.1f} KiB CSS once), built in {render_ms:.1f} ms")
        ok = first.seconds <= 30 and rescan.seconds <= 2 and p95 <= 100
        print("goals met" if ok else "GOALS NOT MET")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
