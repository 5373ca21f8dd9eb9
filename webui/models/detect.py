"""What is this file?  Pure detection over safetensors headers (keys, shapes, metadata; never tensors).

``detect`` runs every detector in ``DETECTORS`` (a registry, not an if-chain), keeps every outcome for
diagnostics and picks the match with the best explicit priority.  A detector returns a ``Match``, returns
``None`` ("not mine"), or raises ``BrokenModel`` ("mine, but broken").  ``detect_path`` handles a file
(pickles are never opened; GGUF files through ``detect_gguf``) or a diffusers folder
(``webui.models.detect_folder``).

Architecture comes from key *structure* first (tiny test fixtures share it with real files and only have
smaller widths), then real-sized widths confirm it: a disagreement is reported in ``details["warnings"]``.
Reading and validating headers lives in ``webui.models.safetensors_header`` (re-exported here:
``read_header``, ``SafetensorsHeader``, ``BrokenModelFile``, ...); the structural and metadata facts, and
the declarative tables they are matched against (``TEXT_ENCODER_LAYOUTS``, ``UNET_SPECS``), live in
``webui.models.header_facts``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from webui.models.header_facts import (
    CONTEXT_WIDTH_ARCH,
    DIT_MARKERS,
    FAMILY_BY_ARCH,
    FAMILY_FIELDS_BASE,
    FAMILY_FIELDS_SELF,
    arch_family,
    arch_from_unet,
    diffusers_unet_facts,
    header_prediction,
    ldm_unet_facts,
    lora_facts,
    metadata_arch,
    text_encoder_arch,
)
from webui.models.dit.detect import probe_header as dit_probe_header
from webui.models.gguf_header import GGUF_SUFFIXES, gguf_text_encoder, quantization_summary, read_gguf_header
from webui.models.ip_adapter import adapter_facts, clip_vision_facts
from webui.models.t2i_adapter import adapter_facts as t2i_adapter_facts
from webui.models.safetensors_header import (  # the header API, re-exported for existing importers
    SAFETENSORS_SUFFIXES,
    BrokenModelFile,
    SafetensorsHeader,
    TensorInfo,
    parse_header,
    read_header,
)
from webui.types import Arch, ModelKind, Prediction, Variant

__all__ = [
    "BrokenModel", "BrokenModelFile", "Detection", "Detector", "DETECTORS", "Match", "SafetensorsHeader",
    "TensorInfo", "default_prediction", "detect", "detect_path", "parse_header", "read_header",
]

# Pickles are never unpickled here: their kind comes from the extension (or the folder they sit in).
PICKLE_KINDS = MappingProxyType({
    ".ckpt": ModelKind.CHECKPOINT, ".pt": ModelKind.EMBEDDING, ".bin": ModelKind.EMBEDDING,
    ".pth": ModelKind.UPSCALER,
})
VARIANT_BY_IN_CHANNELS = MappingProxyType({
    4: Variant.NORMAL, 9: Variant.INPAINT, 8: Variant.INSTRUCT_PIX2PIX, 5: Variant.DEPTH,
})


class BrokenModel(Exception):
    """Raised by a detector: the file is of its kind, but unusable (incomplete, inconsistent)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Match:
    kind: ModelKind
    arch: Arch = Arch.UNKNOWN
    variant: Variant = Variant.NORMAL
    prediction: Prediction | None = None
    family: str = ""
    details: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, kw_only=True)
class Detection(Match):
    """What a file is.  ``message`` explains an UNKNOWN result; ``details`` carries format facts,
    ``warnings``, ``unsupported`` (why it cannot be used although recognised) and ``outcomes``
    (what every detector said)."""

    message: str = ""

    @property
    def unsupported(self) -> str | None:
        return self.details.get("unsupported")


@dataclass(frozen=True)
class Detector:
    name: str
    priority: int  # lower wins when several detectors match the same header
    looks_for: str  # shown in the "unknown file" message
    probe: Callable[[SafetensorsHeader], Match | None]


# ---------------------------------------------------------------------------- shared helpers
def _confirm(arch: Arch, width: int | None, what: str, warnings: list[str]) -> None:
    width_arch = CONTEXT_WIDTH_ARCH.get(width) if width else None
    if width_arch is not None and arch is not Arch.UNKNOWN and width_arch is not arch:
        warnings.append(f"key layout says {arch.value} but {what} width {width} says {width_arch.value}")


