"""Prompt -> pipeline kwargs for DiT families (SD3/3.5, Flux.1, Flux Kontext, Qwen-Image, Qwen-Image-Edit).

These models read natural language through T5 / Qwen2.5-VL (plus CLIP for SD3 and Flux); the pipeline's own
``encode_prompt`` is the reference encoding, so we call it rather than re-implementing the encoders.

``DitPromptEncoder.from_pipeline(pipe, arch)`` has the SD encoder's interface for the runner:
``encode_schedule(prompt, negative, steps, clip_skip) -> [(steps - 1, kwargs)]`` (one entry: no prompt editing).

A1111 syntax is cleaned first (``clean_prompt``, pure): ``<lora:...>`` and other extra-network tags are removed
(LoRAs are applied from the tags by the model manager), attention weights ``(word:1.2)`` / ``[word]`` and
``BREAK`` are dropped with a note, and scheduled prompts ``[a:b:5]`` / ``[a|b]`` keep their first prompt, with a
note.  ``prompt_notes(arch, prompt, negative, steps)`` gives those notes for the job's warnings.

Per family (``FAMILY_TEXT``):
* Flux (dev, schnell, Kontext): CLIP-L pooled + T5 sequence; no negative prompt (guidance is distilled into the
  model), so a negative prompt is ignored with a note.
* Chroma (a Flux derivative, ``Arch.FLUX`` with its own pipeline, ``PIPELINE_TEXT``): T5 only, with the T5
  attention mask (the pipeline masks all padding but the first token), real CFG with the negative prompt.
* SD3 / 3.5: CLIP-L + CLIP-G + T5, real classifier-free guidance with the negative prompt.  A1111 "Clip skip" N
  maps to diffusers ``clip_skip = N - 1`` (1 = the model's default penultimate layer).
* Qwen-Image: Qwen2.5-VL sequence + mask, true CFG with the negative prompt (" " when empty, as Qwen does).
* Qwen-Image-Edit: the text encoder sees the reference images together with the prompt, so the prompt cannot be
  encoded without them: the kwargs are the cleaned texts (``prompt`` / ``negative_prompt``) and the pipeline
  encodes them with the images.
Worker thread only (the encoders run here).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch

from webui.prompt.parser import BREAK_MARKER, extract_extra_networks, parse_attention, prompt_schedule
from webui.types import Arch

__all__ = ["DIT_ARCHES", "DitPromptEncoder", "FamilyText", "clean_prompt", "prompt_notes"]

DIT_ARCHES = frozenset({Arch.SD3, Arch.FLUX, Arch.QWEN_IMAGE})


@dataclass(frozen=True)
class FamilyText:
    """What a family's text conditioning supports."""

    label: str
    negative: bool  # the negative prompt is used (real / true CFG)
    max_sequence_length: int


FAMILY_TEXT: Mapping[Arch, FamilyText] = MappingProxyType({
    Arch.FLUX: FamilyText("Flux", negative=False, max_sequence_length=512),
    Arch.SD3: FamilyText("SD3", negative=True, max_sequence_length=256),
    Arch.QWEN_IMAGE: FamilyText("Qwen-Image", negative=True, max_sequence_length=1024),
})
CHROMA_TEXT = FamilyText("Chroma", negative=True, max_sequence_length=512)
# families that share an Arch with others but have their own pipeline (diffusers class name)
PIPELINE_TEXT: Mapping[str, FamilyText] = MappingProxyType({"ChromaPipeline": CHROMA_TEXT,
                                                            "ChromaImg2ImgPipeline": CHROMA_TEXT})


def _family(arch: Arch | str, pipeline: str = "") -> FamilyText:
    if pipeline in PIPELINE_TEXT:
        return PIPELINE_TEXT[pipeline]
    try:
        return FAMILY_TEXT[Arch(arch)]
    except (KeyError, ValueError):
        raise ValueError(f"no DiT prompt encoder for architecture {arch!r}; "
                         f"known: {', '.join(a.value for a in FAMILY_TEXT)}") from None


def clean_prompt(text: str, steps: int = 20, *, label: str = "this model") -> tuple[str, list[str]]:
    """A1111 prompt -> plain text for a T5 / Qwen text encoder, plus notes about what was dropped."""
    notes: list[str] = []
    rest, _tags = extract_extra_networks(text)
    schedule = prompt_schedule(rest, max(int(steps), 1))
    if len(schedule) > 1:
        notes.append(f"prompt editing / alternation ([a:b:N], [a|b]) is not supported for {label}: "
                     "the prompt of the first step is used for all steps")
    first = schedule[0][1]
    fragments = parse_attention(first)
    if any(frag == BREAK_MARKER for frag in fragments):
        notes.append(f"BREAK is not supported for {label}: it was removed")
    if any(weight != 1.0 for frag, weight in fragments if frag != BREAK_MARKER):
        notes.append(f"attention weights like (word:1.2) or [word] are not supported for {label}: "
                     "the words are kept, the weights are ignored")
    plain = " ".join(t.strip() for t, w in fragments if (t, w) != BREAK_MARKER and t.strip())
    return " ".join(plain.split()), notes


