"""Detection: the stripped-header corpus (real widths), tiny fixtures (real structure), broken files."""
from __future__ import annotations

import importlib.util
import json
import pickle
import struct
import time
from pathlib import Path

import pytest

from webui.models.detect import (
    DETECTORS,
    BrokenModelFile,
    Detection,
    SafetensorsHeader,
    default_prediction,
    detect,
    detect_path,
    read_header,
)
from webui.types import Arch, ModelKind, Prediction, Variant

HEADERS = Path(__file__).resolve().parents[1] / "fixtures" / "headers"


def _corpus_module():
    spec = importlib.util.spec_from_file_location("header_corpus", HEADERS / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bc = _corpus_module()
CORPUS = sorted(p.stem for p in HEADERS.glob("*.json"))


def header_of(shapes, metadata=None) -> SafetensorsHeader:
    return SafetensorsHeader.from_shapes(shapes, metadata)


# ---------------------------------------------------------------------------- the corpus
def test_corpus_has_every_family():
    for name in ("sd15", "sd15_inpaint", "sd21_v", "sdxl_base", "sdxl_refiner", "sdxl_inpaint", "noobai_vpred",
                 "pony_v6", "lora_sd15_kohya", "lora_sdxl_kohya", "lora_sd15_locon", "lora_sd15_loha",
                 "lora_sdxl_lokr", "lora_sd15_dora", "vae_sd_ldm", "controlnet_sd15_ldm", "embedding_sd15",
                 "embedding_sdxl"):
        assert name in CORPUS


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_detection(name):
    entry = bc.load_entry(name)
    det = detect(header_of(entry["tensors"], entry["metadata"]))
    exp = entry["expected"]
    got = {"kind": det.kind.value, "arch": det.arch.value, "variant": det.variant.value,
           "prediction": det.prediction.value if det.prediction else None, "family": det.family}
    assert got == {k: exp[k] for k in got}
    for key, value in exp["details"].items():
        assert det.details.get(key) == value, key
    assert not det.details.get("warnings"), det.details["warnings"]
    assert det.unsupported is None


def test_corpus_files_are_up_to_date():
    for name, entry in bc.corpus().items():
        assert (HEADERS / f"{name}.json").read_text(encoding="utf-8") == bc.dumps(entry), (
            f"{name}.json is stale: run python tests/fixtures/headers/build_corpus.py")


def _meta(entry_tensors, prefix=""):
    torch = pytest.importorskip("torch")
    return {k[len(prefix):]: torch.empty(shape, device="meta") for k, (_, shape) in entry_tensors.items()
            if k.startswith(prefix)}


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name,arch", [("sd15", "sd1"), ("sd21_v", "sd2"), ("sdxl_base", "sdxl"),
                                       ("sdxl_refiner", "sdxl_refiner")])
