"""Offline loading of Stable Diffusion checkpoints (single file or diffusers folder) and VAE files.

``load_checkpoint(path, arch=..., variant=..., prediction=...)`` reads an A1111/ldm single-file
``.safetensors`` (or, with ``allow_pickle``, a ``.ckpt`` through ``torch.load(weights_only=True)``) or a
diffusers folder, derives every diffusers config from tensor shapes plus the bundled config of the
architecture (``webui/configs``), converts the keys and loads each model strictly.  Nothing here can
reach the network, and nothing is detected by file name: the architecture comes from the caller
(``webui.models.detect``).  ``build_pipeline(components)`` turns the result into a ready diffusers pipeline.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from webui import configs
from webui.models import ldm_convert as conv
from webui.models.ldm_convert import ConversionError, StateDict
from webui.types import Arch, Prediction, Variant

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ModelLoadError(Exception):
    """A model file cannot be loaded; ``str()`` names the file, the problem and what to do."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True, kw_only=True)
class CheckpointComponents:
    """The loaded parts of one checkpoint; shared read-only by every pipeline built from it."""

    unet: Any
    vae: Any | None  # None: the file has no VAE, the user must pick one
    text_encoder: Any | None  # None for the SDXL refiner
    tokenizer: Any | None
    text_encoder_2: Any | None = None
    tokenizer_2: Any | None = None
    scheduler_config: dict[str, Any]
    arch: Arch
    variant: Variant
    prediction: Prediction
    zero_terminal_snr: bool = False
    config_key: str = ""
    source: Path | None = None


@dataclass(frozen=True)
class _TextEncoderSpec:
    component: str  # "text_encoder" / "text_encoder_2"
    prefix: str  # where the weights sit in an ldm single file
    open_clip: bool  # OpenCLIP layout (resblocks) rather than HF CLIP (text_model.encoder.layers)
    drop_last_layers: int = 0
    with_projection: bool = False


_TEXT_ENCODERS: dict[Arch, tuple[_TextEncoderSpec, ...]] = {
    Arch.SD1: (_TextEncoderSpec("text_encoder", "cond_stage_model.transformer.", open_clip=False),),
    Arch.SD2: (_TextEncoderSpec("text_encoder", "cond_stage_model.model.", open_clip=True, drop_last_layers=1),),
    Arch.SDXL: (
        _TextEncoderSpec("text_encoder", "conditioner.embedders.0.transformer.", open_clip=False),
        _TextEncoderSpec("text_encoder_2", "conditioner.embedders.1.model.", open_clip=True, with_projection=True),
    ),
    Arch.SDXL_REFINER: (
        _TextEncoderSpec("text_encoder_2", "conditioner.embedders.0.model.", open_clip=True, with_projection=True),
    ),
}

# Keys real checkpoints carry besides the three models (DDPM buffers, markers) are ignored; EMA copies
# of the UNet (``model_ema.*``, 3.4 GB in the unpruned SD1.5) are not even read.
_MARKER_KEYS = ("v_pred", "ztsnr")
_SKIPPED_PREFIXES = ("model_ema.",)

# What a file that is not a checkpoint looks like, for a helpful message.
_OTHER_KINDS: tuple[tuple[Callable[[str], bool], str, str], ...] = (
    (lambda k: k.startswith(("lora_", "lora_unet", "lycoris_")) or ".lora_down." in k or ".lora_A." in k,
     "a LoRA", "models/Lora"),
    (lambda k: k.startswith(("control_model.", "controlnet_cond_embedding.")), "a ControlNet", "models/ControlNet"),
    (lambda k: k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "first_stage_model.")),
     "a VAE", "models/VAE"),
    (lambda k: k in ("emb_params", "string_to_param", "clip_l", "clip_g"), "a textual-inversion embedding",
     "embeddings"),
)


