"""Saving generated images: A1111 naming, infotext inside, atomic, safe under concurrency.

Layout: ``<outdir>/<mode>/<YYYY-MM-DD>/<NNNNN>-<pattern>.png``.  ``NNNNN`` is A1111's running
number (largest number already in the folder + 1, starting at 00000) and always leads the name.

A save never leaves a partial file under a final name and two concurrent saves (threads or
processes) never get the same number, without any lock:

1. the number is reserved by creating ``.NNNNN.webui-tmp`` with ``O_CREAT | O_EXCL``; the scan that
   picks the next number counts these reservations as taken;
2. the image is written into that reservation file and fsynced;
3. it is moved to its final name with ``os.replace`` (atomic within one folder).

Because the reservation exists until the instant it becomes the final file, a reservation that
succeeds after another saver already finished with the same number is detected by re-checking
the folder; the loser drops its reservation and takes the next number.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

from PIL import Image

from webui.io.metadata import exif_with_infotext, png_with_infotext

DEFAULT_PATTERN = "[number]-[seed]"
FORMATS: Mapping[str, str] = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
INVALID_FILENAME_CHARS = '#<>:"/\\|?*\n\r\t'
MAX_PART_CHARS = 128  # one token (A1111 max_filename_part_length)
MAX_STEM_BYTES = 200  # whole name without extension; file systems allow 255
MAX_PROMPT_WORDS = 8
TMP_SUFFIX = ".webui-tmp"
STALE_TMP_SECONDS = 3600.0
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}
_RE_TOKEN = re.compile(r"\[([^\[\]<>]+)(?:<([^>\]]*)>)?\]")
_RE_NONLETTERS = re.compile(r"[\s'\"()\[\]]+")
_RE_LEADING_NUMBER = re.compile(r"^(\d+)(?=[-.]|$)")
_RE_RESERVATION = re.compile(r"^\.(\d+)" + re.escape(TMP_SUFFIX) + "$")
_MAX_ATTEMPTS = 1000


def sanitize_filename_part(text: object, *, max_chars: int = MAX_PART_CHARS) -> str:
    """Make ``text`` safe as (part of) a file name on Windows, macOS and Linux."""
    out = str(text)
    for ch in INVALID_FILENAME_CHARS:
        out = out.replace(ch, "_")
    out = "".join(ch for ch in out if ch.isprintable())
    out = out[:max_chars].strip(" .")
    return out


def prompt_words(prompt: str, max_words: int = MAX_PROMPT_WORDS) -> str:
    words = [w for w in _RE_NONLETTERS.split(prompt or "") if w]
    return " ".join(words[:max_words]) or "no prompt"


def _cap_bytes(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", errors="ignore").rstrip(" .")


def render_pattern(
    pattern: str,
    *,
    number: int,
    seed: int,
    prompt: str,
    date: datetime,
    tokens: Mapping[str, object] | None = None,
) -> str:
    """Fill ``[token]``s: number seed prompt prompt_spaces prompt_words date datetime
    ``datetime<%Y%m%d>`` plus any key of ``tokens`` (model_name, sampler, width...).  Unknown
    tokens stay as written."""
    extra = {str(k).lower(): v for k, v in (tokens or {}).items() if v is not None}

    def value(name: str, arg: str | None) -> object | None:
        builtin: dict[str, Callable[[], object]] = {
            "number": lambda: f"{number:05}",
            "seed": lambda: seed,
            "prompt": lambda: prompt or "no prompt",
            "prompt_spaces": lambda: prompt or "no prompt",
            "prompt_no_styles": lambda: prompt or "no prompt",
            "prompt_words": lambda: prompt_words(prompt),
            "date": lambda: date.strftime("%Y-%m-%d"),
            "datetime": lambda: date.strftime(arg or "%Y%m%d%H%M%S"),
        }
        if name in builtin:
            return builtin[name]()
        return extra.get(name)

    def substitute(match: re.Match[str]) -> str:
        found = value(match.group(1).strip().lower(), match.group(2))
        return match.group(0) if found is None else sanitize_filename_part(found)

    return sanitize_filename_part(_RE_TOKEN.sub(substitute, pattern), max_chars=10_000)


def _stem(pattern: str, number: int, **kwargs: Any) -> str:
    """The file name without extension; the running number always leads it."""
    if pattern.startswith("[number]"):
        rest = pattern[len("[number]"):]
    else:
        rest = "-" + pattern if pattern else ""
    rendered = render_pattern(rest, number=number, **kwargs) if rest else ""
    if rendered and not rendered.startswith(("-", "_", " ", ".")):
        rendered = "-" + rendered
    stem = _cap_bytes(f"{number:05}{rendered}", MAX_STEM_BYTES).rstrip(" .-_")
    return stem


def _leading_number(name: str) -> int | None:
    match = _RE_RESERVATION.match(name) or _RE_LEADING_NUMBER.match(name)
    return int(match.group(1)) if match else None


def _scan(folder: Path, *, clean_stale: bool = False) -> tuple[int, set[int]]:
    """(largest number in use or -1, numbers used by final files)."""
    largest, finals = -1, set()
    now = time.time()
    for entry in os.scandir(folder):
        number = _leading_number(entry.name)
        if number is None:
            continue
        largest = max(largest, number)
        if not entry.name.startswith("."):
            finals.add(number)
        elif clean_stale and entry.name.endswith(TMP_SUFFIX):
            with contextlib.suppress(OSError):  # left behind by a killed process
                if now - entry.stat().st_mtime > STALE_TMP_SECONDS:
                    os.unlink(entry.path)
    return largest, finals


def next_number(folder: Path) -> int:
    """A1111 ``get_next_sequence_number``: largest leading number in ``folder`` + 1 (0 if none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return _scan(folder)[0] + 1


def _reserve(folder: Path) -> tuple[int, Path, int]:
    """Reserve the next free number: returns (number, reservation path, open fd)."""
    _scan(folder, clean_stale=True)
    candidate = -1
    for _ in range(_MAX_ATTEMPTS):
        candidate = max(candidate + 1, _scan(folder)[0] + 1)
        tmp = folder / f".{candidate:05}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except FileExistsError:
            continue
        if candidate in _scan(folder)[1]:  # another saver finished this number meanwhile
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            continue
        return candidate, tmp, fd
    raise OSError(f"could not reserve a file number in {folder} after {_MAX_ATTEMPTS} attempts")


def _safe_dir_name(name: str, what: str) -> str:
    clean = sanitize_filename_part(name)
    if not clean or clean in (".", ".."):
        raise ValueError(f"{what} {name!r} is not usable as a folder name")
    return clean


def output_folder(outdir: Path, mode: str, date: datetime) -> Path:
    return Path(outdir) / _safe_dir_name(mode, "output mode") / date.strftime("%Y-%m-%d")


def save_image(
    image: Image.Image,
    *,
    outdir: Path,
    mode: str,
    infotext: str,
    seed: int,
    prompt: str,
    pattern: str = DEFAULT_PATTERN,
    date: datetime | None = None,
    model_name: str | None = None,
    tokens: Mapping[str, object] | None = None,
    image_format: str = "png",
    quality: int = 95,
) -> Path:
    """Save ``image`` with its infotext under ``outdir/<mode>/<date>/`` and return the final path."""
    fmt = FORMATS.get(image_format.lower().lstrip("."))
    if fmt is None:
        raise ValueError(f"image format {image_format!r} is not supported; use one of: {', '.join(FORMATS)}")
    ext = "jpg" if fmt == "JPEG" else image_format.lower().lstrip(".")
    date = date or datetime.now()
    folder = output_folder(outdir, mode, date)
    folder.mkdir(parents=True, exist_ok=True)
    names = dict(tokens or {})
    if model_name is not None:
        names.setdefault("model_name", model_name)

    number, tmp, fd = _reserve(folder)
    try:
        stem = _stem(pattern, number, seed=seed, prompt=prompt, date=date, tokens=names)
        if stem.split("-", 1)[0].upper() in _WINDOWS_RESERVED:
            stem = "_" + stem
        final = folder / f"{stem}.{ext}"
        with os.fdopen(fd, "wb") as handle:
            fd = -1  # owned by the file object now
            _write(image, handle, fmt, infotext, quality)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return final


def _write(image: Image.Image, handle: Any, fmt: str, infotext: str, quality: int) -> None:
    if fmt == "PNG":
        image.save(handle, format="PNG", pnginfo=png_with_infotext(image, infotext))
        return
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    exif = exif_with_infotext(infotext)
    if fmt == "JPEG" and len(exif) > 65533:  # one APP1 segment; A1111 drops it too
        exif = b""
    image.save(handle, format=fmt, quality=quality, exif=exif)