def test_corpus_unet_layout_matches_diffusers(name, arch):
    """The generated ldm UNet converts (with diffusers' own converter) into exactly the diffusers model
    built from the real config: the corpus is the real layout, not an approximation."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    ckpt = _meta(bc.load_entry(name)["tensors"])
    unet = bc.diffusers_unet(arch)
    assert _shapes(sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config))) == _shapes(unet.state_dict())


def test_corpus_vae_controlnet_and_text_encoders_match_reference_models():
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import AutoencoderKL, ControlNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = bc._meta(lambda: AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                         down_block_types=("DownEncoderBlock2D",) * 4,
                                         up_block_types=("UpDecoderBlock2D",) * 4))
    ckpt = _meta(bc.load_entry("vae_sd_ldm")["tensors"])
    assert _shapes(sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config))) == _shapes(vae.state_dict())
    cn = bc._meta(lambda: ControlNetModel.from_unet(bc.diffusers_unet("sd1")))
    ckpt = _meta(bc.load_entry("controlnet_sd15_ldm")["tensors"])
    assert _shapes(sfu.convert_controlnet_checkpoint(ckpt, dict(cn.config))) == _shapes(cn.state_dict())
    clip = bc._meta(lambda: CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                         num_hidden_layers=12, num_attention_heads=12)))
    ours = {k.replace("text_model.", ""): tuple(s) for k, (_, s) in bc.load_entry("sd15")["tensors"].items()
            if k.startswith("cond_stage_model.transformer.") and not k.endswith("position_ids")}
    assert {"cond_stage_model.transformer." + k: v for k, v in _shapes(clip.state_dict()).items()
            if not k.endswith("position_ids")} == ours


@pytest.mark.parametrize("name,model,prefix", [("sd21_v", "ViT-H-14", "cond_stage_model.model."),
                                               ("sdxl_base", "ViT-bigG-14", "conditioner.embedders.1.model.")])
def test_corpus_open_clip_layout_matches_open_clip(name, model, prefix):
    open_clip = pytest.importorskip("open_clip")
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        tower = open_clip.create_model(model, pretrained=None, device="meta")
    reference = {k: v for k, v in _shapes(tower.state_dict()).items() if not k.startswith("visual.")}
    ours = {k[len(prefix):]: tuple(s) for k, (_, s) in bc.load_entry(name)["tensors"].items() if k.startswith(prefix)}
    assert ours == reference


@pytest.mark.parametrize("name,model_type", [
    ("sd15", "v1"), ("sd15_inpaint", "inpainting"), ("sd21_v", "v2"), ("sdxl_base", "xl_base"),
    ("sdxl_refiner", "xl_refiner"), ("sdxl_inpaint", "xl_inpaint"), ("noobai_vpred", "xl_base"),
    ("pony_v6", "xl_base"), ("controlnet_sd15_ldm", "controlnet"),
])
def test_diffusers_model_type_agrees(name, model_type):
    """Independent oracle: diffusers' width-based if-chain classifies the same real-width files the same way."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    assert sfu.infer_diffusers_model_type(_meta(bc.load_entry(name)["tensors"])) == model_type


# ---------------------------------------------------------------------------- tiny fixtures: structure wins
def test_tiny_sd1_structure_beats_small_widths():
    det = detect(header_of(bc.tiny_sd1_checkpoint()))
    assert (det.kind, det.arch, det.variant, det.family) == (ModelKind.CHECKPOINT, Arch.SD1, Variant.NORMAL, "SD 1.5")
    assert det.details["context_width"] == 48 and not det.details["warnings"]


@pytest.mark.parametrize("shapes,arch", [(bc.tiny_sd2_checkpoint, Arch.SD2), (bc.tiny_sdxl_checkpoint, Arch.SDXL)])
def test_tiny_sd2_and_sdxl(shapes, arch):
    det = detect(header_of(shapes()))
    assert det.kind is ModelKind.CHECKPOINT and det.arch is arch and not det.details["warnings"]


def test_unet_only_checkpoint_uses_unet_layout():
    unet_only = {k: v for k, v in bc.tiny_sdxl_checkpoint().items() if k.startswith("model.diffusion_model.")}
    det = detect(header_of(unet_only))
    assert det.arch is Arch.SDXL and det.details["has_text_encoder"] is False and det.details["has_vae"] is False


def test_real_width_that_contradicts_structure_is_reported():
    shapes = bc.tiny_sd1_checkpoint()
    for key in [k for k in shapes if k.endswith("attn2.to_k.weight")]:
        shapes[key] = ("F32", [shapes[key][1][0], 1024])
    det = detect(header_of(shapes))
    assert det.arch is Arch.SD1
    assert "1024" in det.details["warnings"][0]


@pytest.mark.parametrize("channels,variant", [(9, Variant.INPAINT), (8, Variant.INSTRUCT_PIX2PIX), (5, Variant.DEPTH)])
def test_variants_from_input_channels(channels, variant):
    assert detect(header_of(bc.tiny_sd1_checkpoint(channels))).variant is variant