# ---------------------------------------------------------------------------------------------- reading
def read_state_dict(
    path: str | Path, *, dtype: torch.dtype | None = None, allow_pickle: bool = False, skip: tuple[str, ...] = ()
) -> StateDict:
    """All tensors of a weights file (except keys starting with ``skip``), floating ones cast to ``dtype``
    one at a time: one copy in RAM."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        tensors = {k: v for k, v in _read_pickle(path, allow_pickle).items() if not (skip and k.startswith(skip))}
    elif suffix in SAFETENSORS_SUFFIXES:
        tensors = _read_safetensors(path, dtype, skip)
    else:
        raise ModelLoadError(path, f"unsupported file type {suffix!r}; use .safetensors")
    if dtype is not None:  # safetensors were cast while reading
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensors[key] = tensor.to(dtype)
    return tensors


def _read_safetensors(path: Path, dtype: torch.dtype | None, skip: tuple[str, ...]) -> StateDict:
    from safetensors import SafetensorError, safe_open

    out: StateDict = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if skip and key.startswith(skip):
                    continue
                tensor = handle.get_tensor(key)
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                out[key] = tensor
    except SafetensorError as exc:
        raise ModelLoadError(
            path, f"not a readable safetensors file ({exc}); it is probably truncated or corrupt: download it again"
        ) from None
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read the file: {exc}") from None
    return out


def _read_pickle(path: Path, allow_pickle: bool) -> StateDict:
    if not allow_pickle:
        raise ModelLoadError(
            path,
            "is a pickle-based .ckpt/.pt file, which can run code when loaded. Convert it to .safetensors, "
            "or start the WebUI with --allow-pickle to load it with torch.load(weights_only=True).",
        )
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) torch.save format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            path,
            f"torch.load(weights_only=True) refused it ({first}). It holds Python objects besides tensors or is "
            "damaged; convert it to .safetensors with a tool you trust.",
        ) from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(path, f"contains a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _describe_other_kind(keys: list[str]) -> str:
    for matches, kind, folder in _OTHER_KINDS:
        if any(matches(k) for k in keys):
            return f"; it looks like {kind} file: put it in {folder}"
    return ""


# ---------------------------------------------------------------------------------------------- models
def instantiate(factory: Callable[[], torch.nn.Module], weights: StateDict, component: str) -> torch.nn.Module:
    """Build a model on the meta device and assign ``weights`` strictly (no random leftovers)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = factory()
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {tuple(weights[k].shape)} != {tuple(t.shape)}" for k, t in expected.items()
             if k in weights and weights[k].shape != t.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:4])})")
        raise ConversionError(f"{component}: weights do not match the model: " + "; ".join(parts))
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _build_text_encoder(config: dict[str, Any], weights: StateDict, component: str) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if "WithProjection" in config["architectures"][0] else CLIPTextModel
    clip_config = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    return instantiate(lambda: cls(clip_config), weights, component)


