"""Prompt -> embeddings, A1111 style, for SD1, SD2, SDXL and the SDXL refiner (worker thread only).

``PromptEncoder(arch=..., tokenizers=..., text_encoders=...)`` or ``PromptEncoder.from_pipeline(pipe)``:

``encode(prompt, negative="", clip_skip=1) -> dict``
    Pipeline kwargs ``prompt_embeds``/``negative_prompt_embeds`` (+ ``pooled_prompt_embeds``/
    ``negative_pooled_prompt_embeds`` for SDXL), both ``(1, 77 * chunks, C)``.  Texts must be plain,
    already scheduled prompts (see ``webui.prompt.parser``); weights and ``BREAK`` are applied here.
``encode_schedule(prompt, negative, steps, clip_skip=1, *, hires_steps=None, legacy=False)``
    ``[(end_step, kwargs), ...]`` over the union of both prompts' schedules (extra-network tags are
    removed first); each distinct text is encoded once, consecutive identical entries are merged, and
    every entry has the same number of chunks so a runner can swap tensors between steps.
    Pick the entry for 0-based sampler step ``i`` with ``webui.prompt.parser.entry_at``.
``tokenize(text)`` / ``token_count(text)``: chunks per text encoder, and A1111's "used/limit" counter.

What it does, per text encoder (A1111 ``sd_hijack_clip``):
* ``parse_attention`` splits the text into weighted fragments, each tokenized on its own;
* tokens fill 75-token chunks; when a chunk is full and a comma lies within its last 20 tokens the
  text after that comma moves to the next chunk; ``BREAK`` starts a new chunk;
* a chunk is ``BOS + tokens + EOS`` padded to 77 with the tokenizer's pad token (SD1 and SDXL's
  CLIP-L: EOS; SD2 and SDXL's OpenCLIP-G tokenizer_2: "!" = id 0);
* each chunk is encoded, then weighted: ``z * w`` per token, then scaled so the chunk's mean equals
  the unweighted mean (A1111 "Original" emphasis; also "No norm", "Ignore", "None").  The mean is
  taken per chunk of each text; A1111 takes it over the batch of one prompt's schedule texts, so
  weighted *scheduled* prompts can differ slightly from A1111 (plain prompts match);
* chunks are concatenated along the sequence; a shorter prompt or negative is padded with
  encodings of the empty prompt (A1111's ``pad_cond_uncond``; A1111's default instead runs cond and
  uncond through the UNet separately when their lengths differ, which diffusers cannot do).

Layers (``clip_skip`` is A1111's "Clip skip", 1 = last layer):
* SD1 and SD2: ``clip_skip == 1`` -> ``last_hidden_state`` (through the final layer norm);
  ``N > 1`` -> ``final_layer_norm(hidden_states[-N])``.  diffusers' SD2 text encoder config has 23 of
  OpenCLIP-H's 24 layers, so its last layer already is the penultimate layer that SD2 (and A1111)
  uses.  A1111 ignores clip skip for SD2; we apply it like Forge does.
* SDXL (both encoders) and the refiner: ``hidden_states[-max(N, 2)]`` without the final layer norm,
  so clip skip 1 and 2 are both the native penultimate layer and 3 goes one deeper (Forge's rule;
  A1111 ignores clip skip for SDXL by default).  The pooled embedding is ``text_embeds`` of the
  projection encoder for the first chunk, as in A1111 and diffusers.
* Clip skip larger than the layer count selects the token embeddings.

SDXL empty negative prompt: A1111 (``sd_models_xl.get_learned_conditioning``) passes zeros, not the
encoding of "", for both the sequence and the pooled vector when every negative text is empty; so
does diffusers when ``negative_prompt`` is None.  ``zero_empty_negative=False`` encodes "" instead.

Textual inversion: embeddings loaded with diffusers' ``load_textual_inversion`` are new tokenizer
tokens, so they work as they are; ``from_pipeline`` passes ``pipe.maybe_convert_prompt`` to expand
multi-vector embeddings.  Results are not cached between calls (a LoRA may change the encoders).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from webui.prompt.parser import BREAK_MARKER, entry_at, parse_attention, parse_prompt
from webui.types import Arch

__all__ = ["Chunk", "EMPHASIS_MODES", "PromptEncoder"]

CHUNK_TOKENS = 75
_CHUNK_LEN = CHUNK_TOKENS + 2
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
_BATCH_ROWS = 8


@dataclass(frozen=True)
class Chunk:
    """One 77-token window: ``tokens`` incl. BOS/EOS/padding and one weight per token."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class _Side:
    tokenizer: Any
    encoder: Any
    bos: int
    eos: int
    pad: int
    comma: int | None