def test_unsupported_input_channels_are_broken():
    with pytest.raises(BrokenModelFile, match="7 input channels"):
        detect(header_of(bc.tiny_sd1_checkpoint(7)))


# ---------------------------------------------------------------------------- prediction and family
def test_prediction_from_keys_and_metadata():
    shapes = bc.tiny_sdxl_checkpoint()
    assert detect(header_of(shapes)).prediction is None
    assert detect(header_of(shapes | {"v_pred": ("F32", [])})).prediction is Prediction.V_PREDICTION
    for word, expected in (("v", Prediction.V_PREDICTION), ("epsilon", Prediction.EPSILON)):
        det = detect(header_of(shapes, {"modelspec.prediction_type": word}))
        assert det.prediction is expected
    sd2 = detect(header_of(bc.tiny_sd2_checkpoint(), {"modelspec.architecture": "stable-diffusion-v2-768-v"}))
    assert sd2.prediction is Prediction.V_PREDICTION


def test_default_prediction_policy():
    sd2 = detect(header_of(bc.tiny_sd2_checkpoint()))
    assert sd2.prediction is None and default_prediction(sd2) is Prediction.V_PREDICTION
    sd2_inpaint = Detection(kind=ModelKind.CHECKPOINT, arch=Arch.SD2, variant=Variant.INPAINT)
    assert default_prediction(sd2_inpaint) is Prediction.EPSILON
    assert default_prediction(detect(header_of(bc.tiny_sd1_checkpoint()))) is Prediction.EPSILON
    explicit = Detection(kind=ModelKind.CHECKPOINT, arch=Arch.SD2, prediction=Prediction.EPSILON)
    assert default_prediction(explicit) is Prediction.EPSILON


@pytest.mark.parametrize("metadata,family", [
    ({"modelspec.title": "Illustrious XL v1.0"}, "Illustrious"),
    ({"modelspec.title": "NoobAI XL V-Pred 1.0"}, "NoobAI"),
    ({"ss_sd_model_name": "ponyDiffusionV6XL_v6.safetensors"}, "Pony"),
    ({"modelspec.title": "Ponytail mix"}, "SDXL"),
    ({}, "SDXL"),
])
def test_sdxl_family_from_metadata(metadata, family):
    assert detect(header_of(bc.tiny_sdxl_checkpoint(), metadata)).family == family


def test_family_never_comes_from_the_file_name(tmp_path):
    path = bc.write_safetensors(tmp_path / "ponyDiffusionV6XL_illustrious.safetensors", bc.tiny_sdxl_checkpoint())
    assert detect_path(path).family == "SDXL"


def test_family_metadata_ignored_for_non_sdxl():
    assert detect(header_of(bc.tiny_sd1_checkpoint(), {"modelspec.title": "pony"})).family == "SD 1.5"


def test_lora_family_uses_training_base_not_its_own_title():
    entry = bc.load_entry("lora_sdxl_kohya")
    det = detect(header_of(entry["tensors"], {"modelspec.title": "Pony style", "ss_sd_model_name": "sd_xl_base"}))
    assert det.family == "SDXL"


# ---------------------------------------------------------------------------- LoRA specifics
def test_lora_te_only_and_unet_only():
    lora = bc.load_entry("lora_sd15_kohya")["tensors"]
    te_only = {k: v for k, v in lora.items() if k.startswith("lora_te_")}
    unet_only = {k: v for k, v in lora.items() if k.startswith("lora_unet_")}
    assert detect(header_of(te_only)).arch is Arch.SD1  # 12 text-encoder layers
    assert detect(header_of(unet_only)).arch is Arch.SD1  # full-resolution attention + conv proj_in
    sd2_unet = {k: v for k, v in bc.load_entry("lora_sd21_kohya")["tensors"].items() if k.startswith("lora_unet_")}
    assert detect(header_of(sd2_unet)).arch is Arch.SD2  # linear proj_in


