"""GGUF headers: tensor names, logical shapes, quant types and metadata of a ``.gguf`` file, never its data.

``read_gguf_header(path)`` memory-maps the file with ``gguf.GGUFReader`` (it only indexes the tensor data)
and returns the same ``SafetensorsHeader`` the safetensors detectors read: shapes in torch order (GGUF stores
them innermost first), ``dtype`` = the GGML type name (``"Q8_0"``, ``"Q4_K"``, ``"F16"``...) and the
string/number metadata (``general.architecture`` ...).  ComfyUI-GGUF's ``comfy.gguf.orig_shape.<name>``
entries (tensors reshaped to fit GGUF's 4 dims) give the logical shape.  A file that is empty, truncated or
not GGUF raises ``BrokenModelFile`` naming the problem.  ``quantization_summary`` names the quantized types.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from webui.models.safetensors_header import BrokenModelFile, SafetensorsHeader, TensorInfo

__all__ = ["GGUF_MAGIC", "GGUF_SUFFIXES", "ORIG_SHAPE_PREFIX", "TEXT_ENCODER_ARCHES", "UNQUANTIZED",
           "gguf_text_encoder", "quantization_summary", "read_gguf_header"]

GGUF_MAGIC = b"GGUF"
GGUF_SUFFIXES = (".gguf",)
UNQUANTIZED = frozenset({"F32", "F16", "BF16", "F64"})  # stored as plain floats: loaded as normal tensors
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
# general.architecture of language-model GGUFs (llama.cpp converters) that DiT users load as text encoders
TEXT_ENCODER_ARCHES = frozenset({"llama", "t5", "t5encoder", "umt5", "qwen2", "qwen2vl", "qwen25vl", "qwen3",
                                 "gemma", "gemma2", "gemma3", "mistral", "mistral3", "phi3", "bert", "clip"})


def _field_value(field: Any) -> str | None:
    """A scalar or string metadata value as text; arrays (tokenizer vocabularies) are skipped."""
    import gguf

    if len(field.types) != 1 or field.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    value = field.contents()
    return value if isinstance(value, str) else json.dumps(value.item() if hasattr(value, "item") else value)


def _orig_shape(reader: Any, name: str) -> tuple[int, ...] | None:
    field = reader.fields.get(ORIG_SHAPE_PREFIX + name)
    if field is None:
        return None
    value = field.contents()
    return tuple(int(d) for d in value) if isinstance(value, list) else None


def _open(path: Path, size: int) -> Any:
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise BrokenModelFile(path, f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}): "
                                    "rename it to its real extension or re-download it")
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, EOFError) as exc:
        raise BrokenModelFile(path, f"the file ({size} bytes) is truncated or corrupted: its GGUF tensor index does "
                                    f"not fit ({type(exc).__name__}: {exc}); re-download it") from None


def read_gguf_header(path: os.PathLike | str) -> SafetensorsHeader:
    """Names, torch-order shapes, GGML types and metadata of ``path`` (no tensor is decoded)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BrokenModelFile(path, f"cannot read the file: {exc.strerror or exc}") from None
    if size == 0:
        raise BrokenModelFile(path, "file is empty (0 bytes); re-download it")
    reader = _open(path, size)
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise BrokenModelFile(path, f"file is truncated: tensor {t.name!r} ends at byte {end} but the file "
                                        f"has {size} bytes; re-download it")
        shape = _orig_shape(reader, t.name) or tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = TensorInfo(t.tensor_type.name, shape)
    metadata = {name: value for name, field in reader.fields.items()
                if not name.startswith(("GGUF.", ORIG_SHAPE_PREFIX)) and (value := _field_value(field)) is not None}
    return SafetensorsHeader(tensors=tensors, metadata=metadata, path=path)


def quantization_summary(tensors: Mapping[str, TensorInfo]) -> str:
    """The quantized GGML types in a file, sorted: ``"Q4_K, Q8_0"`` (empty when nothing is quantized)."""
    return ", ".join(sorted({info.dtype for info in tensors.values()} - UNQUANTIZED))


def gguf_text_encoder(h: SafetensorsHeader) -> str | None:
    """Why a GGUF language model / text encoder cannot be used (``None`` for anything else): by its
    ``general.architecture`` or llama.cpp tensor names (``token_embd.weight``)."""
    arch = h.metadata.get("general.architecture", "")
    if arch.lower() not in TEXT_ENCODER_ARCHES and "token_embd.weight" not in h.tensors:
        return None
    return (f"not supported: GGUF text encoders ({arch or 'llama.cpp layout'}); use the .safetensors text "
            "encoder (clip_l / clip_g / t5xxl_fp16 or t5xxl_fp8) in models/text_encoders")
