"""T2I-Adapter files: layout detection from tensor names/shapes, key conversion, and loading a ``T2IAdapter``.

Layouts found in ``models/ControlNet`` (sd-webui-controlnet users keep them there):

- TencentARC single files (``t2iadapter_canny_sd15v2.safetensors`` / ``.pth``): the full adapter has
  ``conv_in.*`` and ``body.K.block1/block2/in_conv.*`` (K = level * res_blocks + block); the light adapter
  (``t2iadapter_color``) has ``body.L.in_conv``, ``body.L.body.J.block1/2`` and ``body.L.out_conv``;
- diffusers keys (``adapter.conv_in.*``, ``adapter.body.L.resnets.J.*``) in a folder with ``config.json``
  (``_class_name: T2IAdapter``) or as a single file without config (the SDXL adapters as users rename them).

The adapter type and architecture come from shapes, as ComfyUI and diffusers' converter read them: the first
convolution sees ``in_channels * f**2`` channels after the pixel unshuffle, f = 8 for SD 1.x adapters
(192 for RGB, 64 for grey sketches) and f = 16 for SDXL's ``full_adapter_xl`` (768 / 256).  Variants diffusers
cannot run (TencentARC's 3x3 ``block2``, ``skep`` skips, strided-conv downsampling, the CLIP-vision style
adapter) are recognised and refused with the reason.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from webui.types import Arch

DIFFUSERS_PREFIX = "adapter."
# unshuffled input width of the first convolution -> (adapter type, unshuffle factor, arch)
FIRST_CONV_WIDTHS = {
    "full": {192: ("full_adapter", 8, Arch.SD1), 64: ("full_adapter", 8, Arch.SD1),
             768: ("full_adapter_xl", 16, Arch.SDXL), 256: ("full_adapter_xl", 16, Arch.SDXL)},
    "light": {192: ("light_adapter", 8, Arch.SD1), 64: ("light_adapter", 8, Arch.SD1)},
}
ARCH_BY_TYPE = {"full_adapter": Arch.SD1, "light_adapter": Arch.SD1, "full_adapter_xl": Arch.SDXL}
# original (TencentARC) key -> diffusers key, per layout; {k} = level * res_blocks + block in the full layout
ORIGINAL_TO_DIFFUSERS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "full": (
        (r"conv_in\.(weight|bias)", "adapter.conv_in.{0}"),
        (r"body\.(\d+)\.(block[12])\.(weight|bias)", "adapter.body.{L}.resnets.{J}.{1}.{2}"),
        (r"body\.(\d+)\.in_conv\.(weight|bias)", "adapter.body.{L}.in_conv.{1}"),
    ),
    "light": (
        (r"body\.(\d+)\.in_conv\.(weight|bias)", "adapter.body.{0}.in_conv.{1}"),
        (r"body\.(\d+)\.body\.(\d+)\.(block[12])\.(weight|bias)", "adapter.body.{0}.resnets.{1}.{2}.{3}"),
        (r"body\.(\d+)\.out_conv\.(weight|bias)", "adapter.body.{0}.out_conv.{1}"),
    ),
}
STYLE_ADAPTER_KEY = "style_embedding"  # TencentARC's style adapter: CLIP-vision tokens, not feature maps


class AdapterLayoutError(ValueError):
    """The tensors are a T2I-Adapter this WebUI cannot convert; the message says why."""


@dataclass(frozen=True)
class AdapterFacts:
    """What the tensor names and shapes say about a T2I-Adapter."""

    layout: str  # "original" | "diffusers"
    kind: str  # "full" | "light"
    adapter_type: str = ""  # diffusers' adapter_type
    arch: Arch = Arch.UNKNOWN
    in_channels: int = 3
    downscale_factor: int = 8
    unsupported: str | None = None


# ---------------------------------------------------------------------------------------------- detection
def _layout(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str] | None:
    """(layout, kind) from key names, or None when these are not T2I-Adapter tensors."""
    if "adapter.body.0.resnets.0.block1.weight" in shapes:
        return "diffusers", "full" if "adapter.conv_in.weight" in shapes else "light"
    if "conv_in.weight" in shapes and "body.0.block1.weight" in shapes:
        return "original", "full"
    if "body.0.in_conv.weight" in shapes and "body.0.body.0.block1.weight" in shapes:
        return "original", "light"
    return None


def adapter_facts(shapes: Mapping[str, tuple[int, ...]]) -> AdapterFacts | None:
    """Pure: T2I-Adapter facts from ``{key: shape}``; None when the keys are not a T2I-Adapter's."""
    if STYLE_ADAPTER_KEY in shapes and any(k.startswith("transformer_layes.") for k in shapes):
        return AdapterFacts(layout="original", kind="style", unsupported=(
            "this is a T2I-Adapter style adapter (CLIP-vision tokens), which is not supported: use an IP-Adapter "
            "for style transfer"))
    found = _layout(shapes)
    if found is None:
        return None
    layout, kind = found
    prefix = DIFFUSERS_PREFIX if layout == "diffusers" else ""
    first_key = f"{prefix}conv_in.weight" if kind == "full" else f"{prefix}body.0.in_conv.weight"
    first = tuple(shapes[first_key])
    if len(first) != 4:
        raise AdapterLayoutError(f"T2I-Adapter tensor {first_key} has shape {list(first)}; expected a convolution")
    width = first[1]
    known = FIRST_CONV_WIDTHS[kind].get(width)
    if known is None:
        return AdapterFacts(layout=layout, kind=kind, unsupported=(
            f"T2I-Adapter whose first convolution takes {width} channels; known are "
            f"{', '.join(str(w) for w in sorted(FIRST_CONV_WIDTHS[kind]))} (SD 1.x: 3 or 1 channels x 8x8, "
            "SDXL: x 16x16)"))
    adapter_type, factor, arch = known
    unsupported = None
    if layout == "original":
        if any(".skep." in k for k in shapes) or any("down_opt.op" in k for k in shapes):
            unsupported = ("TencentARC adapter trained with skip convolutions (skep) or strided-convolution "
                           "downsampling, which diffusers' T2IAdapter cannot run")
        elif kind == "full" and len(shapes.get("body.0.block2.weight", ())) == 4 \
                and tuple(shapes["body.0.block2.weight"][2:]) != (1, 1):
            unsupported = ("TencentARC adapter with 3x3 block2 convolutions (ksize=3); diffusers' T2IAdapter "
                           "has 1x1 ones")
    return AdapterFacts(layout=layout, kind=kind, adapter_type=adapter_type, arch=arch,
                        in_channels=width // (factor * factor), downscale_factor=factor, unsupported=unsupported)


# ---------------------------------------------------------------------------------------------- keys
def _full_res_blocks(keys: Mapping[str, Any]) -> int:
    """Res blocks per level of an original full adapter: the first ``body.K.in_conv`` after K = 0 (2 else)."""
    ins = sorted(int(m[1]) for k in keys if (m := re.fullmatch(r"body\.(\d+)\.in_conv\.weight", k)))
    ins = [i for i in ins if i > 0]
    return ins[0] if ins else 2


def original_to_diffusers(state: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """TencentARC keys -> diffusers ``T2IAdapter`` keys (``ORIGINAL_TO_DIFFUSERS``); every key must map."""
    blocks = _full_res_blocks(state) if kind == "full" else 0
    out, unused = {}, []
    for key, value in state.items():
        for pattern, template in ORIGINAL_TO_DIFFUSERS[kind]:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            extra = {}
            if blocks:
                k = int(m[1]) if m.lastindex and m[1].isdigit() else 0
                if "in_conv" in pattern and k % blocks:
                    raise AdapterLayoutError(f"T2I-Adapter key {key}: an input convolution inside a level "
                                             f"({blocks} res blocks per level)")
                extra = {"L": k // blocks, "J": k % blocks}
            out[template.format(*m.groups(), **extra)] = value
            break
        else:
            unused.append(key)
    if unused:
        raise AdapterLayoutError(f"{len(unused)} tensors do not belong to a T2I-Adapter (e.g. "
                                 f"{', '.join(sorted(unused)[:4])})")
    return out


def diffusers_to_original(state: Mapping[str, Any], kind: str, res_blocks: int = 2) -> dict[str, Any]:
    """The inverse of ``original_to_diffusers`` (the TencentARC layout of diffusers weights)."""
    out = {}
    for key, value in state.items():
        if kind == "full":
            if m := re.fullmatch(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.(.+)", key):
                out[f"body.{int(m[1]) * res_blocks + int(m[2])}.{m[3]}"] = value
            elif m := re.fullmatch(r"adapter\.body\.(\d+)\.in_conv\.(.+)", key):
                out[f"body.{int(m[1]) * res_blocks}.in_conv.{m[2]}"] = value
            elif key.startswith("adapter.conv_in."):
                out[key[len(DIFFUSERS_PREFIX):]] = value
            else:
                raise AdapterLayoutError(f"not a full T2I-Adapter key: {key}")
        else:
            m = re.fullmatch(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.(.+)", key)
            out[f"body.{m[1]}.body.{m[2]}.{m[3]}" if m else key[len(DIFFUSERS_PREFIX):]] = value
    return out


def adapter_config(state: Mapping[str, torch.Tensor], facts: AdapterFacts) -> dict[str, Any]:
    """``T2IAdapter`` config of diffusers-layout tensors: widths and res blocks from shapes."""
    levels = len({int(m[1]) for k in state if (m := re.match(r"adapter\.body\.(\d+)\.", k))})
    blocks = len({int(m[1]) for k in state if (m := re.match(r"adapter\.body\.0\.resnets\.(\d+)\.", k))})
    if not levels or not blocks:
        raise AdapterLayoutError("T2I-Adapter without adapter.body.* blocks: incomplete file")
    if facts.kind == "light":
        widths = [state[f"adapter.body.{i}.out_conv.weight"].shape[0] for i in range(levels)]
        if len(widths) < 2 or widths[-1] != widths[-2]:
            raise AdapterLayoutError(f"light T2I-Adapter widths {widths}: the last level must repeat the one before")
        channels = widths[:-1]
    else:
        channels = [state[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0] for i in range(levels)]
    return {"in_channels": facts.in_channels, "channels": channels, "num_res_blocks": blocks,
            "downscale_factor": facts.downscale_factor, "adapter_type": facts.adapter_type}


def is_adapter_state(state: Mapping[str, Any]) -> bool:
    return _layout({k: tuple(getattr(v, "shape", ())) for k, v in state.items()}) is not None


def load_t2i_adapter(path: str | Path, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                     state: Mapping[str, torch.Tensor] | None = None) -> Any:
    """A ``T2IAdapter`` from a diffusers folder (or its weights file beside ``config.json``) or a single file
    in either key layout; ``ModelLoadError`` naming the file and the problem otherwise."""
    from diffusers import T2IAdapter

    from webui.models.loaders import ModelLoadError, instantiate, read_state_dict

    path = Path(path)
    folder = path if path.is_dir() else (path.parent if (path.parent / "config.json").is_file()
                                         and path.name.startswith("diffusion_pytorch_model.") else None)
    if path.is_dir():
        weights = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not weights:
            raise ModelLoadError(path, "diffusers T2I-Adapter folder without diffusion_pytorch_model.safetensors")
        path = weights[0]
    if state is None:
        state = read_state_dict(path, dtype=dtype, allow_pickle=allow_pickle)
    try:
        facts = adapter_facts({k: tuple(v.shape) for k, v in state.items()})
        if facts is None:
            raise AdapterLayoutError("no T2I-Adapter tensors (conv_in/body.* or adapter.*)")
        if facts.unsupported:
            raise AdapterLayoutError(facts.unsupported)
        weights = original_to_diffusers(state, facts.kind) if facts.layout == "original" else dict(state)
        if folder is not None:
            config = dict(T2IAdapter.load_config(str(folder), local_files_only=True))
        else:
            config = adapter_config(weights, facts)
        model = instantiate(lambda: T2IAdapter.from_config(config), weights, "T2I-Adapter")
    except AdapterLayoutError as exc:
        raise ModelLoadError(path, str(exc)) from None
    return model  # already in ``dtype``: the weights were cast while reading


def arch_of_adapter(model: Any) -> Arch:
    """SD 1.x for ``full_adapter`` / ``light_adapter``, SDXL for ``full_adapter_xl``."""
    return ARCH_BY_TYPE.get(model.config.get("adapter_type"), Arch.UNKNOWN)


def is_t2i_adapter(model: Any) -> bool:
    return type(model).__name__ == "T2IAdapter"
