"""Textual-inversion embeddings from ``models/embeddings``, used in prompts by file name.

Formats (``parse_embedding``):
* A1111 ``.pt``: ``{"string_to_param": {"*": [n, width]}, "name": ...}`` -- read with
  ``torch.load(weights_only=True)`` (no code runs), whatever the ``--allow-pickle`` setting;
* A1111/kohya safetensors: ``emb_params`` ``[n, width]``;
* SDXL: ``clip_l`` ``[n, 768]`` + ``clip_g`` ``[n, 1280]``;
* diffusers ``learned_embeds``: one tensor under the token name.

``EmbeddingLoader.sync(components, records)`` runs on the worker thread from ``ModelManager.ensure``: each
embedding file is added once per loaded text encoder (tokens = file stem, multi-vector ones as
``name name_1 ...`` through diffusers' ``load_textual_inversion`` / ``maybe_convert_prompt``).  Files whose
vector width does not fit the model's text encoder(s) are skipped with a reason; ``prompt_warnings``
names those the prompt actually uses, for the job's info.
"""
from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

__all__ = ["EmbeddingError", "EmbeddingLoader", "EmbeddingState", "ParsedEmbedding", "parse_embedding",
           "parse_embedding_state_dict", "prompt_warnings"]

log = logging.getLogger(__name__)
_WIDTH_NAMES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL (clip_g)"}


class EmbeddingError(ValueError):
    """An embedding file that cannot be read or does not fit the model; the message says which and why."""


@dataclass(frozen=True)
class ParsedEmbedding:
    name: str
    vectors: Mapping[str, torch.Tensor]  # "single" -> [n, width]  or  "clip_l"/"clip_g" -> [n, width]

    @property
    def is_xl(self) -> bool:
        return "clip_l" in self.vectors

    def describe(self) -> str:
        if self.is_xl:
            return f"SDXL (clip_l {self.vectors['clip_l'].shape[-1]} + clip_g {self.vectors['clip_g'].shape[-1]})"
        width = self.vectors["single"].shape[-1]
        return f"{_WIDTH_NAMES.get(width, 'width')} ({width})" if width in _WIDTH_NAMES else f"width {width}"


def _matrix(tensor: Any, label: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2) or not tensor.is_floating_point():
        raise EmbeddingError(f"{label}: expected a [vectors, width] float tensor, got "
                             f"{getattr(tensor, 'shape', type(tensor).__name__)}")
    return (tensor.unsqueeze(0) if tensor.ndim == 1 else tensor).detach().to(torch.float32)


def parse_embedding_state_dict(state: Mapping[str, Any], name: str) -> ParsedEmbedding:
    """A loaded state dict (any format above) -> ``ParsedEmbedding``; raises ``EmbeddingError``."""
    if "clip_l" in state or "clip_g" in state:
        if not ("clip_l" in state and "clip_g" in state):
            raise EmbeddingError(f"embedding {name}: SDXL embedding needs both clip_l and clip_g")
        vl, vg = _matrix(state["clip_l"], f"{name} clip_l"), _matrix(state["clip_g"], f"{name} clip_g")
        if vl.shape[0] != vg.shape[0]:
            raise EmbeddingError(f"embedding {name}: {vl.shape[0]} clip_l vectors but {vg.shape[0]} clip_g vectors")
        return ParsedEmbedding(name, {"clip_l": vl, "clip_g": vg})
    if "emb_params" in state:
        return ParsedEmbedding(name, {"single": _matrix(state["emb_params"], name)})
    params = state.get("string_to_param")
    if isinstance(params, Mapping) and params:
        return ParsedEmbedding(name, {"single": _matrix(params.get("*", next(iter(params.values()))), name)})
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    if len(state) == 1 and len(tensors) == 1:
        return ParsedEmbedding(name, {"single": _matrix(tensors[0], name)})
    raise EmbeddingError(f"embedding {name}: not a textual-inversion file (keys: {', '.join(list(state)[:5])})")


def parse_embedding(path: str | Path) -> ParsedEmbedding:
    """Read an embedding file (safetensors, or ``.pt``/``.bin`` with ``weights_only=True``)."""
    path = Path(path)
    name = path.stem
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / corrupt / not a weights-only pickle
        raise EmbeddingError(f"embedding {path.name}: cannot be read ({exc.__class__.__name__}: "
                             f"{str(exc)[:160]}); re-download it") from None
    if not isinstance(state, Mapping):
        if isinstance(state, torch.Tensor):
            state = {name: state}
        else:
            raise EmbeddingError(f"embedding {path.name}: does not contain a state dict")
    return parse_embedding_state_dict(state, name)


