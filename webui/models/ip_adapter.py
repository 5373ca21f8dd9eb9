"""IP-Adapter reference images: adapter files (``models/ipadapter``), CLIP vision encoders
(``models/clip_vision``), and attaching both to a pipeline's UNet for one job.

Files (h94/IP-Adapter ``.safetensors`` layout, the one every UI uses):

- adapter: ``image_proj.*`` (the image projection) + ``ip_adapter.N.to_k_ip.weight`` / ``.to_v_ip.weight``, N = 1,
  3, 5 ... over the UNet's cross-attention layers (16 in SD 1.x, 70 in SDXL).  ``image_proj.proj.weight``: base
  IP-Adapter, fed the encoder's projected ``image_embeds``; ``image_proj.latents`` + ``layers.*``: IP-Adapter Plus
  (a resampler over the encoder's penultimate hidden states); ``image_proj.proj.{0..3}``: full-face, hidden states
  too.  FaceID adapters need InsightFace face embeddings and are reported as unsupported.
- encoder: transformers ``CLIPVisionModelWithProjection`` keys (``vision_model.*`` + ``visual_projection.weight``),
  one ``.safetensors``, optionally with a ``config.json`` beside it.  Without one, the config comes from tensor
  shapes plus the head count / activation of the known CLIP widths (``KNOWN_HEADS``): never from the hub.

Attaching uses diffusers' own converters (``UNet2DConditionModel._convert_ip_adapter_*``, what
``pipe.load_ip_adapter`` runs for a state dict) directly on the UNet, so the pipeline object is never changed
(no ``image_encoder``/``feature_extractor`` registration); the images are encoded here and passed as
``ip_adapter_image_embeds``.  ``IpAdapterAttachment.detach`` puts back the very processor objects, the
``encoder_hid_proj`` attribute and the config value that were there before; weights of existing layers are
never written (the UNet is shared by every ``from_pipe`` view and patched by the LoRA patcher).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from webui.types import Arch, ModelKind, RequestError

log = logging.getLogger(__name__)

IMAGE_PROJ, IP_LAYERS = "image_proj.", "ip_adapter."
VISION, VISUAL_PROJECTION = "vision_model.", "visual_projection.weight"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROSS_LAYERS = {16: Arch.SD1, 70: Arch.SDXL}  # cross-attention layers of the UNet -> arch (16 + width 1024: SD 2.x)
WIDTH_ARCH = {768: Arch.SD1, 1024: Arch.SD2, 2048: Arch.SDXL}
ARCH_LABELS = {Arch.SD1: "SD 1.x", Arch.SD2: "SD 2.x", Arch.SDXL: "SDXL", Arch.SDXL_REFINER: "SDXL refiner"}
KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}  # ViT-B, ViT-L, ViT-H, ViT-bigG
QUICK_GELU = {768, 1024}  # OpenAI's ViT-B/L; the LAION ViT-H/bigG use gelu
EXAMPLES = {  # (input, width) -> the encoder people download for it
    ("projection", 1024): "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (ViT-H/14)",
    ("hidden", 1280): "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (ViT-H/14)",
    ("projection", 1280): "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors (ViT-bigG/14)",
    ("hidden", 1664): "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors (ViT-bigG/14)",
}


class IpAdapterError(RequestError):
    """Reference images cannot be used for this job; the message names the file and what to do."""


def arch_label(arch: Arch) -> str:
    return ARCH_LABELS.get(arch, arch.value)


# ---------------------------------------------------------------------------------------------- facts (pure)
def adapter_facts(shapes: Mapping[str, Sequence[int]]) -> dict[str, Any] | None:
    """What an IP-Adapter file is, from its tensor shapes; None if it is not one; ``ValueError`` if broken.

    Keys: variant, input ("projection" | "hidden": which encoder output it takes), input_width, tokens,
    context_width, layers (cross-attention layers), arch (structure first, then width), unsupported."""
    proj = {k[len(IMAGE_PROJ):]: tuple(v) for k, v in shapes.items() if k.startswith(IMAGE_PROJ)}
    ip = {k[len(IP_LAYERS):]: tuple(v) for k, v in shapes.items() if k.startswith(IP_LAYERS)}
    if not proj and not ip:
        return None
    if not proj or not ip:
        raise ValueError(f"IP-Adapter has {'image_proj' if proj else 'ip_adapter'}.* keys but no "
                         f"{'ip_adapter' if proj else 'image_proj'}.* keys: incomplete file")
    to_k = sorted((int(k.split(".")[0]), s) for k, s in ip.items() if k.endswith(".to_k_ip.weight"))
    if not to_k:
        raise ValueError("IP-Adapter has no ip_adapter.N.to_k_ip.weight layers: incomplete file")
    missing = [f"ip_adapter.{i}.to_v_ip.weight" for i, _ in to_k if f"{i}.to_v_ip.weight" not in ip]
    if missing:
        raise ValueError(f"IP-Adapter lacks {len(missing)} value layers (e.g. {missing[0]}): incomplete file")
    context = to_k[0][1][1]
    facts: dict[str, Any] = {"layers": len(to_k), "context_width": context, "unsupported": None}
    faceid = any(".to_k_lora." in k for k in ip) or "perceiver_resampler.proj_in.weight" in proj or (
        "norm.weight" in proj and "proj.0.weight" in proj and "proj.3.weight" not in proj)
    if faceid:
        facts.update(variant="IP-Adapter FaceID", input="face", input_width=0, tokens=4, unsupported=(
            "IP-Adapter FaceID needs InsightFace face embeddings, which this WebUI does not compute; "
            "use an IP-Adapter or IP-Adapter Plus file"))
    elif "proj.weight" in proj:
        facts.update(variant="IP-Adapter", input="projection", input_width=proj["proj.weight"][1],
                     tokens=proj["proj.weight"][0] // context)
    elif "latents" in proj and "proj_in.weight" in proj:
        facts.update(variant="IP-Adapter Plus", input="hidden", input_width=proj["proj_in.weight"][1],
                     tokens=proj["latents"][1])
    elif "proj.3.weight" in proj:
        facts.update(variant="IP-Adapter Full Face", input="hidden", input_width=proj["proj.0.weight"][1],
                     tokens=257)
    else:
        raise ValueError(f"IP-Adapter image_proj layout not recognised (e.g. image_proj.{sorted(proj)[0]})")
    arch = CROSS_LAYERS.get(len(to_k)) or WIDTH_ARCH.get(context, Arch.UNKNOWN)
    facts["arch"] = Arch.SD2 if arch is Arch.SD1 and context == 1024 else arch
    return facts


def clip_vision_facts(shapes: Mapping[str, Sequence[int]]) -> dict[str, Any] | None:
    """Widths of a transformers CLIP vision encoder from its shapes; None if it is not one."""
    if not any(k.startswith(VISION) for k in shapes):
        return None
    patch = shapes.get(VISION + "embeddings.patch_embedding.weight")
    positions = shapes.get(VISION + "embeddings.position_embedding.weight")
    fc1 = shapes.get(VISION + "encoder.layers.0.mlp.fc1.weight")
    if patch is None or positions is None or fc1 is None:
        raise ValueError("CLIP vision encoder lacks its embeddings or first layer (vision_model.embeddings.*, "
                         "vision_model.encoder.layers.0.*): incomplete file")
    layers = len({k.split(".")[3] for k in shapes if k.startswith(VISION + "encoder.layers.")})
    hidden = patch[0]
    grid = math.isqrt(positions[0] - 1)
    projection = shapes.get(VISUAL_PROJECTION)
    return {
        "hidden_size": hidden, "projection_dim": projection[0] if projection else None,
        "intermediate_size": fc1[0], "num_hidden_layers": layers, "patch_size": patch[-1],
        "image_size": grid * patch[-1], "has_text_model": any(k.startswith("text_model.") for k in shapes),
        "unsupported": None if projection else (f"no {VISUAL_PROJECTION}: IP-Adapters need a "
                                                "CLIPVisionModelWithProjection (image encoder with projection)"),
    }


def clip_vision_config(facts: Mapping[str, Any]) -> dict[str, Any]:
    """``CLIPVisionConfig`` arguments from ``clip_vision_facts``; heads/activation of known widths."""
    hidden = facts["hidden_size"]
    heads = KNOWN_HEADS.get(hidden, 16 if hidden % 16 == 0 else max(1, hidden // 64))
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size", "projection_dim")
    return {**{k: facts[k] for k in keys}, "num_attention_heads": heads, "layer_norm_eps": 1e-5,
            "hidden_act": "quick_gelu" if hidden in QUICK_GELU else "gelu"}


def encoder_fits(adapter: Mapping[str, Any], encoder: Mapping[str, Any]) -> bool:
    width = encoder.get("projection_dim" if adapter["input"] == "projection" else "hidden_size")
    return width == adapter["input_width"]


def need_text(adapter: Mapping[str, Any]) -> str:
    what = "projected image embeddings" if adapter["input"] == "projection" else "hidden states"
    example = EXAMPLES.get((adapter["input"], adapter["input_width"]))
    return f"{adapter['input_width']}-dim {what}" + (f" (e.g. {example})" if example else "")


# ---------------------------------------------------------------------------------------------- loading
def read_adapter(path: Path, dtype: Any) -> dict[str, dict[str, Any]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` as ``pipe.load_ip_adapter`` builds from a file."""
    from webui.models.loaders import read_state_dict

    state = read_state_dict(path, dtype=dtype)
    out: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in state.items():
        for prefix in (IMAGE_PROJ, IP_LAYERS):
            if key.startswith(prefix):
                out[prefix[:-1]][key[len(prefix):]] = tensor
    return out


