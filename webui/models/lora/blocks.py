"""Per-block LoRA weights (A1111 "LoRA Block Weight" extension semantics).

A block-weight vector gives one multiplier per block.  Block ids are the ldm UNet blocks: ``IN00``-``IN11``
(``input_blocks.N``), ``M00`` (``middle_block``), ``OUT00``-``OUT11`` (``output_blocks.N``) plus ``BASE`` for
the text encoder(s).  The vector length picks the layout, as in the extension:

* 17 (SD1/SD2 LoRA): BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03 ... OUT11  (the blocks with attention)
* 26 (SD1/SD2 LyCORIS): BASE, IN00 ... IN11, M00, OUT00 ... OUT11
* 12 (SDXL LoRA): BASE, IN04, IN05, IN07, IN08, M00, OUT00 ... OUT05
* 20 (SDXL LyCORIS): BASE, IN00 ... IN08, M00, OUT00 ... OUT08

Blocks that a short vector does not list get 0 (the extension's ``to26``); UNet layers outside every block
(time embedding, ``conv_out``) keep 1.  A preset name (``ALL``, ``MIDD``, ``OUTD``, ...) stands for the
vector of the model family: ``SD_PRESETS`` are the extension's defaults, ``SDXL_PRESETS`` are ours, built
with the same intent (IN = input side, MID(D) = the deep/low-resolution blocks, OUT = output side).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Sequence

from webui.models.lora.formats import LoraError

__all__ = [
    "BLOCK_LAYOUTS", "BlockWeightError", "SDXL_PRESETS", "SD_PRESETS", "block_multiplier", "resolve_block_weights",
]


class BlockWeightError(LoraError):
    """A block-weight spec that is neither a known preset nor a vector of a known length."""


_IN = tuple(f"IN{i:02d}" for i in range(12))
_OUT = tuple(f"OUT{i:02d}" for i in range(12))
BLOCK_LAYOUTS: Mapping[int, tuple[str, ...]] = MappingProxyType({
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + _OUT[3:],
    26: ("BASE",) + _IN + ("M00",) + _OUT,
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + _OUT[:6],
    20: ("BASE",) + _IN[:9] + ("M00",) + _OUT[:9],
})


def _v(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


SD_PRESETS: Mapping[str, tuple[float, ...]] = MappingProxyType({
    "NONE": _v("0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "ALL": _v("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
    "INS": _v("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "IND": _v("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "INALL": _v("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "MIDD": _v("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    "OUTD": _v("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    "OUTS": _v("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    "OUTALL": _v("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    "ALL0.5": (0.5,) * 17,
})
SDXL_PRESETS: Mapping[str, tuple[float, ...]] = MappingProxyType({
    "NONE": (0.0,) * 12,
    "ALL": (1.0,) * 12,
    "INS": _v("1,1,1,0,0,0,0,0,0,0,0,0"),
    "IND": _v("1,0,0,1,1,0,0,0,0,0,0,0"),
    "INALL": _v("1,1,1,1,1,0,0,0,0,0,0,0"),
    "MIDD": _v("1,0,0,1,1,1,1,1,1,0,0,0"),
    "OUTD": _v("1,0,0,0,0,0,1,1,1,0,0,0"),
    "OUTS": _v("1,0,0,0,0,0,0,0,0,1,1,1"),
    "OUTALL": _v("1,0,0,0,0,0,1,1,1,1,1,1"),
    "ALL0.5": (0.5,) * 12,
})


def resolve_block_weights(spec: str | Sequence[float], *, sdxl: bool) -> Mapping[str, float]:
    """A preset name, ``"1,0,0.5,..."`` text or a sequence of numbers -> ``{block id: multiplier}``.

    Every id of the 26-block layout is present (unlisted blocks are 0)."""
    if isinstance(spec, str):
        text = spec.strip()
        presets = SDXL_PRESETS if sdxl else SD_PRESETS
        if text.upper() in presets:
            values: Sequence[float] = presets[text.upper()]
        else:
            try:
                values = _v(text)
            except ValueError:
                names = ", ".join(presets)
                raise BlockWeightError(
                    f"block weights {spec!r}: not a preset ({names}) nor comma-separated numbers") from None
    else:
        values = tuple(float(x) for x in spec)
    layout = BLOCK_LAYOUTS.get(len(values))
    if layout is None:
        raise BlockWeightError(
            f"block weights have {len(values)} values; use 17 or 26 (SD1/SD2) or 12 or 20 (SDXL)")
    weights = dict.fromkeys(BLOCK_LAYOUTS[26], 0.0)
    weights.update(zip(layout, values))
    return MappingProxyType(weights)


def block_multiplier(weights: Mapping[str, float] | None, block: str | None) -> float:
    """The multiplier of a layer in ``block`` (None = outside every block: 1)."""
    if weights is None or block is None:
        return 1.0
    return weights.get(block, 0.0)
