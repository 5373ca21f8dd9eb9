"""What a DiT-family file is, from its safetensors header only (keys, shapes, metadata; never tensors).

``probe_header(header)`` -> ``DitProbe | None``: a transformer (Flux.1 in BFL or diffusers layout, SD3/3.5 in
Stability or diffusers layout, possibly with its text encoders / VAE inside, Qwen-Image), a split text encoder
(CLIP-L / CLIP-G / T5 / Qwen2.5-VL, HF transformers key names as ComfyUI users have them) or a 16-channel VAE
(the Qwen-Image facts, Wan-layout VAE included, live in ``qwen_parts``).
``webui.models.detect._probe_dit`` turns it into a ``Match``.  ``DIT_PIPELINES`` tells diffusers folders apart
by their ``model_index.json`` pipeline class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from webui.models.safetensors_header import SafetensorsHeader
from webui.types import Arch, ModelKind, Variant

TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "transformer.")
VAE_PREFIXES = ("", "first_stage_model.", "vae.")
# SD3 single files may carry their text encoders (sd3_medium_incl_clips, ...): part -> key prefix.
EMBEDDED_TEXT_ENCODERS = MappingProxyType({
    "clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
})
# What each family needs besides the transformer (T5 is optional for SD3, as in diffusers).
NEEDED_PARTS = MappingProxyType({Arch.FLUX: ("clip_l", "t5xxl", "vae"), Arch.SD3: ("clip_l", "clip_g", "vae"),
                                 Arch.QWEN_IMAGE: ("qwen2.5-vl", "vae")})
OPTIONAL_PARTS = MappingProxyType({Arch.SD3: ("t5xxl",)})
CHROMA_PARTS = ("t5xxl", "vae")  # Chroma (a Flux derivative, Arch.FLUX): T5-XXL only, no CLIP
FLUX_VARIANTS = MappingProxyType({64: Variant.NORMAL, 384: Variant.INPAINT})  # 384: Flux.1 Fill

# diffusers pipeline class -> (arch, variant, family label)
DIT_PIPELINES = MappingProxyType({
    "FluxPipeline": (Arch.FLUX, Variant.NORMAL, "Flux.1"),
    "FluxImg2ImgPipeline": (Arch.FLUX, Variant.NORMAL, "Flux.1"),
    "FluxKontextPipeline": (Arch.FLUX, Variant.EDIT, "Flux.1 Kontext"),
    "FluxFillPipeline": (Arch.FLUX, Variant.INPAINT, "Flux.1 Fill"),
    "ChromaPipeline": (Arch.FLUX, Variant.NORMAL, "Chroma"),
    "ChromaImg2ImgPipeline": (Arch.FLUX, Variant.NORMAL, "Chroma"),
    "StableDiffusion3Pipeline": (Arch.SD3, Variant.NORMAL, "SD3"),
    "StableDiffusion3Img2ImgPipeline": (Arch.SD3, Variant.NORMAL, "SD3"),
    "QwenImagePipeline": (Arch.QWEN_IMAGE, Variant.NORMAL, "Qwen-Image"),
    "QwenImageEditPipeline": (Arch.QWEN_IMAGE, Variant.EDIT, "Qwen-Image-Edit"),
    "QwenImageEditPlusPipeline": (Arch.QWEN_IMAGE, Variant.EDIT, "Qwen-Image-Edit"),
})


@dataclass(frozen=True)
class DitProbe:
    kind: ModelKind
    arch: Arch = Arch.UNKNOWN
    variant: Variant = Variant.NORMAL
    family: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _shape(h: SafetensorsHeader, key: str) -> tuple[int, ...] | None:
    info = h.tensors.get(key)
    return tuple(info.shape) if info is not None else None


def _transformer_prefix(h: SafetensorsHeader, marker: str) -> str | None:
    return next((p for p in TRANSFORMER_PREFIXES if h.has_prefix(p + marker)), None)


def _is_adapter(h: SafetensorsHeader) -> bool:
    """LoRAs and ControlNets reuse transformer key names; they are not ours."""
    return any(("lora" in k.lower() or k.startswith(("controlnet", "control_")) or ".hada_" in k or ".lokr_" in k)
               for k in h.tensors)


def _parts(h: SafetensorsHeader, arch: Arch, needed: tuple[str, ...] = ()) -> dict[str, Any]:
    included = [part for part, prefix in EMBEDDED_TEXT_ENCODERS.items() if h.has_prefix(prefix)]
    if any(h.has_prefix(p + "decoder.") for p in VAE_PREFIXES[1:]):
        included.append("vae")
    needs = [p for p in needed or NEEDED_PARTS[arch] if p not in included]
    optional = [p for p in OPTIONAL_PARTS.get(arch, ()) if p not in included]
    return {"included": included, "needs": needs, "optional": optional}


def _chroma(h: SafetensorsHeader, prefix: str, fmt: str) -> DitProbe:
    """Chroma: Flux blocks without modulation weights + ``distilled_guidance_layer.*`` (BFL or diffusers layout)."""
    shape = _shape(h, prefix + ("img_in.weight" if fmt == "bfl" else "x_embedder.weight"))
    if shape is None or len(shape) != 2:
        from webui.models.detect import BrokenModel  # lazy: that module imports this one

        raise BrokenModel(f"Chroma transformer has no {prefix}img_in / x_embedder weight: incomplete file")
    details: dict[str, Any] = {"format": fmt, "prefix": prefix, "width": shape[0], "in_channels": shape[1],
                               "config_key": "chroma", **_parts(h, Arch.FLUX, CHROMA_PARTS)}
    if shape[1] != 64:
        details["unsupported"] = (f"Chroma transformer with {shape[1]} input channels (not the 16-channel latent "
                                  "model, e.g. Chroma Radiance) is not supported")
    return DitProbe(ModelKind.CHECKPOINT, Arch.FLUX, Variant.NORMAL, "Chroma", details)


def _flux(h: SafetensorsHeader, prefix: str) -> DitProbe:
    if h.has_prefix(prefix + "distilled_guidance_layer."):
        return _chroma(h, prefix, "bfl")
    img_in = _shape(h, prefix + "img_in.weight")
    if img_in is None or len(img_in) != 2:
        from webui.models.detect import BrokenModel  # lazy: that module imports this one

        raise BrokenModel(f"Flux transformer has no {prefix}img_in.weight: incomplete file")
    guidance = h.has_prefix(prefix + "guidance_in.")
    details: dict[str, Any] = {"format": "bfl", "prefix": prefix, "width": img_in[0], "in_channels": img_in[1],
                               "guidance": guidance, **_parts(h, Arch.FLUX)}
    variant = FLUX_VARIANTS.get(img_in[1])
    if variant is None:
        details["unsupported"] = (f"Flux transformer with {img_in[1]} input channels (Depth/Canny control "
                                  "models) is not supported; Flux.1 dev/schnell/Kontext take 64, Fill 384")
        variant = Variant.NORMAL
    text = " ".join(h.metadata.get(k, "") for k in ("modelspec.architecture", "modelspec.title")).lower()
    if "kontext" in text:
        variant = Variant.EDIT
    name = {Variant.EDIT: "Flux.1 Kontext", Variant.INPAINT: "Flux.1 Fill"}.get(
        variant, "Flux.1 dev" if guidance else "Flux.1 schnell")
    details["config_key"] = "flux-dev" if guidance else "flux-schnell"
    return DitProbe(ModelKind.CHECKPOINT, Arch.FLUX, variant, name, details)


def _sd3(h: SafetensorsHeader, prefix: str, fmt: str) -> DitProbe:
    qk = h.has_prefix(prefix + ("joint_blocks.0.x_block.attn.ln_q" if fmt == "sd3" else "transformer_blocks.0.attn.norm_q"))
    details: dict[str, Any] = {"format": fmt, "prefix": prefix, "config_key": "sd3", **_parts(h, Arch.SD3)}
    return DitProbe(ModelKind.CHECKPOINT, Arch.SD3, Variant.NORMAL, "SD3.5" if qk else "SD3", details)


def _qwen(h: SafetensorsHeader, prefix: str) -> DitProbe:
    from webui.models.dit import qwen_parts  # lazy: it imports the DiT loaders

    variant, family, details = qwen_parts.transformer_facts(h, prefix)
    return DitProbe(ModelKind.CHECKPOINT, Arch.QWEN_IMAGE, variant, family, {**details, **_parts(h, Arch.QWEN_IMAGE)})


def _transformer(h: SafetensorsHeader) -> DitProbe | None:
    if (p := _transformer_prefix(h, "double_blocks.")) is not None:
        return _flux(h, p)
    if (p := _transformer_prefix(h, "joint_blocks.")) is not None:
        return _sd3(h, p, "sd3")
    if (p := _transformer_prefix(h, "transformer_blocks.0.img_mod.")) is not None:
        return _qwen(h, p)
    if (p := _transformer_prefix(h, "single_transformer_blocks.")) is not None:
        probe = _flux_from_diffusers_layout(h, p)
        return probe
    if (p := _transformer_prefix(h, "transformer_blocks.0.attn.add_q_proj.")) is not None \
            and h.has_prefix(p + "pos_embed.proj."):
        return _sd3(h, p, "diffusers")
    return None


def _flux_from_diffusers_layout(h: SafetensorsHeader, prefix: str) -> DitProbe:
    if h.has_prefix(prefix + "distilled_guidance_layer."):
        return _chroma(h, prefix, "diffusers")
    x = _shape(h, prefix + "x_embedder.weight") or (0, 0)
    guidance = h.has_prefix(prefix + "time_text_embed.guidance_embedder.")
    details = {"format": "diffusers", "prefix": prefix, "width": x[0], "in_channels": x[1], "guidance": guidance,
               "config_key": "flux-dev" if guidance else "flux-schnell", **_parts(h, Arch.FLUX)}
    variant = FLUX_VARIANTS.get(x[1], Variant.NORMAL)
    if x[1] not in FLUX_VARIANTS:
        details["unsupported"] = f"Flux transformer with {x[1]} input channels is not supported"
    return DitProbe(ModelKind.CHECKPOINT, Arch.FLUX, variant, "Flux.1 dev" if guidance else "Flux.1 schnell", details)


# ---------------------------------------------------------------------------------------------- parts
def text_encoder_facts(h: SafetensorsHeader) -> dict[str, Any] | None:
    """Which split text encoder a file holds: ``{"encoder": clip_l|clip_g|clip|t5xxl|t5|qwen2.5-vl, ...}``."""
    for prefix in ("text_model.", ""):
        tokens = _shape(h, prefix + "embeddings.token_embedding.weight")
        if tokens is not None and h.has_prefix(prefix + "encoder.layers.") and not h.has_prefix("vision_model."):
            width = tokens[1]
            name = {768: "clip_l", 1280: "clip_g"}.get(width, "clip")
            return {"encoder": name, "width": width, "format": "transformers", "text_model_prefix": prefix,
                    "projection": "text_projection.weight" in h.tensors}
    if h.has_prefix("encoder.block.0.layer.0.SelfAttention.") and (
            "shared.weight" in h.tensors or "encoder.embed_tokens.weight" in h.tensors):
        width = (_shape(h, "shared.weight") or _shape(h, "encoder.embed_tokens.weight"))[1]
        return {"encoder": "t5xxl" if width == 4096 else "t5", "width": width, "format": "transformers"}
    from webui.models.dit import qwen_parts  # lazy: it imports the DiT loaders

    qwen = qwen_parts.text_encoder_facts(h)
    if qwen is not None:
        return qwen
    return None


def vae16_facts(h: SafetensorsHeader) -> dict[str, Any] | None:
    """A 16-latent-channel AutoencoderKL (Flux ae.safetensors, SD3 VAE), ldm or diffusers layout."""
    for prefix in VAE_PREFIXES:
        conv_in = _shape(h, prefix + "decoder.conv_in.weight")
        if conv_in is not None and len(conv_in) == 4 and conv_in[1] == 16:
            fmt = "diffusers" if h.has_prefix(prefix + "decoder.up_blocks.") else "ldm"
            return {"format": fmt, "latent_channels": 16, "prefix": prefix,
                    "has_encoder": h.has_prefix(prefix + "encoder."), "vae_family": "SD3/Flux"}
    return None


def probe_header(h: SafetensorsHeader) -> DitProbe | None:
    """A DiT transformer, a split text encoder or a 16-channel VAE; ``None`` for anything else."""
    if _is_adapter(h):
        return None
    found = _transformer(h)
    if found is not None:
        return found
    te = text_encoder_facts(h)
    if te is not None:
        return DitProbe(ModelKind.TEXT_ENCODER, details=te)
    vae = vae16_facts(h)
    if vae is not None:
        return DitProbe(ModelKind.VAE, family="SD3/Flux", details=vae)
    from webui.models.dit import qwen_parts  # lazy: it imports the DiT loaders

    qwen_vae = qwen_parts.vae_facts(h)
    if qwen_vae is not None:
        return DitProbe(ModelKind.VAE, Arch.QWEN_IMAGE, family="Qwen-Image", details=qwen_vae)
    return None


# ---------------------------------------------------------------------------------------------- diffusers folders
def folder_facts(folder, index: dict[str, Any]) -> DitProbe:
    """A DiT diffusers folder from its ``model_index.json`` (already read) and component configs.
    Raises ``ValueError`` naming the missing piece for an incomplete copy."""
    import json
    from pathlib import Path

    folder = Path(folder)
    name = str(index.get("_class_name", ""))
    arch, variant, family = DIT_PIPELINES[name]
    components = sorted(k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None)
    missing = [c for c in components if not (folder / c).is_dir()]
    if missing:
        raise ValueError(f"diffusers folder lists {', '.join(missing)} in model_index.json but the folder(s) are "
                         "missing: incomplete copy")
    config_path = folder / "transformer" / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"transformer/config.json cannot be read ({exc}): incomplete copy") from None
    details: dict[str, Any] = {"format": "diffusers", "pipeline": name, "components": components,
                               "included": components, "needs": [], "warnings": []}
    if name.startswith("Flux") and variant is Variant.NORMAL:
        guidance = bool(config.get("guidance_embeds", True))
        family = "Flux.1 dev" if guidance else "Flux.1 schnell"
    return DitProbe(ModelKind.CHECKPOINT, arch, variant, family, details)