def load_clip_vision(path: Path, dtype: Any) -> Any:
    """A ``CLIPVisionModelWithProjection`` from one file (config.json beside it, else from shapes)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from webui.models.ldm_convert import ConversionError
    from webui.models.loaders import ModelLoadError, instantiate, read_state_dict

    state = read_state_dict(path, dtype=dtype, skip=("text_model.", "text_projection", "logit_scale"))
    state.pop(VISION + "embeddings.position_ids", None)  # a buffer older transformers saved
    config_file = path.parent / "config.json"
    if config_file.is_file() and path.stem.startswith("model"):
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        args = {**raw.get("vision_config", raw)}
        args.setdefault("projection_dim", raw.get("projection_dim", 512))
        args = {k: v for k, v in args.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    else:
        facts = clip_vision_facts({k: tuple(v.shape) for k, v in state.items()})
        if facts is None or facts["unsupported"]:
            raise ModelLoadError(path, (facts or {}).get("unsupported") or "no vision_model.* tensors: "
                                 "not a CLIP vision encoder")
        args = clip_vision_config(facts)
    try:
        return instantiate(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**args)), state,
                           "CLIP vision encoder")
    except ConversionError as exc:
        raise ModelLoadError(path, str(exc)) from None


def display_name(record: Any) -> str:
    """A ``<folder>/model.safetensors`` with its config.json shows as the folder name."""
    if (record.path.parent / "config.json").is_file() and "/" in record.name and record.path.stem.startswith("model"):
        return record.name.rsplit("/", 1)[0]
    return record.name


# ---------------------------------------------------------------------------------------------- attach / detach
@dataclass
class IpAdapterAttachment:
    """What ``attach`` did: pass ``kwargs`` to the pipeline call, add ``infotext``, call ``detach()`` after."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    infotext: dict[str, Any] = field(default_factory=dict)
    _restore: Callable[[], None] | None = None

    def detach(self) -> None:
        """Restore the UNet exactly as it was (idempotent)."""
        restore, self._restore = self._restore, None
        if restore is not None:
            restore()


