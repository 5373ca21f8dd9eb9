"""ControlNet models: offline loading of every common file layout, arch checks, and the RAM cache.

Layouts (all loaded strictly: a tensor that does not fit is an error, never silently dropped):

- diffusers folder ``<name>/config.json`` + ``diffusion_pytorch_model[.fp16].safetensors`` (the catalog lists
  the weights file; ``names_for`` shows the folder name and ``get`` accepts it);
- single file in ldm layout as lllyasviel's ``control_v11p_sd15_canny``: ``control_model.*`` keys, or the
  same keys without the prefix (thibaud's SD2 files), ``.safetensors`` or, with ``--allow-pickle``, ``.pth``
  through ``torch.load(weights_only=True)``;
- single file in diffusers layout without a config (most SDXL ControlNets: ``controlnet_cond_embedding.*``);
- T2I-Adapters in any of their layouts (``webui.models.t2i_adapter``): ``get`` returns a ``T2IAdapter``.

The config comes from tensor shapes (widths, layers, attention depths, hint-encoder channels) plus what
shapes cannot tell (head counts) from the bundled UNet config of the architecture, the same split as
``ldm_convert`` makes for checkpoints.  ldm keys are converted with diffusers' own
``convert_ldm_controlnet_checkpoint`` (plus SDXL's ``label_emb``), then every source tensor must be used.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from webui import configs
from webui.models import ldm_convert as conv
from webui.models import t2i_adapter as t2i
from webui.models.cache import ComponentCache, module_bytes
from webui.models.ldm_convert import ConversionError, StateDict
from webui.types import Arch, ModelKind, RequestError

log = logging.getLogger(__name__)

LDM_PREFIX = "control_model."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
ARCH_LABELS = {Arch.SD1: "SD 1.x", Arch.SD2: "SD 2.x", Arch.SDXL: "SDXL", Arch.SDXL_REFINER: "SDXL refiner"}
# Which ControlNet architecture a base checkpoint can use (the refiner has no ControlNets).
_BASE_CONFIG = {Arch.SD1: configs.SD15, Arch.SD2: configs.SD2, Arch.SDXL: configs.SDXL_BASE}
_LABEL_EMB = {"label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}


class ControlNetError(RequestError):
    """A ControlNet cannot be used for this job; the message names the file/unit and what to do."""


def arch_label(arch: Arch) -> str:
    return ARCH_LABELS.get(arch, arch.value)


# ---------------------------------------------------------------------------------------------- config
def _controlnet_params() -> set[str]:
    from diffusers import ControlNetModel

    return set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}


def _depth(sd: StateDict, prefix: str) -> int | None:
    """Transformer depth of the attention at ``prefix`` (None: no attention there)."""
    if f"{prefix}.proj_in.weight" not in sd:
        return None
    return conv.count_indices(sd, f"{prefix}.transformer_blocks.")


def controlnet_config(sd: StateDict, arch: Arch, *, global_pool: bool = False) -> dict[str, Any]:
    """``ControlNetModel`` config for diffusers-layout weights of a ControlNet for ``arch``."""
    name = "ControlNet"
    if arch not in _BASE_CONFIG:
        raise ConversionError(f"{name}: no ControlNet support for {arch_label(arch)} models")
    base = configs.load_config(_BASE_CONFIG[arch], "unet")
    conv_in = conv._require(sd, "conv_in.weight", name)
    levels = conv.count_indices(sd, "down_blocks.")
    layers = conv.count_indices(sd, "down_blocks.0.resnets.")
    if not levels or not layers:
        raise ConversionError(f"{name}: no encoder blocks (down_blocks.*) found")
    widths = [conv._require(sd, f"down_blocks.{i}.resnets.0.conv2.weight", name).shape[0] for i in range(levels)]
    down_depths = [_depth(sd, f"down_blocks.{i}.attentions.0") for i in range(levels)]
    mid_depth = _depth(sd, "mid_block.attentions.0")
    depths = [1 if d is None else d for d in down_depths]
    if mid_depth is not None and down_depths[-1] is None:
        depths[-1] = mid_depth
    if mid_depth is not None and depths[-1] != mid_depth:
        raise ConversionError(f"{name}: middle block depth {mid_depth} differs from the last level's {depths[-1]}")
    heads = base.get("attention_head_dim")
    if isinstance(heads, list) and len(heads) != levels:
        raise ConversionError(f"{name}: has {levels} resolution levels, but {arch_label(arch)} has {len(heads)}: "
                              "the file is for a different architecture")
    attn_key = next((k for k in sd if k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise ConversionError(f"{name}: no cross-attention layers found")
    hint_in = conv._require(sd, "controlnet_cond_embedding.conv_in.weight", name)
    n_blocks = conv.count_indices(sd, "controlnet_cond_embedding.blocks.")
    hint_widths = [hint_in.shape[0]] + [sd[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"].shape[0]
                                        for i in range(n_blocks // 2)]
    proj_in = next((sd[k] for k in sd if k.endswith("attentions.0.proj_in.weight")), None)
    config = {k: v for k, v in base.items() if k in _controlnet_params()}
    config.update(
        in_channels=conv_in.shape[1],
        conditioning_channels=hint_in.shape[1],
        conditioning_embedding_out_channels=hint_widths,
        block_out_channels=widths,
        layers_per_block=layers,
        down_block_types=["DownBlock2D" if d is None else "CrossAttnDownBlock2D" for d in down_depths],
        mid_block_type="UNetMidBlock2D" if mid_depth is None else "UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        cross_attention_dim=sd[attn_key].shape[1],
        use_linear_projection=proj_in is not None and proj_in.ndim == 2,
        global_pool_conditions=global_pool,
    )
    if "add_embedding.linear_1.weight" in sd:
        if base.get("addition_embed_type") != "text_time":
            raise ConversionError(f"{name}: has an SDXL size/time embedding, so it is not for {arch_label(arch)}")
        config["projection_class_embeddings_input_dim"] = sd["add_embedding.linear_1.weight"].shape[1]
    elif base.get("addition_embed_type") == "text_time":
        raise ConversionError(f"{name}: no SDXL size/time embedding (add_embedding/label_emb), so it is not for SDXL")
    return config


# ---------------------------------------------------------------------------------------------- keys
def ldm_layers_per_block(sd: StateDict) -> int:
    n_in = conv.count_indices(sd, "input_blocks.")
    downs = [i for i in range(1, n_in) if f"input_blocks.{i}.0.op.weight" in sd]
    return (downs[0] if downs else n_in) - 1


def convert_ldm_controlnet(sd: StateDict) -> StateDict:
    """ldm ControlNet keys (prefix already stripped) -> diffusers ``ControlNetModel`` keys."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    layers = ldm_layers_per_block(sd)
    if layers < 1:
        raise ConversionError("ControlNet: no encoder blocks (input_blocks.*) found")
    converted = convert_controlnet_checkpoint(dict(sd), {"layers_per_block": layers})
    for old, new in _LABEL_EMB.items():  # SDXL: diffusers' converter leaves the size/time embedding out
        for param in ("weight", "bias"):
            if old + param in sd:
                converted[new + param] = sd[old + param]
    missing = sorted(k for k, v in converted.items() if v is None)
    if missing:
        raise ConversionError(f"ControlNet: {len(missing)} tensors are missing (e.g. {', '.join(missing[:4])}); "
                              "the file is incomplete")
    conv.check_all_used(sd, converted, "ControlNet")
    return converted