def default_prediction(detection: Detection) -> Prediction:
    """Policy when a file does not say: SD 2.x txt2img files are usually the 768-v model, so v-prediction;
    SD 2.x inpaint/depth and everything else epsilon.  A user override always beats this."""
    if detection.prediction is not None:
        return detection.prediction
    if detection.arch is Arch.SD2 and detection.variant is Variant.NORMAL:
        return Prediction.V_PREDICTION
    return Prediction.EPSILON


def _variant(in_channels: int | None, where: str) -> Variant:
    if in_channels is None:
        raise BrokenModel(f"{where} has no input convolution (input_blocks.0.0.weight): incomplete file")
    try:
        return VARIANT_BY_IN_CHANNELS[in_channels]
    except KeyError:
        raise BrokenModel(f"UNet takes {in_channels} input channels; supported are 4 (normal), 9 (inpaint), "
                          "8 (instruct-pix2pix) and 5 (depth)") from None


# ---------------------------------------------------------------------------- detectors
def _probe_checkpoint(h: SafetensorsHeader) -> Match | None:
    unet = "model.diffusion_model."
    if not h.has_prefix(unet):
        return None
    for marker, family in DIT_MARKERS:
        if h.has_prefix(unet + marker):
            return Match(kind=ModelKind.CHECKPOINT, family=family,
                         details={"unsupported": f"{family} checkpoints are not supported (only SD 1.x/2.x/SDXL)"})
    facts = ldm_unet_facts(h, unet)
    variant = _variant(facts.in_channels, "checkpoint")
    te_arch = text_encoder_arch(h)
    unet_arch = arch_from_unet(facts)
    warnings: list[str] = []
    if te_arch and unet_arch and te_arch is not unet_arch:
        warnings.append(f"text encoder keys say {te_arch.value} but the UNet layout says {unet_arch.value}")
    arch = te_arch or unet_arch or CONTEXT_WIDTH_ARCH.get(facts.context_width or 0) or Arch.UNKNOWN
    _confirm(arch, facts.context_width, "cross-attention", warnings)
    details: dict[str, Any] = {
        "format": "ldm", "in_channels": facts.in_channels, "context_width": facts.context_width,
        "has_text_encoder": te_arch is not None, "has_vae": h.has_prefix("first_stage_model."),
        "ztsnr": "ztsnr" in h.tensors, "warnings": warnings,
    }
    if arch is Arch.UNKNOWN:
        details["unsupported"] = f"UNet layout not recognised ({facts.describe()})"
    return Match(kind=ModelKind.CHECKPOINT, arch=arch, variant=variant, prediction=header_prediction(h),
                 family=arch_family(arch, h.metadata, FAMILY_FIELDS_SELF), details=details)


def _probe_dit(h: SafetensorsHeader) -> Match | None:
    """Flux.1 / SD3 / Qwen-Image transformers (with or without ``model.diffusion_model.``), their split text
    encoders and 16-channel VAEs: ``webui.models.dit.detect.probe_header``.  Runs before the SD checkpoint
    detector, which would call an SD3 single file an unsupported checkpoint."""
    probe = dit_probe_header(h)
    if probe is None:
        return None
    return Match(kind=probe.kind, arch=probe.arch, variant=probe.variant, family=probe.family,
                 details={**probe.details, "warnings": list(probe.details.get("warnings", ()))})


def _probe_controlnet(h: SafetensorsHeader) -> Match | None:
    if "lora_controlnet" in h.tensors:
        return Match(kind=ModelKind.CONTROLNET, details={"format": "control-lora",
                     "unsupported": "Control-LoRA files are not supported; use a full ControlNet"})
    if h.has_prefix("control_model."):
        facts, fmt = ldm_unet_facts(h, "control_model."), "ldm"
    elif h.has_prefix("input_hint_block.") and h.has_prefix("zero_convs."):
        facts, fmt = ldm_unet_facts(h, ""), "ldm"
    elif h.has_prefix("controlnet_cond_embedding."):
        facts, fmt = diffusers_unet_facts(h, ""), "diffusers"
    else:
        return None
    if facts.in_channels is None:
        raise BrokenModel("ControlNet has no input convolution: incomplete file")
    warnings: list[str] = []
    arch = arch_from_unet(facts) or CONTEXT_WIDTH_ARCH.get(facts.context_width or 0) or Arch.UNKNOWN
    _confirm(arch, facts.context_width, "cross-attention", warnings)
    return Match(kind=ModelKind.CONTROLNET, arch=arch, family=FAMILY_BY_ARCH[arch],
                 details={"format": fmt, "context_width": facts.context_width, "warnings": warnings})


