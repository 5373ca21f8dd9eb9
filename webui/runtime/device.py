"""Pick the torch device and dtype from launch settings (worker thread only)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else self.device.type
        return f"{name} ({str(self.dtype).replace('torch.', '')})"


def plan_device(device: str = "auto", precision: str = "auto") -> DevicePlan:
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if precision == "auto":
        dtype = torch.float32 if dev.type == "cpu" else torch.float16
    else:
        dtype = DTYPES[precision]
    return DevicePlan(dev, dtype)