def split_layout(state: StateDict) -> tuple[str, StateDict]:
    """("ldm" | "diffusers", the ControlNet's own tensors) of a single file; other tensors are dropped."""
    if any(k.startswith(LDM_PREFIX) for k in state):
        own = conv.take_prefix(state, LDM_PREFIX)
        if state:
            log.debug("ignoring %d tensors outside %s* (e.g. %s)", len(state), LDM_PREFIX, next(iter(state)))
        return "ldm", own
    if "input_hint_block.0.weight" in state:
        return "ldm", state
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return "diffusers", state
    if "lora_controlnet" in state:
        raise ConversionError("Control-LoRA files are not supported; use a full ControlNet")
    raise ConversionError("no ControlNet weights (control_model.*, input_hint_block.* or controlnet_cond_embedding.*)")


def wants_global_pool(path: Path) -> bool:
    """Shuffle ControlNets pool their residuals (``global_average_pooling: True`` in lllyasviel's yaml)."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        return "global_average_pooling: true" in yaml.read_text(errors="replace").lower()
    return "shuffle" in path.stem.lower()


# ---------------------------------------------------------------------------------------------- loading
def _diffusers_config_dir(path: Path) -> Path | None:
    """The folder of a diffusers ControlNet whose weights file is ``path`` (config.json beside it)."""
    if path.name.startswith(DIFFUSERS_WEIGHTS + ".") and (path.parent / "config.json").is_file():
        return path.parent
    return None


def arch_from_weights(sd: StateDict) -> Arch:
    """Architecture of diffusers-layout ControlNet weights, for files detection cannot read (pickles):
    the cross-attention width of real files, else the structure (SDXL size embedding, SD2 linear projections)."""
    attn = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    width = attn.shape[1] if attn is not None else 0
    known = {768: Arch.SD1, 1024: Arch.SD2, 2048: Arch.SDXL}
    if width in known:
        return known[width]
    if "add_embedding.linear_1.weight" in sd:
        return Arch.SDXL
    proj_in = next((v for k, v in sd.items() if k.endswith("proj_in.weight")), None)
    return Arch.SD2 if proj_in is not None and proj_in.ndim == 2 else Arch.SD1


def load_controlnet(path: str | Path, *, arch: Arch | None, dtype: torch.dtype = torch.float32,
                    allow_pickle: bool = False) -> Any:
    """A ``ControlNetModel`` from any supported layout (see the module docstring); ``ModelLoadError`` else.

    ``arch`` None: taken from the weights (``arch_from_weights``); see ``arch_of(model)``."""
    from diffusers import ControlNetModel

    from webui.models.loaders import ModelLoadError, instantiate, read_state_dict

    path = Path(path)
    folder = path if path.is_dir() else _diffusers_config_dir(path)
    if folder is not None and path.is_dir():
        weights = sorted(folder.glob(DIFFUSERS_WEIGHTS + "*.safetensors"))
        if not weights:
            raise ModelLoadError(path, f"diffusers ControlNet folder without {DIFFUSERS_WEIGHTS}.safetensors")
        path = weights[0]
    state = read_state_dict(path, dtype=dtype, allow_pickle=allow_pickle)
    if t2i.is_adapter_state(state):  # a T2I-Adapter in models/ControlNet (sd-webui-controlnet keeps them there)
        return t2i.load_t2i_adapter(path, dtype=dtype, state=state)
    try:
        if folder is not None:
            config = dict(ControlNetModel.load_config(str(folder), local_files_only=True))
            weights_sd = state
        else:
            layout, own = split_layout(state)
            weights_sd = convert_ldm_controlnet(own) if layout == "ldm" else own
            arch = arch or arch_from_weights(weights_sd)
            config = controlnet_config(weights_sd, arch, global_pool=wants_global_pool(path))
        model = instantiate(lambda: ControlNetModel.from_config(config), weights_sd, "ControlNet")
    except ConversionError as exc:
        raise ModelLoadError(path, f"{exc} (loading as a {arch_label(arch or Arch.UNKNOWN)} ControlNet)") from None
    return model  # already in ``dtype``: the weights were cast while reading


def arch_of(model: Any) -> Arch:
    """The architecture a loaded ``ControlNetModel`` (or ``T2IAdapter``) is for (from its config)."""
    if t2i.is_t2i_adapter(model):
        return t2i.arch_of_adapter(model)
    config = model.config
    if config.get("addition_embed_type") == "text_time":
        return Arch.SDXL
    return {768: Arch.SD1, 1024: Arch.SD2}.get(config.get("cross_attention_dim"),
                                              Arch.SD2 if config.get("use_linear_projection") else Arch.SD1)


@dataclass(frozen=True)
class ControlNetEntry:
    """A usable ControlNet as the UI lists it."""

    name: str  # what get() accepts and the UI shows (a diffusers folder: the folder name)
    record: Any  # webui.models.catalog.ModelRecord


def display_name(record: Any) -> str:
    """The folder name for a diffusers folder's weights file, else the catalog name."""
    if _diffusers_config_dir(record.path) is not None and "/" in record.name:
        return record.name.rsplit("/", 1)[0]
    return record.name


