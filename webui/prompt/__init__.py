"""The prompt engine: A1111 prompt syntax (``parser``, pure) and prompt -> embeddings (``encode``, torch).

Importing this package does not import torch; ``PromptEncoder`` and ``EncodedPrompt`` are loaded from
``webui.prompt.encode`` on first access.
"""
from __future__ import annotations

from typing import Any

from webui.prompt.parser import (
    BREAK_MARKER,
    ExtraNetworkTag,
    ParsedPrompt,
    entry_at,
    extract_extra_networks,
    extract_lora_tags,
    parse_attention,
    parse_prompt,
    prompt_schedule,
)

__all__ = [
    "BREAK_MARKER",
    "ExtraNetworkTag",
    "ParsedPrompt",
    "PromptEncoder",
    "entry_at",
    "extract_extra_networks",
    "extract_lora_tags",
    "parse_attention",
    "parse_prompt",
    "prompt_schedule",
]


def __getattr__(name: str) -> Any:
    if name == "PromptEncoder":
        from webui.prompt.encode import PromptEncoder

        return PromptEncoder
    raise AttributeError(f"module 'webui.prompt' has no attribute {name!r}")