def prompt_notes(arch: Arch | str, prompt: str, negative: str = "", steps: int = 20, pipeline: str = "") -> list[str]:
    """Warnings for a job's prompts on a DiT family (``pipeline``: the diffusers class, for Chroma)."""
    family = _family(arch, pipeline)
    notes = list(clean_prompt(prompt, steps, label=family.label)[1])
    if negative.strip():
        if not family.negative:
            notes.append(f"{family.label} does not use a negative prompt (its guidance is distilled): "
                         "the negative prompt is ignored")
        else:
            notes += [f"negative prompt: {n}" for n in clean_prompt(negative, steps, label=family.label)[1]]
    return list(dict.fromkeys(notes))


def _device(pipe: Any) -> torch.device:
    device = getattr(pipe, "_execution_device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


class DitPromptEncoder:
    """``encode_schedule`` for one DiT pipeline (see the module docstring)."""

    def __init__(self, pipe: Any, arch: Arch | str, *, text_only: bool | None = None):
        self.pipe = pipe
        self.arch = Arch(arch)
        self.family = _family(self.arch, type(pipe).__name__)
        if text_only is None:  # Qwen-Image-Edit: the prompt is encoded together with the reference images
            text_only = type(pipe).__name__.startswith("QwenImageEdit")
        self.text_only = text_only

    @classmethod
    def from_pipeline(cls, pipe: Any, arch: Arch | str | None = None, **options: Any) -> "DitPromptEncoder":
        if arch is None:
            name = type(pipe).__name__
            arch = (Arch.FLUX if name.startswith(("Flux", "Chroma")) else
                    Arch.QWEN_IMAGE if name.startswith("Qwen") else Arch.SD3)
        return cls(pipe, arch, **options)

    def token_count(self, text: str) -> tuple[int, int]:
        """(tokens used, limit) of the main (T5 / Qwen) tokenizer, for the UI counter."""
        tokenizer = getattr(self.pipe, "tokenizer_3", None) or getattr(self.pipe, "tokenizer_2", None) \
            or self.pipe.tokenizer
        plain, _ = clean_prompt(text, label=self.family.label)
        ids = tokenizer(plain, add_special_tokens=False)["input_ids"]
        return len(ids), self.family.max_sequence_length

    def encode(self, prompt: str, negative: str = "", clip_skip: int = 1) -> dict[str, Any]:
        """Pipeline kwargs for plain (already cleaned) texts."""
        if self.text_only:
            return {"prompt": prompt, "negative_prompt": negative or " "}
        with torch.no_grad():
            if self.family is CHROMA_TEXT:
                return self._chroma(prompt, negative)
            if self.arch is Arch.FLUX:
                return self._flux(prompt)
            if self.arch is Arch.SD3:
                return self._sd3(prompt, negative, clip_skip)
            return self._qwen(prompt, negative)

    def encode_schedule(self, prompt: str, negative: str = "", steps: int = 20, clip_skip: int = 1,
                        **_unused: Any) -> list[tuple[int, dict[str, Any]]]:
        """``[(steps - 1, kwargs)]``: DiT pipelines take one conditioning for the whole run."""
        text, _ = clean_prompt(prompt, steps, label=self.family.label)
        neg, _ = clean_prompt(negative, steps, label=self.family.label) if self.family.negative else ("", [])
        return [(max(int(steps), 1) - 1, self.encode(text, neg, clip_skip))]

    # ------------------------------------------------------------------ families
    def _flux(self, prompt: str) -> dict[str, Any]:
        pipe = self.pipe
        transformer = getattr(pipe, "transformer", None)
        distilled = bool(getattr(getattr(transformer, "config", None), "guidance_embeds", True))
        embeds, pooled, _ids = pipe.encode_prompt(prompt=prompt, prompt_2=prompt, device=_device(pipe),
                                                  num_images_per_prompt=1,
                                                  max_sequence_length=512 if distilled else 256)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _chroma(self, prompt: str, negative: str) -> dict[str, Any]:
        embeds, _ids, mask, neg, _neg_ids, neg_mask = self.pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative, device=_device(self.pipe), num_images_per_prompt=1,
            do_classifier_free_guidance=True, max_sequence_length=self.family.max_sequence_length)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_prompt_embeds": neg,
                "negative_prompt_attention_mask": neg_mask}

    def _sd3(self, prompt: str, negative: str, clip_skip: int) -> dict[str, Any]:
        pipe = self.pipe
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=_device(pipe), num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative,
            clip_skip=clip_skip - 1 if clip_skip > 1 else None,
            max_sequence_length=self.family.max_sequence_length)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": neg, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": neg_pooled}

    def _qwen(self, prompt: str, negative: str) -> dict[str, Any]:
        pipe, device = self.pipe, _device(self.pipe)
        out: dict[str, Any] = {}
        for prefix, text in (("", prompt), ("negative_", negative or " ")):
            embeds, mask = pipe.encode_prompt(prompt=text, device=device, num_images_per_prompt=1,
                                              max_sequence_length=self.family.max_sequence_length)
            out[f"{prefix}prompt_embeds"] = embeds
            # None means "all tokens valid": pass that explicitly (the pipeline warns about a missing mask)
            out[f"{prefix}prompt_embeds_mask"] = mask if mask is not None else torch.ones(
                embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return out
