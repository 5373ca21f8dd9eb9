"""Memory modes: estimate what a model needs before loading it, pick how it sits on the accelerator, and
refuse with a message instead of running the machine out of memory.

Modes (option ``memory_mode``), fastest first:

* ``full``: every component on the accelerator (``pipe.to(device)``).
* ``model_offload``: diffusers ``enable_model_cpu_offload``: one whole component (text encoder, denoiser,
  VAE) on the accelerator at a time; VRAM ~ the largest component.
* ``group_offload``: diffusers group offloading of the denoiser (block level, streamed on CUDA), the other
  components on the accelerator; VRAM ~ a few blocks + text encoders + VAE.
* ``sequential_offload``: diffusers ``enable_sequential_cpu_offload``: layer by layer; slowest, least VRAM.
* ``auto``: the fastest mode whose estimate fits in the free accelerator memory (minus headroom).

Estimates are made from file sizes (weights at the run dtype; files are assumed fp16/bf16, GGUF files count
at their size) plus an activation allowance; they are deliberately simple and documented in
``docs/memory.md``.  On a CPU-only machine only host RAM is checked.  Pure functions except
``apply_memory_mode`` / ``release`` (worker thread).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

GIB = 1024 ** 3
# A1111's "FP8 weight" option (fp8_storage): the denoiser's Linear/Conv weights stored as float8_e4m3fn
FP8_CHOICES = ("Disable", "Enable for SDXL", "Enable")
FP8_SDXL_ARCHES = ("sdxl", "sdxl_refiner")
MODES = ("auto", "full", "model_offload", "group_offload", "sequential_offload")
FASTEST_FIRST = MODES[1:]
ACTIVATIONS = 2 * GIB  # activations, VAE decode and allocator slack at ~1 MP (SDXL/Flux class models)
GROUP_FRACTION = 8  # group offload keeps about 1/8 of the denoiser resident (a few blocks, prefetched)


class MemoryRefused(ValueError):
    """The model cannot be loaded in the chosen mode; the message says what is needed, what is free, what to do."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # all weights at the run dtype
    largest: int  # the biggest single component (usually the denoiser)
    label: str = "this model"

    def accelerator_need(self, mode: str) -> int:
        rest = self.weights - self.largest
        return {
            "full": self.weights + ACTIVATIONS,
            "model_offload": self.largest + ACTIVATIONS,
            "group_offload": self.largest // GROUP_FRACTION + rest + ACTIVATIONS,
            "sequential_offload": ACTIVATIONS,
        }[mode]

    def host_need(self) -> int:
        """Host RAM to read the weights (the RAM cache keeps them there; offload modes run from there)."""
        return self.weights

    def summary(self, *, accelerator: bool) -> str:
        """One line for the UI: RAM to load, and on an accelerator what each mode needs."""
        ram = f"about {self.weights / GIB:.1f} GB of weights"
        if not accelerator:
            return f"{ram} (RAM)"
        modes = ", ".join(f"{mode.replace('_', ' ')} {self.accelerator_need(mode) / GIB:.1f} GB"
                          for mode in FASTEST_FIRST)
        return f"{ram}; accelerator memory: {modes}"

    def describe(self) -> str:
        parts = ", ".join(f"{mode.replace('_', ' ')} ~{self.accelerator_need(mode) / GIB:.1f} GB"
                          for mode in FASTEST_FIRST)
        return f"{self.label}: {self.weights / GIB:.1f} GB of weights; accelerator memory needed: {parts}"


def estimate_from_files(label: str, sizes: Mapping[str, int], *, run_dtype_bytes: int,
                        file_dtype_bytes: int = 2) -> MemoryEstimate:
    """``sizes``: bytes per file (checkpoint / transformer, text encoders, VAE) as stored on disk.  A GGUF file
    counts at its size: its quantized weights stay quantized in memory (norms and biases are a rounding error)."""
    scale = run_dtype_bytes / file_dtype_bytes
    scaled = [size if str(name).lower().endswith(".gguf") else int(size * scale)
              for name, size in sizes.items() if size > 0]
    return MemoryEstimate(weights=sum(scaled), largest=max(scaled, default=0), label=label)