def _probe_t2i_adapter(h: SafetensorsHeader) -> Match | None:
    """TencentARC (``conv_in``/``body.*``) or diffusers (``adapter.*``) T2I-Adapters: a ControlNet-folder model
    (``webui.models.t2i_adapter``); full_adapter / light_adapter = SD 1.x, full_adapter_xl = SDXL."""
    try:
        facts = t2i_adapter_facts({k: v.shape for k, v in h.tensors.items()})
    except ValueError as exc:
        raise BrokenModel(str(exc)) from None
    if facts is None:
        return None
    details: dict[str, Any] = {"format": "t2i_adapter", "layout": facts.layout, "adapter_type": facts.adapter_type,
                               "in_channels": facts.in_channels, "warnings": []}
    if facts.unsupported:
        details["unsupported"] = facts.unsupported
    return Match(kind=ModelKind.CONTROLNET, arch=facts.arch, family=FAMILY_BY_ARCH[facts.arch], details=details)


def _probe_vae(h: SafetensorsHeader) -> Match | None:
    for prefix in ("", "first_stage_model."):
        for fmt, enc, dec in (("ldm", "encoder.down.", "decoder.up."),
                              ("diffusers", "encoder.down_blocks.", "decoder.up_blocks.")):
            if h.has_prefix(prefix + enc) or h.has_prefix(prefix + dec):
                return _vae_match(h, prefix, fmt, enc, dec)
    return None


def _vae_match(h: SafetensorsHeader, prefix: str, fmt: str, enc: str, dec: str) -> Match:
    if not h.has_prefix(prefix + dec):
        raise BrokenModel(f"VAE has encoder weights ({prefix}{enc}*) but no decoder ({prefix}{dec}*)")
    conv_in = h.tensors.get(prefix + "decoder.conv_in.weight")
    if conv_in is None or conv_in.ndim != 4:
        raise BrokenModel(f"VAE has no {prefix}decoder.conv_in.weight: incomplete file")
    latent = conv_in.shape[1]
    details: dict[str, Any] = {"format": fmt, "latent_channels": latent, "has_encoder": h.has_prefix(prefix + enc)}
    if latent != 4:
        details["unsupported"] = f"{latent}-channel VAE (SD3/Flux style); SD 1.x/2.x/SDXL use 4 latent channels"
    arch = metadata_arch(h.metadata) or Arch.UNKNOWN  # SD and SDXL VAEs have identical shapes
    return Match(kind=ModelKind.VAE, arch=arch, family=FAMILY_BY_ARCH[arch], details=details)


def _probe_lora(h: SafetensorsHeader) -> Match | None:
    facts = lora_facts(h)
    if facts is None:
        return None
    if facts.unpaired:
        raise BrokenModel(f"LoRA layer {facts.unpaired[0]!r} is missing its other half "
                          f"({len(facts.unpaired)} incomplete layers): incomplete or corrupted file")
    details: dict[str, Any] = {
        "format": facts.format, "parts": facts.parts, "layers": facts.layers, "rank": facts.rank,
        "context_width": facts.context_width, "te_width": facts.te_width, "warnings": [],
        "candidates": facts.candidates(),  # archs the key layout allows, for a mismatch check when arch is unknown
    }
    from webui.models.lora.dit_keymap import dit_lora_arch  # lazy: the LoRA engine imports this module

    dit = dit_lora_arch({k: v.shape for k, v in h.tensors.items()}, h.metadata)
    if dit is not None:  # Flux / SD3 / Qwen-Image (UNKNOWN: a transformer LoRA of an undecided family)
        details["candidates"] = (dit.value,) if dit is not Arch.UNKNOWN else ("flux", "sd3", "qwen_image")
        return Match(kind=ModelKind.LORA, arch=dit, family=FAMILY_BY_ARCH[dit], details=details)
    if "dit" in facts.parts:
        details["unsupported"] = "LoRA for a transformer (DiT) model in a layout this WebUI does not know"
        return Match(kind=ModelKind.LORA, details=details)
    arch = facts.structural_arch() or metadata_arch(h.metadata) or facts.width_arch() or Arch.UNKNOWN
    _confirm(arch, facts.context_width, "cross-attention", details["warnings"])
    if arch in (Arch.SD1, Arch.SD2) and facts.te_width in (768, 1024):
        _confirm(arch, facts.te_width, "text-encoder", details["warnings"])
    return Match(kind=ModelKind.LORA, arch=arch, family=arch_family(arch, h.metadata, FAMILY_FIELDS_BASE),
                 details=details)


