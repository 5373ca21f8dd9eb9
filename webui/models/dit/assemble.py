"""One DiT checkpoint record -> ``DitComponents``, through the RAM cache, with its parts found in the catalog.

A diffusers folder is one cache entry (like an SD checkpoint).  A single transformer file (``models/unet``,
``models/Stable-diffusion``) is assembled from parts cached one by one under their own file keys -- the
transformer, each split text encoder, the VAE -- so Flux dev and schnell share one T5-XXL in RAM and switching
back is a cache hit for every part.  Parts are looked up in the catalog (``models/text_encoders`` +
``models/clip``, ``models/VAE``); the T5 tokenizer in ``<text_encoders>/t5_tokenizer`` or any Flux/SD3
diffusers folder.  Anything missing raises ``DitLoadError`` naming the folder and the file to put there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from webui.models.cache import ComponentCache, module_bytes
from webui.models.dit import configs
from webui.models.dit.components import DitComponents, DitLoadError
from webui.models.dit.loaders import (PIPELINE_FOR, clip_tokenizer, is_tokenizer_folder, load_dit_folder,
                                      load_text_encoder_file, load_transformer_file, load_vae_file, t5_tokenizer)
from webui.types import Arch, ModelKind

log = logging.getLogger(__name__)
DIT_ARCHES = frozenset({Arch.FLUX, Arch.SD3, Arch.QWEN_IMAGE})
PART_LABELS = {"clip_l": ("CLIP-L", "clip_l.safetensors"), "clip_g": ("CLIP-G", "clip_g.safetensors"),
               "t5xxl": ("T5-XXL", "t5xxl_fp16.safetensors")}
# family -> (text encoder part, diffusers component, role) in pipeline order
SLOTS = {Arch.FLUX: (("clip_l", "text_encoder", "clip_l"), ("t5xxl", "text_encoder_2", "t5xxl")),
         Arch.SD3: (("clip_l", "text_encoder", "clip_l_proj"), ("clip_g", "text_encoder_2", "clip_g"),
                    ("t5xxl", "text_encoder_3", "t5xxl"))}
# Flux derivatives with their own slots / pipeline, by detection ``config_key`` (Chroma: T5-XXL only)
FAMILY_SLOTS = {"chroma": (("t5xxl", "text_encoder", "t5xxl"),)}
FAMILY_PIPELINES = {"chroma": "ChromaPipeline"}
T5_TOKENIZER_FOLDER = "t5_tokenizer"


def is_dit(record: Any) -> bool:
    return record.arch in DIT_ARCHES


@dataclass(frozen=True)
class Where:
    """Where parts live, for lookups and messages."""

    text_encoder_roots: tuple[Path, ...]
    vae_roots: tuple[Path, ...]


def _file_key(kind: str, record: Any) -> tuple:
    return (kind, str(record.path), record.size, record.mtime)


def _cached(cache: ComponentCache, key: tuple, build: Callable[[], Any], hits: list[bool]) -> Any:
    value = cache.get(key)
    hits.append(value is not None)
    if value is None:
        value = build()
        cache.put(key, value, module_bytes(value) if isinstance(value, torch.nn.Module) else _bytes(value))
    return value


def _bytes(value: Any) -> int:
    import dataclasses

    return sum(module_bytes(getattr(value, f.name)) for f in dataclasses.fields(value)
               if isinstance(getattr(value, f.name), torch.nn.Module))


def _folder_text(roots: Sequence[Path]) -> str:
    return " or ".join(str(r) for r in roots[:2]) or "models/text_encoders"


# ---------------------------------------------------------------------------------------------- finding parts
def find_text_encoder(part: str, records: Sequence[Any], *, family: str, model: Path, where: Where,
                      required: bool = True) -> Any | None:
    """The catalog record of a split text encoder: by detected type; for unusual widths (test models), the
    narrowest CLIP is L and the widest G."""
    usable = [r for r in records if r.usable and r.detection is not None]
    enc = {r: r.detection.details.get("encoder") for r in usable}
    if part == "t5xxl":
        found = [r for r in usable if enc[r] in ("t5xxl", "t5")]
    else:
        found = [r for r in usable if enc[r] == part]
        generic = sorted((r for r in usable if enc[r] == "clip"), key=lambda r: r.detection.details.get("width", 0))
        if not found and generic:
            found = [generic[0] if part == "clip_l" else generic[-1]]
    found.sort(key=lambda r: ("fp8" in r.filename.lower(), r.name))
    if found or not required:
        return found[0] if found else None
    label, example = PART_LABELS[part]
    present = ", ".join(r.filename for r in records) or "nothing"
    raise DitLoadError(model, f"{family} needs a {label} text encoder: put {example} in "
                              f"{_folder_text(where.text_encoder_roots)} (found there: {present})")


def find_t5_tokenizer(where: Where, checkpoints: Sequence[Any], *, family: str, model: Path) -> Path:
    for root in where.text_encoder_roots:
        if is_tokenizer_folder(root / T5_TOKENIZER_FOLDER):
            return root / T5_TOKENIZER_FOLDER
    for record in checkpoints:  # a Flux / SD3 diffusers folder carries one
        if record.format == "diffusers" and record.arch in (Arch.FLUX, Arch.SD3):
            folder = record.path / ("tokenizer" if record.family == "Chroma" else
                                    "tokenizer_2" if record.arch is Arch.FLUX else "tokenizer_3")
            if is_tokenizer_folder(folder):
                return folder
    target = (where.text_encoder_roots or (Path("models/text_encoders"),))[0] / T5_TOKENIZER_FOLDER
    raise DitLoadError(model, f"{family} needs the T5 tokenizer, which is not bundled and cannot be downloaded: "
                              f"copy tokenizer_2/ from the FLUX.1-dev repository (or tokenizer_3/ from SD3.5) into "
                              f"{target} (tokenizer.json or spiece.model, with tokenizer_config.json)")


def find_vae(vae_record: Any | None, records: Sequence[Any], *, family: str, model: Path, where: Where) -> Any:
    """The user's VAE choice (must be 16-channel), else the first usable 16-channel VAE in the catalog."""
    def channels(r: Any) -> int | None:
        return r.detection.details.get("latent_channels") if r.detection is not None else None

    if vae_record is not None:
        if channels(vae_record) != 16:
            raise DitLoadError(vae_record.path, f"{family} needs a 16-channel VAE; this VAE has "
                                                f"{channels(vae_record) or 'unknown'} latent channels: pick another "
                                                "or leave the VAE on Automatic")
        return vae_record
    found = sorted((r for r in records if r.usable and channels(r) == 16), key=lambda r: r.name)
    if not found:
        example = ("ae.safetensors" if family.startswith(("Flux", "Chroma"))
                   else "the SD3 VAE (diffusion_pytorch_model.safetensors)")
        folders = " or ".join(str(r) for r in where.vae_roots[:1]) or "models/VAE"
        raise DitLoadError(model, f"{family} has no VAE inside: put its 16-channel VAE ({example}) in {folders}")
    return found[0]