def choose_mode(estimate: MemoryEstimate, requested: str, *, free_accelerator: int | None, free_host: int,
                headroom: int = 0) -> str:
    """The mode to use; ``free_accelerator`` None means a CPU-only run (only host RAM is checked)."""
    if requested not in MODES:
        raise MemoryRefused(f"memory mode {requested!r} is not one of {', '.join(MODES)}")
    if estimate.host_need() > free_host:
        raise MemoryRefused(
            f"{estimate.label} needs about {estimate.host_need() / GIB:.1f} GB of RAM to load, but only "
            f"{free_host / GIB:.1f} GB is free. Close other programs, lower the RAM cache budget "
            "(Settings: sd_checkpoint_cache_mb), or use a smaller/quantized file (fp8, GGUF) of this model.")
    if free_accelerator is None:
        return "full"
    room = free_accelerator - headroom
    if requested != "auto":
        need = estimate.accelerator_need(requested)
        if need > room:
            raise MemoryRefused(
                f"{estimate.label} in {requested.replace('_', ' ')} mode needs about {need / GIB:.1f} GB of "
                f"accelerator memory, but {room / GIB:.1f} GB is free. Pick a lighter memory mode "
                f"(Settings: memory_mode; {estimate.describe()}) or a quantized file.")
        return requested
    for mode in FASTEST_FIRST:
        if estimate.accelerator_need(mode) <= room:
            return mode
    raise MemoryRefused(f"{estimate.label} does not fit in {room / GIB:.1f} GB of free accelerator memory even "
                        f"layer by layer ({estimate.describe()}). Use a smaller or quantized model.")


def weight_storage(choice: str, arch: Any) -> str:
    """``"fp8"`` when the ``fp8_storage`` option asks for float8 weights on this model family, else ``""``."""
    family = str(getattr(arch, "value", arch))
    return "fp8" if choice == "Enable" or (choice == "Enable for SDXL" and family in FP8_SDXL_ARCHES) else ""


def store_weights(denoiser: Any, storage: str, compute_dtype: Any) -> bool:
    """With ``storage == "fp8"``: keep ``denoiser``'s Linear/Conv weights as float8_e4m3fn (diffusers layerwise
    casting: each layer is cast up to ``compute_dtype`` for its own forward, norms and embeddings stay as they
    are).  Lossy and in place, so callers cache the result under a key that includes ``storage``.  Returns
    whether anything was done (GGUF-quantized denoisers are left as they are)."""
    if storage != "fp8":
        return False
    import torch

    from webui.models.dit.gguf_loader import quantized_linear_count

    if quantized_linear_count(denoiser):
        return False
    denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    return True


def apply_memory_mode(pipe: Any, mode: str, device: Any) -> None:
    """Place ``pipe`` on ``device`` in ``mode`` (diffusers' own offloading); on a CPU device nothing moves."""
    if getattr(device, "type", str(device)) == "cpu":
        return
    if mode == "full":
        pipe.to(device)
    elif mode == "model_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential_offload":
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode == "group_offload":
        denoiser = getattr(pipe, "transformer", None) or pipe.unet
        for name, component in pipe.components.items():
            if component is not denoiser and hasattr(component, "to") and hasattr(component, "parameters"):
                component.to(device)
        denoiser.enable_group_offload(onload_device=device, offload_device="cpu", offload_type="block_level",
                                      num_blocks_per_group=1, use_stream=getattr(device, "type", "") == "cuda")
    else:
        raise ValueError(f"unknown memory mode {mode!r}")


def release(pipe: Any) -> None:
    """Undo offload hooks before the pipeline's modules go back to the CPU (cached components stay clean)."""
    remove = getattr(pipe, "remove_all_hooks", None)
    if callable(remove):
        remove()  # accelerate hooks of model / sequential offload
    from diffusers.hooks import HookRegistry

    for component in pipe.components.values():  # group offloading hooks (diffusers' own hook registry)
        if hasattr(component, "_diffusers_hook"):
            registry = HookRegistry.check_if_exists_or_initialize(component)
            for name in ("group_offloading", "lazy_prefetch_group_offloading"):
                registry.remove_hook(name, recurse=True)