def _probe_embedding(h: SafetensorsHeader) -> Match | None:
    t = h.tensors
    if "clip_l" in t or "clip_g" in t:
        if not ("clip_l" in t and "clip_g" in t):
            raise BrokenModel("SDXL embedding needs both clip_l and clip_g vectors; one is missing")
        if t["clip_l"].shape[:1] != t["clip_g"].shape[:1]:
            raise BrokenModel(f"SDXL embedding has {t['clip_l'].shape[0]} clip_l vectors but "
                              f"{t['clip_g'].shape[0]} clip_g vectors")
        return Match(kind=ModelKind.EMBEDDING, arch=Arch.SDXL, family="SDXL",
                     details={"format": "sdxl", "vectors": t["clip_l"].shape[0]})
    key = "emb_params" if "emb_params" in t else next(iter(h.keys_with_prefix("string_to_param.")), None)
    fmt = "a1111"
    if key is None and len(t) == 1:  # diffusers-style single vector file: only trust real widths
        key, fmt = next(iter(t)), "single"
        if t[key].ndim not in (1, 2) or t[key].shape[-1] not in (768, 1024):
            return None
    if key is None:
        return None
    info = t[key]
    if info.ndim not in (1, 2):
        raise BrokenModel(f"embedding tensor {key!r} has shape {list(info.shape)}; expected [vectors, width]")
    width = info.shape[-1]
    arch = {768: Arch.SD1, 1024: Arch.SD2}.get(width, Arch.UNKNOWN)
    return Match(kind=ModelKind.EMBEDDING, arch=arch, family=FAMILY_BY_ARCH[arch],
                 details={"format": fmt, "vectors": info.shape[0] if info.ndim == 2 else 1, "width": width})


def _probe_ip_adapter(h: SafetensorsHeader) -> Match | None:
    try:
        facts = adapter_facts({k: v.shape for k, v in h.tensors.items()})
    except ValueError as exc:
        raise BrokenModel(str(exc)) from None
    if facts is None:
        return None
    details: dict[str, Any] = {"format": "ip-adapter", "ip_adapter": facts, "warnings": []}
    _confirm(facts["arch"], facts["context_width"], "cross-attention", details["warnings"])
    if facts["unsupported"]:
        details["unsupported"] = facts["unsupported"]
    return Match(kind=ModelKind.IP_ADAPTER, arch=facts["arch"], family=FAMILY_BY_ARCH[facts["arch"]], details=details)


def _probe_clip_vision(h: SafetensorsHeader) -> Match | None:
    try:
        facts = clip_vision_facts({k: v.shape for k, v in h.tensors.items()})
    except ValueError as exc:
        raise BrokenModel(str(exc)) from None
    if facts is None:
        return None
    details: dict[str, Any] = {"format": "transformers", "clip_vision": facts}
    if facts["unsupported"]:
        details["unsupported"] = facts["unsupported"]
    return Match(kind=ModelKind.CLIP_VISION, details=details)


DETECTORS: Mapping[str, Detector] = MappingProxyType({d.name: d for d in (
    Detector("controlnet", 10, "control_model.*, input_hint_block.* or controlnet_cond_embedding.* keys",
             _probe_controlnet),
    Detector("t2i_adapter", 12, "conv_in + body.N.block1 (TencentARC) or adapter.body.* (diffusers) T2I-Adapter "
             "keys", _probe_t2i_adapter),
    Detector("ip_adapter", 15, "image_proj.* + ip_adapter.N.to_k_ip keys (IP-Adapter)", _probe_ip_adapter),
    Detector("checkpoint", 20, "model.diffusion_model.* keys (ldm/sgm single-file checkpoint)", _probe_checkpoint),
    Detector("dit", 18, "double_blocks.*/joint_blocks.*/img_mod keys (Flux/SD3/Qwen-Image), CLIP/T5 text "
             "encoder keys or a 16-channel VAE", _probe_dit),
    Detector("vae", 30, "encoder.down.*/decoder.up.* (ldm) or encoder.down_blocks.* (diffusers) keys", _probe_vae),
    Detector("lora", 40, "lora_down/lora_up, lora_A/lora_B, hada_*, lokr_* or dora_scale keys", _probe_lora),
    Detector("clip_vision", 45, "vision_model.* keys (CLIP vision encoder)", _probe_clip_vision),
    Detector("embedding", 50, "emb_params, string_to_param.* or clip_l + clip_g keys", _probe_embedding),
)})


