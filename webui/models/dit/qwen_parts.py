"""Qwen-Image / Qwen-Image-Edit in the ComfyUI split layout: detection facts, key conversion, loaders, lookup.

* transformer (``qwen_image_bf16.safetensors``): diffusers key names already, maybe under
  ``model.diffusion_model.``; Base / Edit / Edit Plus share shapes, so ``variant_of`` decides from ComfyUI's
  ``__index_timestep_zero__`` marker (Edit-2511), ``modelspec`` metadata or the file name (``QWEN_VARIANTS``).
* text encoder (``qwen_2.5_vl_7b.safetensors``): ComfyUI / HF 4.x names -> transformers 5
  ``Qwen2_5_VLForConditionalGeneration``; config from shapes, vision token ids from the tokenizer.
* VAE (``qwen_image_vae.safetensors``): Wan-2.1 layout -> ``AutoencoderKLQwenImage`` by a table built from the
  file's own block list.
* tokenizer / processor: ``<text_encoders>/qwen_tokenizer/`` or a Qwen-Image diffusers folder; never downloaded.
See docs/dit.md ("Qwen-Image split layout").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import torch

from webui.models.dit.components import DitComponents, DitLoadError
from webui.models.dit.configs import _shape
from webui.models.dit.convert import ConversionError, count_blocks
from webui.models.dit.qwen_vae import load_vae
from webui.types import Arch, ModelKind, Variant

StateDict = dict[str, torch.Tensor]
Shapes = Mapping[str, Sequence[int]]
ZERO_COND_MARKER = "__index_timestep_zero__"  # ComfyUI's flag for Qwen-Image-Edit-2511 (an empty tensor)
TOKENIZER_FOLDER = "qwen_tokenizer"
SCALED_SUFFIXES = (".weight_scale", ".scale_weight", ".comfy_quant", "scaled_fp8")  # ComfyUI scaled / quantized files
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
SCHEDULER = MappingProxyType({  # Qwen-Image's published scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
    "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential"})
# rope splits that shapes cannot show: published values for the real head widths, a fixed split for test widths
TRANSFORMER_ROPE = MappingProxyType({128: (16, 56, 56)})
TEXT_MROPE = MappingProxyType({128: (16, 24, 24)})
TEXT_HEAD, VISION_HEAD, VISION_WINDOW, FULL_ATTENTION_EVERY = 128, 80, 112, 8
TEST_HEAD = 16  # head width of widths that are not multiples of the real ones (tiny test models)


@dataclass(frozen=True)
class QwenVariant:
    words: tuple[str, ...]  # all must appear in the metadata / file name (lower case)
    variant: Variant
    family: str
    pipeline: str
    zero_cond_t: bool = False


QWEN_VARIANTS = (
    QwenVariant(("edit", "2511"), Variant.EDIT, "Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", True),
    QwenVariant(("edit", "2509"), Variant.EDIT, "Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline"),
    QwenVariant(("edit",), Variant.EDIT, "Qwen-Image-Edit", "QwenImageEditPipeline"),
)
QWEN_BASE = QwenVariant((), Variant.NORMAL, "Qwen-Image", "QwenImagePipeline")
# ComfyUI / HF 4.x text encoder prefix -> transformers 5 prefix (identity rows: files already in the 5.x layout)
TEXT_ENCODER_PREFIXES = (
    ("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."), ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."), ("visual.", "model.visual."), ("lm_head.", "lm_head."),
)
TEXT_ENCODER_LAYOUTS = (("model.layers.", "visual.", "comfy"),
                        ("model.language_model.layers.", "model.visual.", "transformers"))


# ---------------------------------------------------------------------------------------------- detection facts
def variant_of(keys: Iterable[str], metadata: Mapping[str, str], filename: str) -> tuple[QwenVariant, str]:
    """(variant, what decided it) for a transformer file: the 2511 marker key, else metadata, else the name."""
    if any(k.endswith(ZERO_COND_MARKER) for k in keys):
        return QWEN_VARIANTS[0], f"{ZERO_COND_MARKER} key"
    meta = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "modelspec.title")).lower()
    for text, source in ((meta, "metadata"), (filename.lower(), "file name")):
        found = next((v for v in QWEN_VARIANTS if all(w in text for w in v.words)), None)
        if found is not None:
            return found, source
    return QWEN_BASE, "default (no 'edit' in metadata or file name)"


def transformer_facts(h: Any, prefix: str) -> tuple[Variant, str, dict[str, Any]]:
    """(variant, family, details) of a Qwen-Image transformer file from its header."""
    found, source = variant_of(h.tensors, h.metadata, h.path.name if h.path is not None else "")
    txt_in = h.tensors.get(prefix + "txt_in.weight")
    details = {"format": "diffusers", "prefix": prefix, "config_key": "qwen-image", "pipeline": found.pipeline,
               "zero_cond_t": found.zero_cond_t, "variant_from": source,
               "text_width": int(txt_in.shape[1]) if txt_in is not None and len(txt_in.shape) == 2 else None}
    if any(k.endswith(SCALED_SUFFIXES) for k in h.tensors):
        details["unsupported"] = ("scaled-fp8 / quantized ComfyUI transformer files are not supported: use the "
                                  "bf16 (or plain fp8_e4m3fn) file")
    return found.variant, found.family, details


def text_encoder_facts(h: Any) -> dict[str, Any] | None:
    """A Qwen2.5-VL file (language model + vision tower) in the ComfyUI or transformers 5 layout."""
    for layers, visual, layout in TEXT_ENCODER_LAYOUTS:
        if h.has_prefix(layers + "0.self_attn.q_proj.") and h.has_prefix(visual):
            embed = h.tensors.get(layers.removesuffix("layers.") + "embed_tokens.weight")
            return {"encoder": "qwen2.5-vl", "format": layout, "vision": True,
                    "width": int(embed.shape[1]) if embed is not None else None}
    if h.has_prefix("language_model.model.layers.0.self_attn.q_proj.") and h.has_prefix("visual."):
        return {"encoder": "qwen2.5-vl", "format": "unknown", "unsupported": "this Qwen2.5-VL key layout "
                "(language_model.model.*) is not supported: use ComfyUI's qwen_2.5_vl_7b.safetensors"}
    return None


def vae_facts(h: Any) -> dict[str, Any] | None:
    """The Qwen-Image VAE (Wan-2.1 layout: ``encoder.conv1`` 5-D, ``decoder.middle.*``, ``conv2``)."""
    conv = h.tensors.get("encoder.conv1.weight")
    if conv is None or len(conv.shape) != 5 or not h.has_prefix("decoder.middle.0.residual."):
        return None
    post = h.tensors.get("conv2.weight")
    z_dim = int(post.shape[0]) if post is not None else None
    details: dict[str, Any] = {"format": "wan2.1", "z_dim": z_dim, "vae_family": "Qwen-Image", "has_encoder": True}
    if z_dim != 16 or h.has_prefix("decoder.upsamples.0.upsamples."):
        details["unsupported"] = (f"a {z_dim}-channel Wan VAE (Wan 2.2 layout?) is not the Qwen-Image VAE: "
                                  "use qwen_image_vae.safetensors")
    return details


# ---------------------------------------------------------------------------------------------- configs from shapes
def transformer_config(shapes: Shapes, *, zero_cond_t: bool = False) -> dict[str, Any]:
    what = "Qwen-Image transformer"
    inner, in_channels = _shape(shapes, "img_in.weight", what)
    head = _shape(shapes, "transformer_blocks.0.attn.norm_q.weight", what)[0]
    if inner % head:
        raise ConversionError(f"{what}: width {inner} does not divide into heads of {head}")
    half = head // 2
    return {
        "patch_size": 2, "in_channels": in_channels, "out_channels": _shape(shapes, "proj_out.weight", what)[0] // 4,
        "num_layers": count_blocks(shapes, "transformer_blocks"), "attention_head_dim": head,
        "num_attention_heads": inner // head, "joint_attention_dim": _shape(shapes, "txt_in.weight", what)[1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        "axes_dims_rope": TRANSFORMER_ROPE.get(head, (half // 2, 3 * half // 4, 3 * half // 4)),
        "zero_cond_t": zero_cond_t,
        "use_additional_t_cond": "time_text_embed.addition_t_embedding.weight" in shapes,
    }


def _head(width: int, real: int) -> int:
    return real if width % real == 0 else TEST_HEAD


def text_encoder_config(shapes: Shapes, token_ids: Mapping[str, int]) -> dict[str, Any]:
    """``Qwen2_5_VLConfig`` kwargs for transformers-5 keys; ``token_ids``: the vision tokens of the tokenizer."""
    what = "Qwen2.5-VL text encoder"
    lm = "model.language_model."
    vocab, hidden = _shape(shapes, lm + "embed_tokens.weight", what)
    head = _head(hidden, TEXT_HEAD)
    depth = count_blocks(shapes, "model.visual.blocks")
    v_hidden, v_in, temporal, patch = _shape(shapes, "model.visual.patch_embed.proj.weight", what)[:4]
    merge = math.isqrt(_shape(shapes, "model.visual.merger.mlp.0.weight", what)[1] // v_hidden)
    text = {
        "hidden_size": hidden, "intermediate_size": _shape(shapes, lm + "layers.0.mlp.gate_proj.weight", what)[0],
        "num_hidden_layers": count_blocks(shapes, lm + "layers"),
        "num_attention_heads": _shape(shapes, lm + "layers.0.self_attn.q_proj.weight", what)[0] // head,
        "num_key_value_heads": _shape(shapes, lm + "layers.0.self_attn.k_proj.weight", what)[0] // head,
        "vocab_size": vocab, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_section": list(TEXT_MROPE.get(head, (head // 8, head // 8, head // 4))),
                         "rope_type": "default", "type": "default"},
    }
    vision = {
        "depth": depth, "hidden_size": v_hidden, "in_channels": v_in, "temporal_patch_size": temporal,
        "patch_size": patch, "spatial_merge_size": merge, "num_heads": v_hidden // _head(v_hidden, VISION_HEAD),
        "intermediate_size": _shape(shapes, "model.visual.blocks.0.mlp.gate_proj.weight", what)[0],
        "out_hidden_size": _shape(shapes, "model.visual.merger.mlp.2.weight", what)[0],
        "window_size": VISION_WINDOW, "tokens_per_second": 2,
        "fullatt_block_indexes": [i for i in range(depth) if (i + 1) % FULL_ATTENTION_EVERY == 0 or i == depth - 1],
    }
    return {"text_config": text, "vision_config": vision, "vocab_size": vocab,
            "tie_word_embeddings": "lm_head.weight" not in shapes,
            "vision_start_token_id": token_ids["<|vision_start|>"], "vision_end_token_id": token_ids["<|vision_end|>"],
            "image_token_id": token_ids["<|image_pad|>"], "video_token_id": token_ids["<|video_pad|>"]}


# ---------------------------------------------------------------------------------------------- key conversion
def text_encoder_to_transformers(sd: StateDict) -> StateDict:
    """ComfyUI / HF 4.x Qwen2.5-VL keys -> transformers 5; every key must map."""
    out, leftover = {}, []
    for key, tensor in sd.items():
        rule = next(((a, b) for a, b in TEXT_ENCODER_PREFIXES if key.startswith(a)), None)
        if rule is None:
            leftover.append(key)
        else:
            out[rule[1] + key[len(rule[0]):]] = tensor
    if leftover:
        raise ConversionError(f"Qwen2.5-VL text encoder: {len(leftover)} unknown keys (e.g. {', '.join(leftover[:3])})")
    return out


def text_encoder_to_comfy(sd: StateDict) -> StateDict:
    """The inverse (ComfyUI names), for writing fixture files."""
    back = [(b, a) for a, b in TEXT_ENCODER_PREFIXES[2:]]
    return {next(a + k[len(b):] for b, a in back if k.startswith(b)): t for k, t in sd.items()}


# ---------------------------------------------------------------------------------------------- loaders
def load_transformer(path: str | Path, details: Mapping[str, Any], *, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    from webui.models.dit.gguf_loader import build_quantized, logical_shape, read_gguf_state
    from webui.models.dit.loaders import _read, _strict, _take
    from webui.models.gguf_header import GGUF_SUFFIXES

    path = Path(path)
    gguf = path.suffix.lower() in GGUF_SUFFIXES  # city96 qwen-image-Q4_K_M.gguf: same (diffusers) key names
    state = read_gguf_state(path) if gguf else _read(path, dtype)
    prefix = str(details.get("prefix", ""))
    sd = _take(state, prefix) if prefix else state
    sd.pop(ZERO_COND_MARKER, None)
    try:
        config = transformer_config({k: logical_shape(v) for k, v in sd.items()},
                                    zero_cond_t=bool(details.get("zero_cond_t")))
    except ConversionError as exc:
        raise DitLoadError(path, f"{exc}: the file is incomplete or not a Qwen-Image transformer") from None
    if gguf:  # quantized linear layers stay quantized (webui.models.dit.gguf_loader)
        config.pop("_class_name", None)
        return build_quantized(QwenImageTransformer2DModel, config, sd, dtype=dtype, path=path,
                               component="Qwen-Image transformer")
    return _strict(lambda: QwenImageTransformer2DModel.from_config(config), sd, "Qwen-Image transformer", path)


def load_text_encoder(path: str | Path, tokenizer: Any, *, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from webui.models.dit.loaders import _read, _strict

    path = Path(path)
    ids = token_ids(tokenizer, path)
    try:
        sd = text_encoder_to_transformers(_read(path, dtype))
        kwargs = text_encoder_config({k: v.shape for k, v in sd.items()}, ids)
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = Qwen2_5_VLConfig(**kwargs | special | {"text_config": kwargs["text_config"] | special})
    except ConversionError as exc:
        raise DitLoadError(path, f"{exc}: not a complete Qwen2.5-VL file (qwen_2.5_vl_7b.safetensors)") from None
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]
    return _strict(lambda: Qwen2_5_VLForConditionalGeneration(config), sd, "Qwen2.5-VL text encoder", path)


def token_ids(tokenizer: Any, where: Path) -> dict[str, int]:
    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))))
    unknown = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise DitLoadError(where, f"the tokenizer has no {', '.join(unknown)} token: it is not the Qwen2.5-VL "
                                  f"tokenizer (copy tokenizer/ of the Qwen-Image repository to {TOKENIZER_FOLDER}/)")
    return ids


# ---------------------------------------------------------------------------------------------- finding parts
def _is_tokenizer(folder: Path, processor: bool) -> bool:
    files = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    has = "tokenizer_config.json" in files and bool({"tokenizer.json", "vocab.json"} & files)
    return has and (not processor or bool({"preprocessor_config.json", "processor_config.json"} & files))


def find_tokenizer(roots: Sequence[Path], checkpoints: Sequence[Any], *, edit: bool, family: str,
                   model: Path) -> Path:
    """The tokenizer folder (Edit: a processor folder, which carries the tokenizer too)."""
    for root in roots:
        if _is_tokenizer(root / TOKENIZER_FOLDER, edit):
            return root / TOKENIZER_FOLDER
    for record in checkpoints:  # a Qwen-Image(-Edit) diffusers folder carries both
        if record.format == "diffusers" and record.arch is Arch.QWEN_IMAGE:
            folder = record.path / ("processor" if edit else "tokenizer")
            if _is_tokenizer(folder, edit):
                return folder
    target = (tuple(roots) or (Path("models/text_encoders"),))[0] / TOKENIZER_FOLDER
    if edit:
        have = " (the folder there has no preprocessor_config.json)" if _is_tokenizer(target, False) else ""
        raise DitLoadError(model, f"{family} needs the Qwen2.5-VL processor (tokenizer + image preprocessor), which is "
                                  f"not bundled and cannot be downloaded: copy processor/ from the Qwen-Image-Edit "
                                  f"repository into {target}{have}")
    raise DitLoadError(model, f"{family} needs the Qwen2.5-VL tokenizer, which is not bundled and cannot be "
                              f"downloaded: copy tokenizer/ from the Qwen-Image repository (or processor/ from "
                              f"Qwen-Image-Edit) into {target} (vocab.json, merges.txt, tokenizer_config.json)")


def load_tokenizer(folder: Path, *, edit: bool) -> tuple[Any, Any | None]:
    """(tokenizer, processor or None) from a folder, offline."""
    from transformers import AutoTokenizer, Qwen2VLProcessor

    try:
        if edit:
            processor = Qwen2VLProcessor.from_pretrained(str(folder), local_files_only=True)
            return processor.tokenizer, processor
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), None
    except (OSError, ValueError, TypeError) as exc:
        raise DitLoadError(folder, f"cannot read the Qwen2.5-VL {'processor' if edit else 'tokenizer'} "
                                   f"({str(exc).splitlines()[0]})") from None


def find_text_encoder(records: Sequence[Any], *, family: str, model: Path, roots: Sequence[Path],
                      text_width: int | None) -> Any:
    usable = [r for r in records if r.usable and r.detection is not None
              and r.detection.details.get("encoder") == "qwen2.5-vl"]
    fitting = [r for r in usable if text_width is None or r.detection.details.get("width") in (None, text_width)]
    fitting.sort(key=lambda r: ("fp8" in r.filename.lower(), r.name))
    if fitting:
        return fitting[0]
    folder = " or ".join(str(r) for r in roots[:2]) or "models/text_encoders"
    if usable:
        r = usable[0]
        raise DitLoadError(r.path, f"this Qwen2.5-VL is {r.detection.details.get('width')} wide but {family} "
                                   f"({model.name}) reads {text_width}-wide text features: put the 7B "
                                   f"qwen_2.5_vl_7b.safetensors in {folder}")
    present = ", ".join(f"{r.filename} ({(r.detection.details.get('encoder') if r.detection else None) or 'unknown'})"
                        for r in records) or "nothing"
    raise DitLoadError(model, f"{family} needs its Qwen2.5-VL text encoder: put qwen_2.5_vl_7b.safetensors in "
                              f"{folder} (found there: {present})")


def find_vae(vae_record: Any | None, records: Sequence[Any], *, family: str, model: Path,
             roots: Sequence[Path]) -> Any:
    def is_qwen(r: Any) -> bool:
        return r.detection is not None and r.detection.details.get("vae_family") == "Qwen-Image"

    if vae_record is not None:
        if not is_qwen(vae_record):
            raise DitLoadError(vae_record.path, f"{family} needs the Qwen-Image VAE (Wan-2.1 layout); this is not "
                                                "it: pick qwen_image_vae or leave the VAE on Automatic")
        return vae_record
    found = sorted((r for r in records if r.usable and is_qwen(r)),
                   key=lambda r: ("qwen" not in r.name.lower(), r.name))
    if not found:
        folder = " or ".join(str(r) for r in roots[:1]) or "models/VAE"
        raise DitLoadError(model, f"{family} has no VAE inside: put qwen_image_vae.safetensors in {folder}")
    return found[0]


# ---------------------------------------------------------------------------------------------- assembling
def load_split(record: Any, *, catalog: Any, cache: Any, vae_record: Any | None, dtype: torch.dtype,
               hits: list[bool], storage: str = "") -> DitComponents:
    """A single Qwen-Image transformer file + its split text encoder, VAE and tokenizer / processor; every
    module cached under its own file's key (the text encoder also under the tokenizer's vision token ids)."""
    from webui.models.dit.assemble import _cached, _file_key, stored

    details = record.detection.details if record.detection is not None else {}
    family = record.family or "Qwen-Image"
    edit = record.variant is Variant.EDIT
    te_roots, vae_roots = catalog.roots(ModelKind.TEXT_ENCODER.value), catalog.roots(ModelKind.VAE.value)
    te = find_text_encoder(catalog.list(ModelKind.TEXT_ENCODER.value), family=family, model=record.path,
                           roots=te_roots, text_width=details.get("text_width"))
    folder = find_tokenizer(te_roots, catalog.list(ModelKind.CHECKPOINT.value), edit=edit, family=family,
                            model=record.path)
    vae_choice = find_vae(vae_record, catalog.list(ModelKind.VAE.value), family=family, model=record.path,
                          roots=vae_roots)
    tokenizer, processor = load_tokenizer(folder, edit=edit)
    ids = tuple(token_ids(tokenizer, folder).values())
    transformer = _cached(cache, (*_file_key("dit-file", record), "transformer", storage),
                          lambda: stored(load_transformer(record.path, details, dtype=dtype), storage, dtype), hits)
    text_encoder = _cached(cache, (*_file_key("text-encoder", te), "qwen2.5-vl", ids),
                           lambda: load_text_encoder(te.path, tokenizer, dtype=dtype), hits)
    vae = _cached(cache, (*_file_key("dit-vae", vae_choice), "qwen_image"),
                  lambda: load_vae(vae_choice.path, dtype=dtype), hits)
    parts = {"transformer": str(record.path), "qwen2.5-vl": str(te.path), "vae": str(vae_choice.path),
             "qwen_tokenizer": str(folder)}
    return DitComponents(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
        scheduler_config=dict(SCHEDULER), pipeline_class=str(details.get("pipeline", QWEN_BASE.pipeline)),
        arch=Arch.QWEN_IMAGE, variant=record.variant, config_key="qwen-image", source=record.path, family=family,
        parts=parts)
