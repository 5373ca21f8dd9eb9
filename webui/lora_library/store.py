"""The LoRA library's persistent state: one SQLite file (``<data_dir>/webui.db``).

Tables: ``lora_bookmarks`` (name), ``lora_usage`` (name, count, last_used), ``lora_headers`` (parsed header
facts per file keyed by path with the size+mtime they were read at, so a restart does not re-read 10,000
headers) and ``lora_hashes`` (sha256 per path+size+mtime).  WAL journal + ``synchronous=NORMAL`` and every
write in one transaction: a kill -9 at any point leaves either the old or the new state, never a torn one.
One connection shared by threads under a lock (SQLite calls are short).
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS lora_bookmarks (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS lora_usage (name TEXT PRIMARY KEY, count INTEGER NOT NULL DEFAULT 0,
                                       last_used REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS lora_headers (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                                         version INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lora_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                                        sha256 TEXT NOT NULL);
"""


def path_key(path: Path | str) -> str:
    """A text key for any path, also one whose name is not valid UTF-8 (surrogate escapes become ``\\xNN``)."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class LibraryStore:
    def __init__(self, file: Path | str | None) -> None:
        """``file=None`` keeps everything in memory (tests)."""
        self.file = Path(file) if file is not None else None
        if self.file is not None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        target = str(self.file) if self.file is not None else ":memory:"
        try:
            db = self._connect(target)
        except sqlite3.DatabaseError as exc:  # not a database at all: keep it for inspection, start fresh
            assert self.file is not None
            broken = self.file.with_name(self.file.name + f".broken-{int(time.time())}")
            log.warning("%s is not a usable SQLite database (%s); moved to %s", self.file, exc, broken)
            self.file.replace(broken)
            db = self._connect(target)
        return db

    @staticmethod
    def _connect(target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.execute("PRAGMA quick_check").fetchone()
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, rows: Iterable[tuple] | tuple = ()) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if isinstance(rows, tuple):
                    self._db.execute(sql, rows)
                else:
                    self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- bookmarks ------------------------------------------------------------------------
    def bookmarks(self) -> set[str]:
        return {row[0] for row in self._read("SELECT name FROM lora_bookmarks")}

    def set_bookmark(self, name: str, on: bool) -> None:
        if on:
            self._write("INSERT OR IGNORE INTO lora_bookmarks(name, created) VALUES (?, ?)", (name, time.time()))
        else:
            self._write("DELETE FROM lora_bookmarks WHERE name = ?", (name,))

    # ---- usage ----------------------------------------------------------------------------
    def usage(self) -> dict[str, tuple[int, float]]:
        return {name: (count, last) for name, count, last in self._read("SELECT name, count, last_used FROM lora_usage")}

    def record_use(self, names: Iterable[str], when: float | None = None) -> None:
        when = time.time() if when is None else when
        rows = [(name, when) for name in dict.fromkeys(names) if name]
        if rows:
            self._write("INSERT INTO lora_usage(name, count, last_used) VALUES (?, 1, ?) "
                        "ON CONFLICT(name) DO UPDATE SET count = count + 1, last_used = excluded.last_used", rows)

    # ---- parsed header cache --------------------------------------------------------------
    def headers(self, version: int) -> dict[str, tuple[int, int, dict[str, Any]]]:
        out = {}
        for path, size, mtime_ns, data in self._read(
                "SELECT path, size, mtime_ns, data FROM lora_headers WHERE version = ?", (version,)):
            try:
                out[path] = (size, mtime_ns, json.loads(data))
            except ValueError:
                continue
        return out

    def put_headers(self, version: int, rows: Mapping[str, tuple[int, int, Mapping[str, Any]]]) -> None:
        self._write("INSERT OR REPLACE INTO lora_headers(path, size, mtime_ns, version, data) VALUES (?, ?, ?, ?, ?)",
                    [(p, s, m, version, json.dumps(d, ensure_ascii=True)) for p, (s, m, d) in rows.items()])

    def drop_headers(self, paths: Iterable[str]) -> None:
        self._write("DELETE FROM lora_headers WHERE path = ?", [(p,) for p in paths])

    # ---- hashes ---------------------------------------------------------------------------
    def hashes(self) -> dict[str, tuple[int, int, str]]:
        return {p: (s, m, h) for p, s, m, h in self._read("SELECT path, size, mtime_ns, sha256 FROM lora_hashes")}

    def put_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        self._write("INSERT OR REPLACE INTO lora_hashes(path, size, mtime_ns, sha256) VALUES (?, ?, ?, ?)",
                    (path, size, mtime_ns, sha256))