def _unet_snapshot(unet: Any) -> Callable[[], None]:
    """A function that puts back the UNet state ``_load_ip_adapter_weights`` changes."""
    processors = dict(unet.attn_processors)
    hid_proj = unet.encoder_hid_proj
    dim_type = unet.config.encoder_hid_dim_type
    had_text_proj = hasattr(unet, "text_encoder_hid_proj")

    def restore() -> None:
        # first the projection: IP-Adapter Plus's resampler has attention layers of its own
        delattr(unet, "encoder_hid_proj")  # a registered submodule now; put back a plain attribute if it was one
        unet.encoder_hid_proj = hid_proj
        unet.config.encoder_hid_dim_type = dim_type  # diffusers sets the attribute the same way
        if not had_text_proj and hasattr(unet, "text_encoder_hid_proj"):
            delattr(unet, "text_encoder_hid_proj")
        unet.set_attn_processor(dict(processors))  # the same objects, so the same classes and state

    return restore


def _load_into_unet(unet: Any, states: list[dict[str, dict[str, Any]]], weights: list[float]) -> None:
    """What ``UNet2DConditionModel._load_ip_adapter_weights`` does, with diffusers' own converters, minus its final
    ``unet.to(...)``: only the new modules are moved, nothing else in the shared UNet is touched."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    unet.encoder_hid_proj = None  # as diffusers: the Plus resampler's own attention must not get IP processors
    processors = unet._convert_ip_adapter_attn_to_diffusers(states)
    for processor in processors.values():
        if hasattr(processor, "to_k_ip"):
            processor.to(device=unet.device, dtype=unet.dtype)
            processor.scale = list(weights)  # set_ip_adapter_scale with one float per adapter
    unet.set_attn_processor(processors)
    layers = [unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"]) for state in states]
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(layers).to(device=unet.device, dtype=unet.dtype)
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def _cfg_layout(pipe: Any, pos: Any, neg: Any, do_cfg: bool) -> Any:
    import torch

    if not do_cfg:
        return pos
    if "InstructPix2Pix" in type(pipe).__name__:  # these pipelines chunk (image, negative, negative)
        return torch.cat([pos, neg, neg])
    return torch.cat([neg, pos])


class IpAdapterLoader:
    """Adapters and encoders from the catalog, cached in the ``ComponentCache``; ``attach`` for one job."""

    def __init__(self, catalog: Any, cache: Any, plan: Any = None):
        import torch

        self._catalog, self._cache = catalog, cache
        self._device = getattr(plan, "device", torch.device("cpu"))
        self._dtype = getattr(plan, "dtype", torch.float32)

    # ---- lists -----------------------------------------------------------------------------
    def _folder(self, kind: ModelKind) -> str:
        roots = self._catalog.roots(kind.value)
        return str(roots[0]) if roots else f"models/{'ipadapter' if kind is ModelKind.IP_ADAPTER else 'clip_vision'}"

    def _usable(self, kind: ModelKind) -> list[Any]:
        return [r for r in self._catalog.list(kind.value) if r.usable and r.kind is kind]

    def names_for(self, arch: Arch | None = None) -> list[str]:
        """IP-Adapters for the UI dropdown (those that fit a checkpoint of ``arch``)."""
        return sorted((r.name for r in self._usable(ModelKind.IP_ADAPTER) if arch is None or r.arch is arch),
                      key=str.casefold)

    def encoder_names(self) -> list[str]:
        return sorted((display_name(r) for r in self._usable(ModelKind.CLIP_VISION)), key=str.casefold)

    def _record(self, kind: ModelKind, name: str) -> Any:
        query = name.strip()
        for candidate in (query, f"{query}/model"):
            try:
                record = self._catalog.get(kind.value, candidate)
                break
            except LookupError as exc:
                first = exc
        else:
            what = "IP-Adapter" if kind is ModelKind.IP_ADAPTER else "CLIP vision encoder"
            names = self.names_for() if kind is ModelKind.IP_ADAPTER else self.encoder_names()
            available = ", ".join(names) or f"none: put {what} .safetensors files into {self._folder(kind)}"
            raise IpAdapterError(f"{what} {name!r} not found ({first}). Available: {available}") from None
        if record.error:
            raise IpAdapterError(f"{record.filename} in {self._folder(kind)} cannot be used: {record.error}")
        return record

    @staticmethod
    def facts(record: Any) -> Mapping[str, Any]:
        details = record.detection.details if record.detection is not None else {}
        return details.get("ip_adapter") or details.get("clip_vision") or {}

    def pick_encoder(self, adapter: Any, name: str | None) -> Any:
        """The encoder ``name``, or the first (by name) whose output fits the adapter."""
        need = self.facts(adapter)
        if name:
            record = self._record(ModelKind.CLIP_VISION, name)
            if not encoder_fits(need, self.facts(record)):
                raise IpAdapterError(f"CLIP vision encoder {display_name(record)} does not fit IP-Adapter "
                                     f"{adapter.name}, which needs {need_text(need)}: pick another one or leave "
                                     "the encoder on automatic")
            return record
        fitting = [r for r in self._usable(ModelKind.CLIP_VISION) if encoder_fits(need, self.facts(r))]
        if not fitting:
            found = ", ".join(f"{display_name(r)} ({self.facts(r).get('projection_dim')}-dim projection, "
                              f"{self.facts(r).get('hidden_size')}-dim hidden)"
                              for r in self._usable(ModelKind.CLIP_VISION)) or "none"
            raise IpAdapterError(f"IP-Adapter {adapter.name} needs a CLIP vision encoder with {need_text(need)} in "
                                 f"{self._folder(ModelKind.CLIP_VISION)}; found: {found}")
        return min(fitting, key=lambda r: display_name(r).casefold())

    def check(self, record: Any, base_arch: Arch, unet: Any) -> None:
        base, facts = Arch(base_arch), self.facts(record)
        if base is Arch.SDXL_REFINER:
            raise IpAdapterError("IP-Adapter does not work with the SDXL refiner: pick an SDXL base checkpoint")
        if record.arch is not base:
            raise IpAdapterError(f"IP-Adapter {record.name} is for {arch_label(record.arch)} but the loaded checkpoint "
                                 f"is {arch_label(base)}: pick an {arch_label(base)} IP-Adapter")
        layers = sum(1 for n in unet.attn_processors if not n.endswith("attn1.processor"))
        width = unet.config.cross_attention_dim
        if (facts.get("layers"), facts.get("context_width")) != (layers, width):
            raise IpAdapterError(f"IP-Adapter {record.name} has {facts.get('layers')} layers of width "
                                 f"{facts.get('context_width')}, but this checkpoint's UNet has {layers} "
                                 f"cross-attention layers of width {width}: it is for a different model")

    # ---- cached loads ----------------------------------------------------------------------
    def _cached(self, kind: str, record: Any, load: Callable[[], Any]) -> Any:
        from webui.models.loaders import ModelLoadError

        key = (kind, str(record.path), record.size, record.mtime, str(self._dtype), str(self._device))
        value = self._cache.get(key)
        if value is None:
            try:
                value = load()
            except ModelLoadError as exc:
                raise IpAdapterError(f"{record.filename}: {exc.reason}") from None
            self._cache.put(key, value)
        return value

    def adapter_state(self, record: Any) -> dict[str, dict[str, Any]]:
        def load() -> dict[str, dict[str, Any]]:
            state = read_adapter(record.path, self._dtype)
            return {part: {k: v.to(self._device) for k, v in tensors.items()} for part, tensors in state.items()}

        return self._cached("ip_adapter", record, load)

    def encoder(self, record: Any) -> Any:
        return self._cached("clip_vision", record, lambda: load_clip_vision(record.path, self._dtype).to(self._device))

    # ---- one job ---------------------------------------------------------------------------
    def encode(self, encoder: Any, images: Sequence[Any], use_hidden: bool) -> tuple[Any, Any]:
        """(image, negative) embeddings ``[1, n_images, ...]`` as diffusers' ``encode_image`` makes them."""
        import torch
        from transformers import CLIPImageProcessor

        size = encoder.config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        param = next(encoder.parameters())
        pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        with torch.inference_mode():
            if use_hidden:
                pos = encoder(pixels, output_hidden_states=True).hidden_states[-2]
                neg = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
            else:
                pos = encoder(pixels).image_embeds
                neg = torch.zeros_like(pos)
        return pos[None], neg[None]

    def attach(self, pipe: Any, refs: Sequence[Any], *, base_arch: Arch, num_images_per_prompt: int = 1,
               do_cfg: bool = True) -> IpAdapterAttachment:
        """Load the adapters of ``refs`` (``ReferenceImages``) into ``pipe.unet``; embeddings for one prompt
        (the pipeline repeats them ``num_images_per_prompt`` times itself)."""
        if not refs:
            return IpAdapterAttachment()
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if "ip_adapter_image_embeds" not in inspect.signature(type(pipe).__call__).parameters:
            raise IpAdapterError(f"reference images (IP-Adapter) do not work with {type(pipe).__name__}")
        unet = pipe.unet
        if unet.config.encoder_hid_dim_type == "ip_image_proj":
            raise IpAdapterError("an IP-Adapter is still attached to this model (a previous job did not detach)")
        plans, embeds, infotext = [], [], {}
        for index, ref in enumerate(refs):
            record = self._record(ModelKind.IP_ADAPTER, ref.model)
            self.check(record, base_arch, unet)
            enc_record = self.pick_encoder(record, ref.image_encoder)
            facts = self.facts(record)
            pos, neg = self.encode(self.encoder(enc_record), ref.images, facts["input"] == "hidden")
            embeds.append(_cfg_layout(pipe, pos, neg, do_cfg).to(device=unet.device, dtype=unet.dtype))
            plans.append((self.adapter_state(record), float(ref.weight)))
            count = len(ref.images)
            infotext["IP-Adapter" + (f" {index + 1}" if index else "")] = (
                f"{record.name} [{_short_hash(record)}], weight {ref.weight:g}, {count} image{'s' * (count != 1)}, "
                f"encoder {display_name(enc_record)}")
        restore = _unet_snapshot(unet)
        try:
            _load_into_unet(unet, [state for state, _ in plans], [weight for _, weight in plans])
        except Exception:
            restore()
            raise
        return IpAdapterAttachment(kwargs={"ip_adapter_image_embeds": embeds}, infotext=infotext, _restore=restore)


def _short_hash(record: Any) -> str:
    from webui.models.controlnet import legacy_hash  # sd-webui-controlnet's 8-digit hash, as it shows adapters

    return legacy_hash(record.path)