def _unet_from_ldm(state: StateDict, key: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    unet_sd = conv.take_prefix(state, conv.UNET_PREFIX)
    config = conv.unet_config_from_ldm(unet_sd, configs.load_config(key, "unet"))
    weights = conv.convert_unet(unet_sd, config)
    return instantiate(lambda: UNet2DConditionModel.from_config(config), weights, "UNet")


def vae_from_ldm(vae_sd: StateDict, base: dict[str, Any]) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    if "encoder.down_blocks.0.resnets.0.conv1.weight" in vae_sd:  # already diffusers layout
        config = conv.vae_config_from_diffusers(vae_sd, base)
        weights = vae_sd
    else:
        config = conv.vae_config_from_ldm(vae_sd, base)
        weights = conv.convert_vae(vae_sd, config)
    return instantiate(lambda: AutoencoderKL.from_config(config), weights, "VAE")


def _text_encoder_from_ldm(state: StateDict, spec: _TextEncoderSpec, key: str) -> torch.nn.Module:
    text_sd = conv.take_prefix(state, spec.prefix)
    if not text_sd:
        raise ConversionError(f"{spec.component}: no weights under {spec.prefix}*")
    base = configs.load_config(key, spec.component)
    if spec.open_clip:
        config = conv.open_clip_config_from_ldm(
            text_sd, base, drop_last_layers=spec.drop_last_layers, with_projection=spec.with_projection
        )
        weights = conv.convert_open_clip(text_sd, config, with_projection=spec.with_projection)
    else:
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
        config = conv.clip_config_from_ldm(text_sd, base)
        weights = conv.convert_clip(text_sd)
    return _build_text_encoder(config, weights, spec.component)


def scheduler_config_for(key: str, prediction: Prediction | None, zero_terminal_snr: bool) -> dict[str, Any]:
    config = configs.load_config(key, "scheduler")
    if prediction is not None:
        config["prediction_type"] = Prediction(prediction).value
    if zero_terminal_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def _check_text_encoders(path: Path, arch: Arch, keys: list[str]) -> None:
    """Fail early, naming what the file does contain, when the text encoders are not where ``arch`` has them."""
    for spec in _TEXT_ENCODERS[arch]:
        if any(k.startswith(spec.prefix) for k in keys):
            continue
        found = sorted({a.value for a, specs in _TEXT_ENCODERS.items() for s in specs
                        if a is not arch and any(k.startswith(s.prefix) for k in keys)})
        hint = f"its text encoders are laid out like {' or '.join(found)}" if found else "it has no text encoder"
        raise ModelLoadError(
            path, f"no {spec.component} weights under {spec.prefix}*, so it is not a {arch.value} checkpoint "
            f"({hint})"
        )


_IN_CHANNELS = {Variant.NORMAL: 4, Variant.INPAINT: 9, Variant.INSTRUCT_PIX2PIX: 8, Variant.DEPTH: 5}


def _check_variant(path: Path, variant: Variant | None, in_channels: int) -> Variant:
    """The UNet's input channels must fit the variant (None: take the variant they imply)."""
    if variant is None:
        found = next((v for v, n in _IN_CHANNELS.items() if n == in_channels), None)
        if found is None:
            raise ModelLoadError(path, f"UNet with {in_channels} input channels is not a known variant")
        return found
    variant = Variant(variant)
    if _IN_CHANNELS[variant] != in_channels:
        raise ModelLoadError(
            path, f"the UNet has {in_channels} input channels, but a {variant.value} model has {_IN_CHANNELS[variant]}"
        )
    return variant


# ---------------------------------------------------------------------------------------------- public API
def load_checkpoint(
    path: str | Path,
    *,
    arch: Arch,
    variant: Variant | None = Variant.NORMAL,
    prediction: Prediction | None = None,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> CheckpointComponents:
    """Load a single-file checkpoint (ldm layout) or a diffusers folder as ``CheckpointComponents``.

    ``arch``/``variant``/``prediction`` come from detection (``webui.models.detect``) or the user.
    ``variant=None`` takes the variant the UNet's input channels imply; a variant that contradicts them
    is an error.  ``prediction=None`` keeps the architecture's default (SD2 -> the 512 epsilon config).
    A ``ztsnr`` marker tensor in the file switches the scheduler to zero-terminal SNR.  Raises
    ``ModelLoadError`` naming the file and the problem; never returns randomly initialised weights.
    """
    path = Path(path)
    if path.is_dir():
        from webui.models.diffusers_folder import load_diffusers_folder

        return load_diffusers_folder(
            path, arch=arch, variant=variant, prediction=prediction, dtype=dtype, allow_pickle=allow_pickle
        )
    arch = Arch(arch)
    if arch not in _TEXT_ENCODERS:
        raise ModelLoadError(path, f"cannot load a {arch.value} checkpoint (supported: SD1, SD2, SDXL, SDXL refiner)")
    state = read_state_dict(path, dtype=dtype, allow_pickle=allow_pickle, skip=_SKIPPED_PREFIXES)
    keys = list(state)
    conv_in = state.get(conv.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ModelLoadError(
            path, f"no UNet weights ({conv.UNET_PREFIX}*) found, so this is not a checkpoint{_describe_other_kind(keys)}"
        )
    variant = _check_variant(path, variant, int(conv_in.shape[1]))
    _check_text_encoders(path, arch, keys)
    try:
        key = configs.config_key(arch, variant, prediction)
    except KeyError as exc:
        raise ModelLoadError(path, exc.args[0]) from None
    zero_terminal_snr = "ztsnr" in state
    try:
        unet = _unet_from_ldm(state, key)
        text = {spec.component: _text_encoder_from_ldm(state, spec, key) for spec in _TEXT_ENCODERS[arch]}
        vae_sd = next((conv.take_prefix(state, p) for p in conv.VAE_PREFIXES if any(k.startswith(p) for k in state)), {})
        vae = vae_from_ldm(vae_sd, configs.load_config(key, "vae")) if vae_sd else None
    except ConversionError as exc:
        raise ModelLoadError(path, f"{exc} (loading as {arch.value}/{variant.value})") from None
    leftovers = [k for k in state if k not in _MARKER_KEYS]
    if leftovers:
        log.debug("%s: ignored %d extra tensors (e.g. %s)", path.name, len(leftovers), leftovers[:3])
    del state
    return CheckpointComponents(
        unet=unet,
        vae=vae,
        text_encoder=text.get("text_encoder"),
        tokenizer=configs.make_tokenizer(key, "tokenizer") if "text_encoder" in text else None,
        text_encoder_2=text.get("text_encoder_2"),
        tokenizer_2=configs.make_tokenizer(key, "tokenizer_2") if "text_encoder_2" in text else None,
        scheduler_config=scheduler_config_for(key, prediction, zero_terminal_snr),
        arch=arch,
        variant=variant,
        prediction=Prediction(prediction or configs.load_config(key, "scheduler")["prediction_type"]),
        zero_terminal_snr=zero_terminal_snr,
        config_key=key,
        source=path,
    )


def load_vae(
    path: str | Path,
    *,
    arch: Arch | None = Arch.SD1,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    scaling_factor: float | None = None,
) -> torch.nn.Module:
    """A standalone VAE file (ldm ``encoder.down.*`` or diffusers ``encoder.down_blocks.*`` layout).

    ``arch`` (of the checkpoint it will decode for) picks the latent scaling factor and fp16 upcasting:
    SDXL/refiner 0.13025, anything else 0.18215; ``scaling_factor`` overrides it.
    """
    path = Path(path)
    arch = Arch(arch) if arch is not None else Arch.UNKNOWN
    key = configs.SDXL_BASE if arch in (Arch.SDXL, Arch.SDXL_REFINER) else configs.SD15  # same VAE layout
    base = configs.load_config(key, "vae")
    if scaling_factor is not None:
        base["scaling_factor"] = scaling_factor
    state = read_state_dict(path, dtype=dtype, allow_pickle=allow_pickle)
    if any(k.startswith(conv.UNET_PREFIX) for k in state):
        raise ModelLoadError(path, "is a full checkpoint, not a VAE file: put it in models/Stable-diffusion")
    prefix = next((p for p in conv.VAE_PREFIXES if any(k.startswith(p) for k in state)), "")
    vae_sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    vae_sd = {k: v for k, v in vae_sd.items() if k.startswith(conv.VAE_SUBKEYS)}  # drop loss./model_ema. extras
    if not vae_sd:
        raise ModelLoadError(path, f"no VAE weights (encoder.*/decoder.*) found{_describe_other_kind(list(state))}")
    try:
        return vae_from_ldm(vae_sd, base)
    except ConversionError as exc:
        raise ModelLoadError(path, str(exc)) from None


def build_pipeline(components: CheckpointComponents, *, vae: Any | None = None) -> Any:
    """A ready diffusers pipeline over the (shared) components with a fresh scheduler; see ``pipelines``."""
    from webui.models.pipelines import build_pipeline as build

    return build(components, vae=vae)