@dataclass(frozen=True)
class _Cond:
    embeds: torch.Tensor  # (chunks * 77, C), or (1, chunks * 77, C) once bundled
    pooled: torch.Tensor | None  # (C2,) for SDXL, (1, C2) once bundled


def _final_layer_norm(encoder: Any) -> Any:
    return getattr(encoder, "text_model", encoder).final_layer_norm


def _has_added_tokens(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` has tokens beyond its specials (textual inversion embeddings)."""
    special = set(tokenizer.all_special_tokens)
    return any(token not in special for token in tokenizer.added_tokens_encoder)


def _execution_device(module: Any) -> torch.device:
    try:
        from diffusers.utils.torch_utils import get_module_execution_device

        return get_module_execution_device(module)
    except (ImportError, StopIteration):
        return next(module.parameters()).device


class PromptEncoder:
    """Weighted, chunked prompt encoding for one pipeline's tokenizer(s) and text encoder(s)."""

    def __init__(
        self,
        *,
        arch: Arch,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[Any],
        emphasis: str = "Original",
        comma_backtrack: int = 20,
        zero_empty_negative: bool = True,
        convert_text: Callable[[str, Any], str] | None = None,
    ) -> None:
        expected = {Arch.SD1: 1, Arch.SD2: 1, Arch.SDXL: 2, Arch.SDXL_REFINER: 1}
        if arch not in expected:
            raise ValueError(f"prompt encoding is not available for architecture {arch!r}")
        if len(tokenizers) != expected[arch] or len(text_encoders) != expected[arch]:
            raise ValueError(f"{arch.value} needs {expected[arch]} tokenizer(s) and text encoder(s)")
        if emphasis not in EMPHASIS_MODES:
            raise ValueError(f"emphasis {emphasis!r} is not one of {', '.join(EMPHASIS_MODES)}")
        self.arch = arch
        self.emphasis = emphasis
        self.comma_backtrack = comma_backtrack
        self.zero_empty_negative = zero_empty_negative
        self.convert_text = convert_text
        self.sides = tuple(
            _Side(
                tokenizer=tok,
                encoder=enc,
                bos=tok.bos_token_id,
                eos=tok.eos_token_id,
                pad=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                comma=tok.get_vocab().get(",</w>"),
            )
            for tok, enc in zip(tokenizers, text_encoders)
        )

    @classmethod
    def from_pipeline(cls, pipe: Any, arch: Arch | None = None, **options: Any) -> "PromptEncoder":
        """Use ``pipe``'s tokenizer(s) and text encoder(s); ``arch`` is guessed when not given."""
        te1, te2 = getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)
        if arch is None:
            if te2 is not None:
                arch = Arch.SDXL if te1 is not None else Arch.SDXL_REFINER
            else:
                arch = Arch.SD2 if te1.config.hidden_size == 1024 else Arch.SD1
        if arch is Arch.SDXL:
            toks, encs = (pipe.tokenizer, pipe.tokenizer_2), (te1, te2)
        elif arch is Arch.SDXL_REFINER:
            toks, encs = (pipe.tokenizer_2,), (te2,)
        else:
            toks, encs = (pipe.tokenizer,), (te1,)
        if any(t is None for t in (*toks, *encs)):
            raise ValueError(f"pipeline {type(pipe).__name__} lacks a tokenizer or text encoder for {arch.value}")
        options.setdefault("convert_text", getattr(pipe, "maybe_convert_prompt", None))
        return cls(arch=arch, tokenizers=toks, text_encoders=encs, **options)

    @property
    def is_xl(self) -> bool:
        return self.arch in (Arch.SDXL, Arch.SDXL_REFINER)

    # ------------------------------------------------------------------ tokens
    def _fragments(self, text: str) -> list[tuple[str, float]]:
        return parse_attention(text) if self.emphasis != "None" else [(text, 1.0)]

    def _chunks(self, side: _Side, text: str) -> tuple[list[Chunk], int]:
        fragments = self._fragments(text)
        plain = [frag for frag, _ in fragments]
        if self.convert_text is not None and _has_added_tokens(side.tokenizer):
            plain = [self.convert_text(frag, side.tokenizer) for frag in plain]
        ids = side.tokenizer(plain, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]
        chunks: list[Chunk] = []
        tokens: list[int] = []
        weights: list[float] = []
        last_comma = -1
        count = 0

        def close(final: bool = False) -> None:
            nonlocal tokens, weights, last_comma, count
            count += len(tokens) if final else CHUNK_TOKENS
            fill = CHUNK_TOKENS - len(tokens)
            chunks.append(
                Chunk(
                    tokens=(side.bos, *tokens, side.eos, *[side.pad] * fill),
                    weights=(1.0, *weights, 1.0, *[1.0] * fill),
                )
            )
            tokens, weights, last_comma = [], [], -1

        for token_ids, fragment in zip(ids, fragments):
            if fragment == BREAK_MARKER:
                close()
                continue
            weight = fragment[1] if self.emphasis != "Ignore" else 1.0
            for token in token_ids:
                if token == side.comma:
                    last_comma = len(tokens)
                elif (
                    self.comma_backtrack
                    and len(tokens) == CHUNK_TOKENS
                    and last_comma != -1
                    and CHUNK_TOKENS - last_comma <= self.comma_backtrack
                ):
                    moved_tokens, moved_weights = tokens[last_comma + 1 :], weights[last_comma + 1 :]
                    tokens, weights = tokens[: last_comma + 1], weights[: last_comma + 1]
                    close()
                    tokens, weights = moved_tokens, moved_weights
                if len(tokens) == CHUNK_TOKENS:
                    close()
                tokens.append(token)
                weights.append(weight)
        if tokens or not chunks:
            close(final=True)
        return chunks, count

    def tokenize(self, text: str) -> list[list[Chunk]]:
        """The chunks of a plain prompt text, one list per text encoder."""
        return [self._chunks(side, text)[0] for side in self.sides]

    def token_count(self, text: str) -> tuple[int, int]:
        """A1111's counter: ``(tokens used, limit)`` with the limit a multiple of 75."""
        used = self._chunks(self.sides[0], text)[1]
        return used, math.ceil(max(used, 1) / CHUNK_TOKENS) * CHUNK_TOKENS

    # ------------------------------------------------------------------ tensors
    def _layer(self, side: _Side, output: Any, clip_skip: int) -> torch.Tensor:
        hidden = output.hidden_states
        if self.is_xl:
            return hidden[-min(max(clip_skip, 2), len(hidden))]
        if clip_skip <= 1:
            return output.last_hidden_state
        return _final_layer_norm(side.encoder)(hidden[-min(clip_skip, len(hidden))])

    def _emphasize(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.emphasis in ("Ignore", "None") or bool((weights == 1.0).all()):
            return z
        dtype = z.dtype
        z = z.float()
        weighted = z * weights.unsqueeze(-1)
        if self.emphasis == "Original":
            weighted = weighted * (z.mean() / weighted.mean())
        return weighted.to(dtype)

    def _encode_side(self, side: _Side, chunks: list[Chunk], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = _execution_device(side.encoder)
        parts, pooled = [], None
        for start in range(0, len(chunks), _BATCH_ROWS):
            batch = chunks[start : start + _BATCH_ROWS]
            ids = torch.tensor([c.tokens for c in batch], dtype=torch.long, device=device)
            output = side.encoder(input_ids=ids, output_hidden_states=True)
            z = self._layer(side, output, clip_skip)
            weights = torch.tensor([c.weights for c in batch], dtype=torch.float32, device=z.device)
            parts.extend(self._emphasize(z[i : i + 1], weights[i : i + 1])[0] for i in range(len(batch)))
            if pooled is None and getattr(output, "text_embeds", None) is not None:
                pooled = output.text_embeds[0]
        return torch.cat(parts, dim=0), pooled

    def _encode_text(self, text: str, clip_skip: int) -> _Cond:
        per_side = [self._chunks(side, text)[0] for side in self.sides]
        chunk_count = max(len(c) for c in per_side)
        embeds, pooled = [], None
        for side, chunks in zip(self.sides, per_side):
            empty = self._chunks(side, "")[0][0]
            z, side_pooled = self._encode_side(side, chunks + [empty] * (chunk_count - len(chunks)), clip_skip)
            embeds.append(z)
            pooled = side_pooled if side_pooled is not None else pooled
        device = embeds[0].device
        return _Cond(torch.cat([e.to(device) for e in embeds], dim=-1), pooled)

    def _bundle(self, texts: Sequence[str], clip_skip: int) -> dict[str, _Cond]:
        """Encode each distinct text once; pad all to the longest with empty-prompt chunks."""
        with torch.no_grad():
            conds = {text: self._encode_text(text, clip_skip) for text in dict.fromkeys(texts)}
            chunks = max(c.embeds.shape[0] for c in conds.values()) // _CHUNK_LEN
            empty = None
            result = {}
            for text, cond in conds.items():
                embeds, missing = cond.embeds, chunks - cond.embeds.shape[0] // _CHUNK_LEN
                if missing:
                    if empty is None:
                        empty = (conds[""] if "" in conds else self._encode_text("", clip_skip)).embeds[:_CHUNK_LEN]
                    embeds = torch.cat([embeds, *[empty] * missing], dim=0)
                pooled = cond.pooled.unsqueeze(0) if cond.pooled is not None else None
                result[text] = _Cond(embeds.unsqueeze(0), pooled)
        return result

    @staticmethod
    def _zeros(cond: _Cond) -> _Cond:
        pooled = torch.zeros_like(cond.pooled) if cond.pooled is not None else None
        return _Cond(torch.zeros_like(cond.embeds), pooled)

    def _kwargs(self, pos: _Cond, neg: _Cond) -> dict[str, torch.Tensor]:
        out = {"prompt_embeds": pos.embeds, "negative_prompt_embeds": neg.embeds}
        if self.is_xl:
            out["pooled_prompt_embeds"] = pos.pooled
            out["negative_pooled_prompt_embeds"] = neg.pooled
        return out

    # ------------------------------------------------------------------ public
    def encode(self, prompt: str, negative: str = "", clip_skip: int = 1) -> dict[str, torch.Tensor]:
        """Pipeline kwargs for one plain (already scheduled) prompt and negative prompt."""
        conds = self._bundle([prompt, negative], clip_skip)
        zero = self.is_xl and self.zero_empty_negative and negative == ""
        return self._kwargs(conds[prompt], self._zeros(conds[negative]) if zero else conds[negative])

    def encode_schedule(
        self,
        prompt: str,
        negative: str = "",
        steps: int = 20,
        clip_skip: int = 1,
        *,
        hires_steps: int | None = None,
        legacy: bool = False,
    ) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """``[(end_step, kwargs), ...]`` for raw prompts with A1111 editing/alternation syntax."""
        pos = parse_prompt(prompt, steps, hires_steps=hires_steps, legacy=legacy).schedule
        neg = parse_prompt(negative, steps, hires_steps=hires_steps, legacy=legacy).schedule
        ends = sorted({end for end, _ in pos} | {end for end, _ in neg})
        pairs: list[tuple[int, str, str]] = []
        for end in ends:
            pair = (entry_at(pos, end), entry_at(neg, end))
            if pairs and pairs[-1][1:] == pair:
                pairs[-1] = (end, *pair)
            else:
                pairs.append((end, *pair))
        conds = self._bundle([t for _, p, n in pairs for t in (p, n)], clip_skip)
        negatives = {n: conds[n] for _, _, n in pairs}
        if self.is_xl and self.zero_empty_negative and set(negatives) == {""}:
            negatives = {"": self._zeros(conds[""])}
        cache: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        result = []
        for end, p, n in pairs:
            if (p, n) not in cache:
                cache[(p, n)] = self._kwargs(conds[p], negatives[n])
            result.append((end, cache[(p, n)]))
        return result
