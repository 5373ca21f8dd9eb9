"""Safetensors headers: the 8-byte length and the JSON header of a file, never its tensor data.

``read_header`` reads the header and validates it against the file size; ``parse_header`` validates a
decoded header object (entries, dtypes, shapes, data offsets and their byte sizes).  ``SafetensorsHeader``
holds keys, dtypes and shapes plus the ``__metadata__`` strings, with sorted-key prefix lookups.
``BrokenModelFile`` is the error for any model file that cannot be used.
"""
from __future__ import annotations

import json
import math
import os
import struct
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

__all__ = [
    "BrokenModelFile", "DTYPE_BYTES", "MAX_HEADER_BYTES", "SAFETENSORS_SUFFIXES", "SafetensorsHeader",
    "TensorInfo", "parse_header", "read_header",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
DTYPE_BYTES = MappingProxyType({
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
})


class BrokenModelFile(ValueError):
    """A model file that cannot be used; ``str()`` names the file, the problem and what to do."""

    def __init__(self, path: os.PathLike | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True, kw_only=True)
class SafetensorsHeader:
    """Keys, dtypes and shapes of a safetensors file plus its ``__metadata__`` strings."""

    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)
    path: Path | None = None
    _sorted: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_sorted", tuple(sorted(self.tensors)))

    def has_prefix(self, prefix: str) -> bool:
        i = bisect_left(self._sorted, prefix)
        return i < len(self._sorted) and self._sorted[i].startswith(prefix)

    def keys_with_prefix(self, prefix: str) -> list[str]:
        i, out = bisect_left(self._sorted, prefix), []
        while i < len(self._sorted) and self._sorted[i].startswith(prefix):
            out.append(self._sorted[i])
            i += 1
        return out

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                    path: Path | None = None) -> "SafetensorsHeader":
        """Build a header from ``{key: (dtype, shape)}`` or ``{key: shape}`` (F32), e.g. a stripped corpus."""
        tensors = {}
        for key, value in shapes.items():
            if isinstance(value, TensorInfo):
                tensors[key] = value
            elif len(value) == 2 and isinstance(value[0], str):
                tensors[key] = TensorInfo(value[0], tuple(value[1]))
            else:
                tensors[key] = TensorInfo("F32", tuple(value))
        return cls(tensors=tensors, metadata=dict(metadata or {}), path=path)


def read_header(path: os.PathLike | str) -> SafetensorsHeader:
    """Read and validate the safetensors header of ``path`` without touching tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BrokenModelFile(path, "file is empty (0 bytes); re-download it")
            if size < 8:
                raise BrokenModelFile(
                    path, f"file is truncated: expected at least 8 bytes, found {size}; re-download it")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise BrokenModelFile(
                    path, f"header length {length} is not sane (limit {MAX_HEADER_BYTES}): "
                    "this is not a safetensors file or it is corrupted; re-download it")
            if 8 + length > size:
                raise BrokenModelFile(
                    path, f"file is truncated: expected at least {8 + length} bytes, found {size}; re-download it")
            raw = f.read(length)
    except OSError as exc:
        raise BrokenModelFile(path, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BrokenModelFile(
            path, f"header is not valid JSON ({exc}): not a safetensors file, or it is corrupted") from None
    return parse_header(obj, path=path, file_size=size, header_length=length)


def parse_header(obj: Any, *, path: Path | None = None, file_size: int | None = None,
                 header_length: int = 0) -> SafetensorsHeader:
    """Validate a decoded header object; with ``file_size``, check the data offsets against it."""
    where = path if path is not None else "<header>"
    if not isinstance(obj, dict):
        raise BrokenModelFile(where, "header is not a JSON object: not a safetensors file")
    raw_meta = obj.get("__metadata__") or {}
    if not isinstance(raw_meta, dict):
        raise BrokenModelFile(where, "header __metadata__ is not an object")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw_meta.items()}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for key, info in obj.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                    and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise BrokenModelFile(where, f"tensor {key!r} has a malformed header entry: {info!r}") from None
        itemsize = DTYPE_BYTES.get(dtype)
        if itemsize is not None and (end - begin) != math.prod(shape) * itemsize:
            raise BrokenModelFile(where, f"tensor {key!r} ({dtype} {list(shape)}) needs "
                                  f"{math.prod(shape) * itemsize} bytes but its offsets span {end - begin}")
        tensors[key] = TensorInfo(dtype, shape)
        data_end = max(data_end, end)
    if file_size is not None and 8 + header_length + data_end > file_size:
        raise BrokenModelFile(where, f"file is truncated: expected {8 + header_length + data_end} bytes, "
                              f"found {file_size}; re-download it")
    return SafetensorsHeader(tensors=tensors, metadata=metadata, path=path)
