"""GGUF-quantized DiT transformers (city96/ComfyUI-GGUF files: ``flux1-dev-Q4_K_S.gguf``, ``sd3.5_large-Q8_0.gguf``)
kept quantized in memory.

``read_gguf_state(path)`` reads the tensors with diffusers' ``load_gguf_checkpoint``: quantized tensors stay
``GGUFParameter`` (the GGML bytes, one row of blocks per weight row), F16/F32 ones are plain tensors.  The
original-layout keys then go through our own conversion tables (``convert``; fused qkv and Flux ``linear1``
are cut along dim 0, i.e. whole byte rows, and ``GGUFParameter`` survives chunk / split / cat) and the config
comes from the *logical* shapes (``logical_shape``).  ``build_quantized`` checks the converted weights strictly
against the model and loads them through diffusers' public route, ``from_single_file(...,
quantization_config=GGUFQuantizationConfig(compute_dtype=run dtype))``: every ``nn.Linear`` whose weight is
quantized becomes a ``GGUFLinear`` (dequantized block by block in each forward), everything else -- norms,
biases, embeddings, convolutions, BF16 tensors -- is loaded as normal tensors at the run dtype.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from webui.models.dit.components import DitLoadError
from webui.models.gguf_header import UNQUANTIZED, read_gguf_header
from webui.models.safetensors_header import BrokenModelFile

StateDict = dict[str, torch.Tensor]


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The weight's shape in elements (a ``GGUFParameter`` has the shape of its bytes)."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def is_quantized(tensor: Any) -> bool:
    """A ``GGUFParameter`` of a block-quantized type (Q8_0, Q4_K...), not F16/BF16/F32 bytes."""
    quant_type = getattr(tensor, "quant_type", None)
    return quant_type is not None and getattr(quant_type, "name", str(quant_type)) not in UNQUANTIZED


def dequantize(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the weight's values (float; a plain tensor comes back as it is)."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    if getattr(tensor, "quant_type", None) is None:
        return tensor
    return dequantize_gguf_tensor(tensor).as_subclass(torch.Tensor)


def read_gguf_state(path: str | Path) -> StateDict:
    """Tensors of a GGUF file by their names in the file: quantized ones as ``GGUFParameter``, the rest (BF16
    decoded) as plain tensors in their logical shapes."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    path = Path(path)
    try:
        header = read_gguf_header(path)
        state = load_gguf_checkpoint(str(path))
    except BrokenModelFile as exc:
        raise DitLoadError(path, exc.reason) from None
    except (ValueError, ImportError) as exc:  # an unsupported quant type names itself in the first line
        raise DitLoadError(path, f"cannot read this GGUF file: {str(exc).splitlines()[0]}") from None
    out: StateDict = {}
    for key, tensor in state.items():
        if not is_quantized(tensor):
            tensor = dequantize(tensor).reshape(header.tensors[key].shape)  # ComfyUI-GGUF orig_shape entries
        out[key] = tensor
    return out


def _check(expected: Mapping[str, torch.Tensor], weights: StateDict, component: str, path: Path) -> None:
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {logical_shape(weights[k])} != {tuple(t.shape)}" for k, t in expected.items()
             if k in weights and logical_shape(weights[k]) != tuple(t.shape)]
    problems = [f"{len(items)} {label} (e.g. {', '.join(items[:4])})"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if items]
    if problems:
        raise DitLoadError(path, f"{component}: weights do not match the model: {'; '.join(problems)}: the file "
                                 f"is incomplete or not a {component} file")


def build_quantized(cls: Any, config: Mapping[str, Any], weights: StateDict, *, dtype: torch.dtype, path: Path,
                    component: str) -> torch.nn.Module:
    """``cls`` (a diffusers transformer) with ``GGUFLinear`` layers for the quantized linear weights."""
    from accelerate import init_empty_weights
    from diffusers import GGUFQuantizationConfig

    with init_empty_weights():
        probe = cls.from_config(dict(config))
    _check(probe.state_dict(), weights, component, path)
    linear = {f"{name}.weight" for name, module in probe.named_modules() if isinstance(module, torch.nn.Linear)}
    del probe
    ready = {k: v if k in linear and is_quantized(v) else dequantize(v).to(dtype) for k, v in weights.items()}
    with tempfile.TemporaryDirectory(prefix="webui-gguf-config-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **config}))
        try:
            model = cls.from_single_file(ready, config=folder, local_files_only=True, torch_dtype=dtype,
                                         quantization_config=GGUFQuantizationConfig(compute_dtype=dtype))
        except (ValueError, RuntimeError, KeyError) as exc:
            raise DitLoadError(path, f"cannot build the quantized {component}: {str(exc).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


def quantized_linear_count(model: torch.nn.Module) -> int:
    """How many linear layers hold quantized GGUF weights (0 for a dense model)."""
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and is_quantized(m.weight))