def _width(encoder: Any) -> int:
    return int(encoder.get_input_embeddings().weight.shape[-1])


@dataclass
class EmbeddingState:
    """What one loaded text encoder has: files added (by file key) and files skipped (name -> reason)."""

    loaded: dict[tuple, str] = field(default_factory=dict)  # (path, size, mtime) -> token
    skipped: dict[str, str] = field(default_factory=dict)
    failed_keys: set = field(default_factory=set)

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(sorted(self.loaded.values()))


class EmbeddingLoader:
    """Adds embeddings to loaded models, once per (text encoder, embedding file).  Worker thread only."""

    def __init__(self) -> None:
        self._states: "weakref.WeakKeyDictionary[Any, EmbeddingState]" = weakref.WeakKeyDictionary()

    def state(self, components: Any) -> EmbeddingState:
        anchor = components.text_encoder if components.text_encoder is not None else components.text_encoder_2
        state = self._states.get(anchor)
        if state is None:
            state = self._states[anchor] = EmbeddingState()
        return state

    def sync(self, pipe: Any, components: Any, records: Sequence[Any]) -> EmbeddingState:
        """Add every embedding of ``records`` (catalog records) that ``components`` does not have yet."""
        state = self.state(components)
        for record in records:
            key = (str(record.path), record.size, record.mtime)
            if key in state.loaded or key in state.failed_keys:
                continue
            name = Path(record.path).stem
            try:
                if record.error and record.format != "pickle":  # pickles are read with weights_only below
                    raise EmbeddingError(f"embedding {record.filename}: {record.error}")
                token = self._add(pipe, components, parse_embedding(record.path))
            except (EmbeddingError, ValueError, RuntimeError) as exc:
                state.failed_keys.add(key)
                state.skipped[name] = str(exc)
                log.warning("%s", exc)
                continue
            state.loaded[key] = token
            state.skipped.pop(name, None)
        return state

    def _add(self, pipe: Any, components: Any, emb: ParsedEmbedding) -> str:
        te1, te2 = components.text_encoder, components.text_encoder_2
        tok1, tok2 = components.tokenizer, components.tokenizer_2
        pairs: list[tuple[torch.Tensor, Any, Any]]
        if te1 is not None and te2 is not None:  # SDXL base
            if not emb.is_xl:
                raise EmbeddingError(f"embedding {emb.name} is {emb.describe()}, the loaded model is SDXL "
                                     f"(needs clip_l + clip_g): skipped")
            pairs = [(emb.vectors["clip_l"], tok1, te1), (emb.vectors["clip_g"], tok2, te2)]
        elif te2 is not None:  # refiner: OpenCLIP bigG only
            if not emb.is_xl:
                raise EmbeddingError(f"embedding {emb.name} is {emb.describe()}, the loaded model is an SDXL "
                                     f"refiner: skipped")
            pairs = [(emb.vectors["clip_g"], tok2, te2)]
        else:
            if emb.is_xl:
                raise EmbeddingError(f"embedding {emb.name} is {emb.describe()}, the loaded model has one text "
                                     f"encoder of width {_width(te1)}: skipped")
            pairs = [(emb.vectors["single"], tok1, te1)]
        for vectors, tok, te in pairs:
            if vectors.shape[-1] != _width(te):
                raise EmbeddingError(f"embedding {emb.name} is {emb.describe()} but the model's text encoder has "
                                     f"width {_width(te)}: made for another model, skipped")
        if not re.fullmatch(r"[^\s<>:]+", emb.name):
            raise EmbeddingError(f"embedding {emb.name!r}: rename the file without spaces or <>: to use it")
        if emb.name in pairs[0][1].get_vocab():
            raise EmbeddingError(f"embedding {emb.name}: the name is already a token; rename the file")
        for vectors, tok, te in pairs:
            pipe.load_textual_inversion(vectors.to(te.dtype), token=emb.name, tokenizer=tok, text_encoder=te)
        return emb.name


_WORD = r"(?<![\w-]){}(?![\w-])"


def prompt_warnings(state: EmbeddingState | None, *texts: str) -> tuple[str, ...]:
    """Reasons for skipped embeddings whose names appear in ``texts`` (prompt, negative prompt)."""
    if state is None or not state.skipped:
        return ()
    joined = "\n".join(texts)
    return tuple(reason for name, reason in sorted(state.skipped.items())
                 if re.search(_WORD.format(re.escape(name)), joined))