class ControlNetLoader:
    """``get(name, base_arch)`` -> a ``ControlNetModel`` on the plan's device/dtype, cached in RAM by file."""

    def __init__(self, catalog: Any, cache: ComponentCache, plan: Any = None, *, allow_pickle: bool = False):
        self._catalog = catalog
        self._cache = cache
        self._device = getattr(plan, "device", torch.device("cpu"))
        self._dtype = getattr(plan, "dtype", torch.float32)
        self._allow_pickle = allow_pickle

    def entries(self, arch: Arch | None = None) -> list[ControlNetEntry]:
        """Usable ControlNets (for ``arch`` only, if given), sorted by name."""
        out = []
        for record in self._catalog.list(ModelKind.CONTROLNET.value):
            if record.usable and record.kind is ModelKind.CONTROLNET and (arch is None or record.arch is arch):
                out.append(ControlNetEntry(display_name(record), record))
        return sorted(out, key=lambda e: e.name.casefold())

    def names_for(self, arch: Arch | None) -> list[str]:
        """Names for the UI dropdown: the ControlNets that fit a checkpoint of ``arch``."""
        return [e.name for e in self.entries(arch)]

    def record(self, name: str) -> Any:
        """The catalog record for a UI/API name (``"name [hash]"`` too); ``ControlNetError`` listing the files."""
        query = name.strip()
        for candidate in (query, f"{query}/{DIFFUSERS_WEIGHTS}"):
            try:
                return self._catalog.get(ModelKind.CONTROLNET.value, candidate)
            except LookupError as exc:
                first = exc
        available = ", ".join(self.names_for(None)) or "none: put ControlNet files into models/ControlNet"
        raise ControlNetError(f"ControlNet {name!r} not found ({first}). Available: {available}") from None

    def check(self, record: Any, base_arch: Arch) -> None:
        """Usable at all, and made for the loaded checkpoint's architecture."""
        if record.error:
            raise ControlNetError(f"ControlNet {record.name} cannot be used: {record.error}")
        if record.format == "pickle" and not self._allow_pickle:
            raise ControlNetError(f"ControlNet {record.name} is a pickle (.pth) file, which can run code when "
                                  "loaded. Convert it to .safetensors, or restart with --allow-pickle to load it "
                                  "with torch.load(weights_only=True).")
        arch = Arch(base_arch)
        if arch is Arch.SDXL_REFINER:
            raise ControlNetError("ControlNet does not work with the SDXL refiner: pick an SDXL base checkpoint")
        self.check_arch(record, record.arch, arch)

    @staticmethod
    def check_arch(record: Any, found: Arch, base: Arch) -> None:
        if found is Arch.UNKNOWN and record.format == "pickle":
            return  # known once loaded (detection reads safetensors headers only)
        if found is Arch.UNKNOWN:
            raise ControlNetError(f"ControlNet {record.name}: its architecture was not recognised, so it cannot be "
                                  f"matched to the {arch_label(base)} checkpoint")
        if found is not base:
            article = "an" if arch_label(base).startswith(("S", "s")) else "a"
            raise ControlNetError(f"ControlNet {display_name(record)} is for {arch_label(found)} but the loaded "
                                  f"checkpoint is {arch_label(base)}: pick {article} {arch_label(base)} ControlNet")

    def cache_key(self, record: Any) -> tuple:
        return ("controlnet", str(record.path), record.size, record.mtime, str(self._dtype))

    def get(self, name: str, base_arch: Arch) -> Any:
        """The ControlNet ``name`` for a checkpoint of ``base_arch`` (cache hit when loaded before)."""
        from webui.models.loaders import ModelLoadError

        record = self.record(name)
        self.check(record, base_arch)
        key = self.cache_key(record)
        model = self._cache.get(key)
        if model is None:
            arch = None if record.arch is Arch.UNKNOWN else record.arch
            try:
                model = load_controlnet(record.path, arch=arch, dtype=self._dtype, allow_pickle=self._allow_pickle)
            except ModelLoadError as exc:
                raise ControlNetError(f"ControlNet {display_name(record)}: {exc}") from None
            if self._device.type != "cpu":
                model = model.to(self._device)
            self._cache.put(key, model, size_bytes=module_bytes(model))
        self.check_arch(record, arch_of(model), Arch(base_arch))
        return model

    def title(self, record: Any) -> str:
        """``"name [hash8]"`` as sd-webui-controlnet writes it in infotext and lists it in its API."""
        return f"{display_name(record)} [{legacy_hash(record.path)}]"


def legacy_hash(path: Path) -> str:
    """A1111's old model hash (sha256 of 64 KiB at offset 1 MiB, 8 hex digits), what sd-webui-controlnet shows;
    for a diffusers folder, of its weights file."""
    if path.is_dir():
        path = next(iter(sorted(path.glob(DIFFUSERS_WEIGHTS + "*.safetensors"))), path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            handle.seek(0x100000)
            digest.update(handle.read(0x10000))
    except OSError:
        return "NOFILE"
    return digest.hexdigest()[:8]