def detect(header: SafetensorsHeader, detectors: Mapping[str, Detector] = DETECTORS) -> Detection:
    """Run every detector; the best-priority match wins.  A "broken" verdict from a detector that ranks
    above every match raises ``BrokenModelFile``; no match at all gives kind UNKNOWN with a message."""
    outcomes: dict[str, str] = {}
    matches: list[tuple[Detector, Match]] = []
    broken: list[tuple[Detector, BrokenModel]] = []
    for det in sorted(detectors.values(), key=lambda d: (d.priority, d.name)):
        try:
            match = det.probe(header)
        except (BrokenModel, IndexError, KeyError, TypeError, ValueError) as exc:
            # a malformed shape (e.g. a 0-d tensor where a matrix belongs) is "broken" for its claimant
            exc = exc if isinstance(exc, BrokenModel) else BrokenModel(
                f"unexpected tensor layout for a {det.name} ({type(exc).__name__}: {exc})")
            outcomes[det.name] = f"broken: {exc.reason}"
            broken.append((det, exc))
            continue
        if match is None:
            outcomes[det.name] = f"no match (looks for {det.looks_for})"
        else:
            outcomes[det.name] = f"match: {match.kind.value} {match.arch.value}"
            matches.append((det, match))
    where = header.path if header.path is not None else "<header>"
    if broken and (not matches or broken[0][0].priority < matches[0][0].priority):
        raise BrokenModelFile(where, broken[0][1].reason)
    if not matches:
        sample = ", ".join(sorted(header.tensors)[:5]) or "no tensors"
        said = "; ".join(f"{name}: {text}" for name, text in outcomes.items())
        return Detection(kind=ModelKind.UNKNOWN, details={"outcomes": outcomes}, message=(
            f"not a model type this WebUI recognises ({len(header.tensors)} tensors, e.g. {sample}). "
            f"What each detector said: {said}"))
    det, m = matches[0]
    details = {**m.details, "detector": det.name, "outcomes": outcomes}
    return Detection(kind=m.kind, arch=m.arch, variant=m.variant, prediction=m.prediction, family=m.family,
                     details=details)


# ---------------------------------------------------------------------------- paths
def detect_path(path: os.PathLike | str, *, hint: ModelKind | None = None) -> Detection:
    """Detect a file or a diffusers folder.  Pickles (.ckpt/.pt/.bin/.pth) are never opened: their kind
    is ``hint`` (the folder they were found in) or comes from the extension."""
    path = Path(path)
    if path.is_dir():
        from webui.models.detect_folder import detect_diffusers_folder  # lazy: it imports this module

        return detect_diffusers_folder(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return detect(read_header(path))
    if suffix in GGUF_SUFFIXES:
        return detect_gguf(read_gguf_header(path))
    if suffix in PICKLE_KINDS:
        if not path.is_file():
            raise BrokenModelFile(path, "file does not exist")
        return Detection(kind=hint or PICKLE_KINDS[suffix], details={"pickle": True},
                         message="pickle file: not inspected (it could run code when loaded)")
    return Detection(kind=ModelKind.UNKNOWN, message=f"unsupported file type {suffix or '(none)'}")


def detect_gguf(header: SafetensorsHeader) -> Detection:
    """A GGUF file (``webui.models.gguf_header``): the same detectors over its names and logical shapes, plus
    ``details["file_format"] = "gguf"`` and ``details["quantization"]`` ("Q4_K, Q8_0").  Only DiT transformers
    load from GGUF; GGUF language models / text encoders are recognised and refused."""
    refused = gguf_text_encoder(header)
    if refused is not None:  # kind UNKNOWN: the catalog shows this message in whatever folder the file is
        return Detection(kind=ModelKind.UNKNOWN, message=refused, details={
            "file_format": "gguf", "unsupported": refused, "quantization": quantization_summary(header.tensors)})
    found = detect(header)
    details = {**found.details, "file_format": "gguf", "quantization": quantization_summary(header.tensors)}
    if found.kind is ModelKind.UNKNOWN:
        arch = header.metadata.get("general.architecture", "unknown")
        return replace(found, message=f"GGUF model of architecture {arch!r} is not supported (GGUF loads Flux.1, "
                                      f"SD3/3.5 and Qwen-Image transformers). {found.message}")
    if found.kind is not ModelKind.CHECKPOINT or found.arch not in (Arch.FLUX, Arch.SD3, Arch.QWEN_IMAGE):
        details.setdefault("unsupported", f"GGUF {found.kind.value} files are not supported: only DiT "
                                          "transformers (Flux.1, SD3/3.5, Qwen-Image) load from GGUF")
    return replace(found, details=details)