# ---------------------------------------------------------------------------------------------- assembling
def split_part_records(record: Any, catalog: Any, *, with_vae: bool = True) -> list[Any]:
    """The split text encoders (and VAE) that a single DiT transformer file would be assembled with, found as
    ``load_dit`` finds them but nothing loaded: what the memory estimate counts before loading.  Best effort:
    a part that cannot be found is left out (the load itself then says what is missing)."""
    if not is_dit(record) or record.format == "diffusers" or record.detection is None:
        return []
    from webui.models.dit import qwen_parts

    details = record.detection.details
    family = record.family or record.arch.value
    te_records = catalog.list(ModelKind.TEXT_ENCODER.value)
    te_roots, vae_roots = catalog.roots(ModelKind.TEXT_ENCODER.value), catalog.roots(ModelKind.VAE.value)
    where = Where(te_roots, vae_roots)
    finders = {
        "vae": lambda: (qwen_parts.find_vae(None, catalog.list(ModelKind.VAE.value), family=family, model=record.path,
                                            roots=vae_roots) if record.arch is Arch.QWEN_IMAGE else
                        find_vae(None, catalog.list(ModelKind.VAE.value), family=family, model=record.path,
                                 where=where)),
        "qwen2.5-vl": lambda: qwen_parts.find_text_encoder(te_records, family=family, model=record.path,
                                                           roots=te_roots, text_width=details.get("text_width")),
    }
    found = []
    for part in (*details.get("needs", ()), *details.get("optional", ())):
        if part == "vae" and not with_vae:
            continue
        finder = finders.get(part) or (lambda part=part: find_text_encoder(
            part, te_records, family=family, model=record.path, where=where, required=False))
        try:
            match = finder()
        except DitLoadError:
            match = None
        if match is not None and match not in found:
            found.append(match)
    return found