def test_tiny_lora_arch_from_structure():
    tiny = {}
    for layer in range(12):
        bc.lora_layer(tiny, f"lora_te_text_model_encoder_layers_{layer}_self_attn_q_proj", [48, 48], 4, "lora")
    assert detect(header_of(tiny)).arch is Arch.SD1
    xl = {}
    bc.lora_layer(xl, "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", [64, 128], 4, "lora")
    assert detect(header_of(xl)).arch is Arch.SDXL


def test_old_diffusers_attn_processor_lora():
    shapes = {}
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k"
    shapes[base + "_lora.down.weight"] = ("F32", [4, 768])
    shapes[base + "_lora.up.weight"] = ("F32", [320, 4])
    det = detect(header_of(shapes))
    assert (det.kind, det.arch, det.details["format"]) == (ModelKind.LORA, Arch.SD1, "diffusers")


@pytest.mark.parametrize("base,arch", [("transformer.transformer_blocks.0.attn.to_q", Arch.UNKNOWN),  # Flux/Qwen
                                       ("lora_unet_double_blocks_0_img_attn_qkv", Arch.FLUX)])
def test_dit_lora_is_recognised(base, arch):  # DiT LoRAs are supported since issue #10
    shapes = {}
    bc.lora_layer(shapes, base, [3072, 3072], 4, "peft" if base.startswith("transformer.") else "lora")
    det = detect(header_of(shapes))
    assert (det.kind, det.arch) == (ModelKind.LORA, arch) and not det.unsupported


def test_lora_missing_half_is_broken():
    shapes = dict(bc.load_entry("lora_sd15_kohya")["tensors"])
    victim = next(k for k in shapes if k.endswith(".lora_up.weight"))
    del shapes[victim]
    with pytest.raises(BrokenModelFile, match="missing") as err:
        detect(header_of(shapes))
    assert victim.removesuffix(".lora_up.weight") in str(err.value)


def test_lora_rank_mismatch_is_broken():
    shapes = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": ("F16", [8, 768]),
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": ("F16", [768, 4])}
    with pytest.raises(BrokenModelFile, match="rank 8"):
        detect(header_of(shapes))


# ---------------------------------------------------------------------------- other kinds
def test_vae_without_decoder_is_broken():
    vae = {k: v for k, v in bc.load_entry("vae_sd_ldm")["tensors"].items() if not k.startswith("decoder.")}
    with pytest.raises(BrokenModelFile, match="no decoder"):
        detect(header_of(vae))


def test_sixteen_channel_vae_is_a_dit_vae():
    vae = bc.ldm_vae("", ch=32, z=16)
    det = detect(header_of(vae))
    assert det.kind is ModelKind.VAE and not det.unsupported  # the SD3 / Flux VAE (webui.models.dit)


def test_embedding_variants():
    assert detect(header_of({"string_to_param.*": ("F32", [2, 1024])})).arch is Arch.SD2
    single = detect(header_of({"<my-token>": ("F32", [768])}))
    assert (single.kind, single.arch, single.details["vectors"]) == (ModelKind.EMBEDDING, Arch.SD1, 1)
    tiny = detect(header_of({"emb_params": ("F32", [2, 48])}))
    assert tiny.kind is ModelKind.EMBEDDING and tiny.arch is Arch.UNKNOWN  # tiny width: caller compares
    with pytest.raises(BrokenModelFile, match="clip_g"):
        detect(header_of({"clip_l": ("F32", [2, 768])}))
    with pytest.raises(BrokenModelFile, match="vectors"):
        detect(header_of({"clip_l": ("F32", [2, 768]), "clip_g": ("F32", [3, 1280])}))


