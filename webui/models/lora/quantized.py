"""LoRA on GGUF-quantized layers (``GGUFLinear`` of a Flux / SD3 ``.gguf`` transformer).

The patcher cannot merge into quantized bytes, and re-quantizing would change the weights the user picked.
So while a LoRA touches such a layer, the layer holds a *dense* merged weight ``dequantized + sum(deltas)``
in the layer's compute dtype (``GGUFLinear`` uses a plain weight as it is); the original ``GGUFParameter``
object is kept aside untouched -- it is never written to, so it needs no copy -- and goes back into the layer
on restore, so restore is exact (the very same bytes object).  Cost: each patched layer holds a dense weight
while the LoRA is active (a LoRA on every linear layer of Flux makes the transformer as large as bf16 again
until it is removed).  Used by ``LoraPatcher`` for parameters where ``is_quantized`` is true.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from webui.models.dit.gguf_loader import dequantize, is_quantized, logical_shape

__all__ = ["is_quantized", "logical_shape", "merge", "restore"]


def merge(module: nn.Module, name: str, pristine: torch.Tensor,
          deltas: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Give ``module.<name>`` the dense weight ``dequantize(pristine) + deltas(that)`` (float32 maths, stored in
    the layer's compute dtype, on the device the layer's current weight is on)."""
    device = getattr(module, name).device
    with torch.no_grad():
        orig = dequantize(pristine).to(device, torch.float32)
        merged = orig + deltas(orig)
    dtype = getattr(module, "compute_dtype", None) or torch.float32
    setattr(module, name, nn.Parameter(merged.to(dtype), requires_grad=False))


def restore(module: nn.Module, name: str, pristine: torch.Tensor) -> None:
    """Put the original quantized parameter object back (moved only if the layer moved meanwhile)."""
    device = getattr(module, name).device
    setattr(module, name, pristine if pristine.device == device else pristine.to(device))