def stored(transformer: Any, storage: str, dtype: torch.dtype) -> Any:
    """The transformer with its weights kept as ``storage`` ("fp8" or "": as loaded); see memory.store_weights."""
    from webui.runtime.memory import store_weights

    store_weights(transformer, storage, dtype)
    return transformer


def load_dit(record: Any, *, catalog: Any, cache: ComponentCache, vae_record: Any | None, dtype: torch.dtype,
             allow_pickle: bool = False, storage: str = "") -> tuple[DitComponents, Any | None, bool]:
    """``(components, vae module overriding the model's own or None, cache hit)`` for a DiT checkpoint record;
    ``storage`` "fp8": the transformer's weights in float8, cached under their own key."""
    hits: list[bool] = []
    family = record.family or record.arch.value

    def folder() -> DitComponents:
        components = load_dit_folder(record.path, dtype=dtype, allow_pickle=allow_pickle, family=family)
        stored(components.transformer, storage, dtype)
        return components

    if record.format == "diffusers":
        components = _cached(cache, (*_file_key("dit-folder", record), storage), folder, hits)
        vae = None
        if vae_record is not None and record.arch is Arch.QWEN_IMAGE:  # the Wan-layout VAE: webui.models.dit.qwen_parts
            from webui.models.dit import qwen_parts, qwen_vae

            chosen = qwen_parts.find_vae(vae_record, (), family=family, model=record.path, roots=())
            vae = _cached(cache, (*_file_key("dit-vae", chosen), "qwen_image"),
                          lambda: qwen_vae.load_vae(chosen.path, dtype=dtype), hits)
        elif vae_record is not None:
            where = Where(catalog.roots(ModelKind.TEXT_ENCODER.value), catalog.roots(ModelKind.VAE.value))
            chosen = find_vae(vae_record, (), family=family, model=record.path, where=where)
            vae = _cached(cache, (*_file_key("dit-vae", chosen), record.arch.value),
                          lambda: load_vae_file(chosen.path, record.arch.value, dtype=dtype), hits)
        return components, vae, all(hits)
    if record.arch is Arch.QWEN_IMAGE:  # ComfyUI split layout: webui.models.dit.qwen_parts
        from webui.models.dit import qwen_parts

        components = qwen_parts.load_split(record, catalog=catalog, cache=cache, vae_record=vae_record, dtype=dtype,
                                           hits=hits, storage=storage)
        return components, None, all(hits)
    details = record.detection.details if record.detection is not None else {}
    config_key = str(details.get("config_key", record.arch.value))
    slots = FAMILY_SLOTS.get(config_key) or SLOTS.get(record.arch)
    if slots is None:
        raise DitLoadError(record.path, f"single {family} transformer files cannot be loaded yet: use the "
                                        f"{family} diffusers folder in models/Stable-diffusion")
    where = Where(catalog.roots(ModelKind.TEXT_ENCODER.value), catalog.roots(ModelKind.VAE.value))
    included = tuple(details.get("included", ()))
    te_records = catalog.list(ModelKind.TEXT_ENCODER.value)
    modules: dict[str, Any] = {}
    parts: dict[str, str] = {"transformer": str(record.path)}
    plan = []
    for part, component, role in slots:
        if part in included:
            continue
        optional = record.arch is Arch.SD3 and part == "t5xxl"
        te = find_text_encoder(part, te_records, family=family, model=record.path, where=where, required=not optional)
        plan.append((part, component, role, te))
    needs_t5 = any(part == "t5xxl" and te is not None for part, _c, _r, te in plan) or "t5xxl" in included
    t5_folder = find_t5_tokenizer(where, catalog.list(ModelKind.CHECKPOINT.value), family=family,
                                  model=record.path) if needs_t5 else None
    vae_choice = None
    if "vae" not in included or vae_record is not None:
        vae_choice = find_vae(vae_record, catalog.list(ModelKind.VAE.value), family=family, model=record.path,
                              where=where)
    # the file itself: transformer (+ embedded text encoders / VAE), each cached under the file's key
    want = tuple(p for p in included if p != "vae" or vae_choice is None)
    keys = {name: (*_file_key("dit-file", record), name, storage if name == "transformer" else "")
            for name in ("transformer", *want)}
    if all(k in cache for k in keys.values()):
        for name, key in keys.items():
            modules[name] = _cached(cache, key, lambda: None, hits)
    else:
        loaded = load_transformer_file(record.path, arch=record.arch, details=details, dtype=dtype,
                                       family=family, want=want)
        stored(loaded["transformer"], storage, dtype)
        for name, module in loaded.items():
            parts.setdefault(name, str(record.path))
            cache.put(keys.get(name, (*_file_key("dit-file", record), name)), module, module_bytes(module))
        modules.update(loaded)
        hits.append(False)
    for part, component, role, te in plan:
        if te is not None:
            modules[part] = _cached(cache, (*_file_key("text-encoder", te), role),
                                    lambda te=te, role=role: load_text_encoder_file(te.path, role, dtype=dtype), hits)
            parts[part] = str(te.path)
    if vae_choice is not None:
        modules["vae"] = _cached(cache, (*_file_key("dit-vae", vae_choice), record.arch.value),
                                 lambda: load_vae_file(vae_choice.path, record.arch.value, dtype=dtype), hits)
        parts["vae"] = str(vae_choice.path)
    fields: dict[str, Any] = {}
    for part, component, _role in slots:
        fields[component] = modules.get(part)
    fields["tokenizer"] = clip_tokenizer()
    if config_key in FAMILY_SLOTS:  # Chroma: the T5 in the first slot
        fields["tokenizer"] = t5_tokenizer(t5_folder) if t5_folder else None
    elif record.arch is Arch.FLUX:
        fields["tokenizer_2"] = t5_tokenizer(t5_folder) if t5_folder else None
    else:
        fields["tokenizer_2"] = clip_tokenizer("!")
        fields["tokenizer_3"] = t5_tokenizer(t5_folder) if t5_folder and fields.get("text_encoder_3") else None
    if t5_folder:
        parts["t5_tokenizer"] = str(t5_folder)
    pipeline_class = FAMILY_PIPELINES.get(config_key) or PIPELINE_FOR[(record.arch, record.variant)]
    components = DitComponents(
        transformer=modules["transformer"], vae=modules.get("vae"), **fields,
        scheduler_config=dict(configs.SCHEDULERS[config_key]), pipeline_class=pipeline_class,
        arch=record.arch, variant=record.variant, config_key=config_key, source=record.path, family=family,
        parts=parts,
    )
    return components, None, all(hits)