@pytest.mark.parametrize("key,family", [("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "Flux"),
                                        ("double_blocks.0.img_attn.qkv.weight", "Flux"),
                                        ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD3")])
def test_dit_checkpoints_are_named_not_unknown(key, family):
    # a single block key: recognised as that family's transformer (Flux: also reported as incomplete)
    try:
        det = detect(header_of({key: ("BF16", [9216, 3072])}))
    except BrokenModelFile as exc:
        assert family in str(exc)
    else:
        assert det.kind is ModelKind.CHECKPOINT and det.family == family and not det.unsupported


def test_unknown_lists_what_every_detector_said():
    det = detect(header_of({"foo.weight": ("F32", [3, 3]), "bar.bias": ("F32", [3])}))
    assert det.kind is ModelKind.UNKNOWN
    for name in DETECTORS:
        assert f"{name}: no match" in det.message
    assert "foo.weight" in det.message


def test_priority_breaks_ties_and_outcomes_are_kept():
    shapes = bc.load_entry("controlnet_sd15_ldm")["tensors"] | bc.ldm_unet(
        "model.diffusion_model.", mc=64, mult=(1, 0.5, 1, 1), depths=(1, 1, 1, 0), mid_depth=1, ctx=48,
        linear=False, adm=None)
    det = detect(header_of(shapes))  # an old "full" ControlNet that bundles the SD UNet
    assert det.kind is ModelKind.CONTROLNET
    assert det.details["outcomes"]["checkpoint"].startswith("match")


def test_broken_claim_loses_to_a_better_match():
    shapes = dict(bc.tiny_sd1_checkpoint()) | {"lora_te_x.lora_down.weight": ("F32", [4, 48])}
    det = detect(header_of(shapes))
    assert det.kind is ModelKind.CHECKPOINT and det.details["outcomes"]["lora"].startswith("broken")


# ---------------------------------------------------------------------------- real files on disk
def test_read_header_of_a_safetensors_written_file(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = {k: torch.zeros(shape, dtype=torch.float32) for k, (_, shape) in bc.tiny_sd1_checkpoint().items()}
    path = tmp_path / "tiny.safetensors"
    save_file(tensors, str(path), metadata={"modelspec.title": "tiny"})
    header = read_header(path)
    assert header.metadata == {"modelspec.title": "tiny"}
    assert header.tensors["model.diffusion_model.input_blocks.0.0.weight"].shape == (64, 4, 3, 3)
    assert detect_path(path).arch is Arch.SD1


def test_read_header_never_reads_tensor_data(tmp_path):
    entry = bc.load_entry("sdxl_base")  # real widths: a 6.9 GB layout, written as a sparse file
    path = bc.write_safetensors(tmp_path / "big.safetensors", entry["tensors"], entry["metadata"])
    assert path.stat().st_size > 6_000_000_000
    start = time.perf_counter()
    det = detect_path(path)
    assert time.perf_counter() - start < 2.0
    assert det.arch is Arch.SDXL


def test_truncated_file(tmp_path):
    path = bc.write_safetensors(tmp_path / "cut.safetensors", bc.tiny_sd1_checkpoint(), sparse=False)
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full - 100)
    with pytest.raises(BrokenModelFile) as err:
        read_header(path)
    assert str(path) in str(err.value)
    assert f"file is truncated: expected {full} bytes, found {full - 100}; re-download it" in str(err.value)


def test_truncated_inside_the_header(tmp_path):
    path = bc.write_safetensors(tmp_path / "cut.safetensors", {"a": ("F32", [2])})
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(BrokenModelFile, match="file is truncated: expected at least"):
        read_header(path)


def test_empty_garbage_and_insane_headers(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(BrokenModelFile, match="empty"):
        read_header(empty)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 16) + b"this is not json" + b"\0" * 32)
    with pytest.raises(BrokenModelFile, match="not valid JSON"):
        read_header(garbage)
    html = tmp_path / "html.safetensors"  # a download that saved an error page
    html.write_bytes(b"<!DOCTYPE html><html>404</html>")
    with pytest.raises(BrokenModelFile, match="not sane"):
        read_header(html)


def test_offsets_inconsistent_with_shape(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(BrokenModelFile, match="needs 16 bytes"):
        read_header(path)


def test_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps(Evil()))
    det = detect_path(path)
    assert det.kind is ModelKind.CHECKPOINT and det.details == {"pickle": True}
    assert detect_path(path, hint=ModelKind.VAE).kind is ModelKind.VAE
    assert not marker.exists()


def _diffusers_folder(root: Path, cls: str, unet: dict, index_extra=None, scheduler=None) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": cls, **(index_extra or {})}))
    (root / "unet" / "config.json").write_text(json.dumps(unet))
    if scheduler is not None:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return root


def test_diffusers_folders(tmp_path):
    sdxl = _diffusers_folder(tmp_path / "xl", "StableDiffusionXLPipeline",
                             {"in_channels": 4, "cross_attention_dim": 2048},
                             {"text_encoder": ["transformers", "CLIPTextModel"],
                              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
                             {"prediction_type": "v_prediction"})
    det = detect_path(sdxl)
    assert (det.kind, det.arch, det.variant, det.prediction) == (
        ModelKind.CHECKPOINT, Arch.SDXL, Variant.NORMAL, Prediction.V_PREDICTION)
    refiner = _diffusers_folder(tmp_path / "ref", "StableDiffusionXLImg2ImgPipeline", {"in_channels": 4},
                                {"text_encoder": [None, None], "text_encoder_2": ["transformers", "X"]})
    assert detect_path(refiner).arch is Arch.SDXL_REFINER
    sd2 = _diffusers_folder(tmp_path / "sd2", "StableDiffusionInpaintPipeline",
                            {"in_channels": 9, "use_linear_projection": True, "cross_attention_dim": 64})
    det = detect_path(sd2)
    assert (det.arch, det.variant, det.prediction) == (Arch.SD2, Variant.INPAINT, None)
    tiny_sd1 = _diffusers_folder(tmp_path / "sd1", "StableDiffusionPipeline", {"in_channels": 4,
                                                                               "cross_attention_dim": 48})
    assert detect_path(tiny_sd1).arch is Arch.SD1
    flux = _diffusers_folder(tmp_path / "flux", "FluxPipeline", {})
    with pytest.raises(BrokenModelFile, match="transformer"):  # a Flux folder without its transformer
        detect_path(flux)


def test_broken_diffusers_folders(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(BrokenModelFile, match="model_index.json is not valid JSON"):
        detect_path(bad)
    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    (no_unet / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(BrokenModelFile, match="unet/config.json"):
        detect_path(no_unet)


def test_malformed_shapes_are_broken_not_crashes():
    shapes = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": ("F16", []),
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": ("F16", [768])}
    with pytest.raises(BrokenModelFile, match="unexpected tensor layout for a lora"):
        detect(header_of(shapes))


def test_unet_only_lycoris_on_tiny_widths_narrows_candidates():
    shapes = {}
    for block in ("down_blocks_0_attentions_0", "up_blocks_3_attentions_2"):
        base = f"lora_unet_{block}_transformer_blocks_0_attn2_to_k"
        shapes |= {base + ".hada_w1_a": ("F16", [64, 4]), base + ".hada_w1_b": ("F16", [4, 48]),
                   base + ".hada_w2_a": ("F16", [64, 4]), base + ".hada_w2_b": ("F16", [4, 48])}
    det = detect(header_of(shapes))  # LoHa hides proj_in's conv/linear shape: SD1 or SD2, never SDXL
    assert det.arch is Arch.UNKNOWN and det.details["candidates"] == ("sd1", "sd2")
    full = {"lora_unet_down_blocks_0_attentions_0_proj_in.diff": ("F16", [64, 64, 1, 1])}
    assert detect(header_of(full)).arch is Arch.SD1  # LyCORIS "full" keeps the conv shape


def test_peft_dora_magnitude_vector():
    shapes = {}
    bc.lora_layer(shapes, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", [320, 768], 4, "peft")
    shapes["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_magnitude_vector"] = ("F16", [320])
    det = detect(header_of(shapes))
    assert (det.kind, det.arch, det.details["format"]) == (ModelKind.LORA, Arch.SD1, "dora")
