"""IP-Adapter / CLIP vision: detection from headers (real widths and tiny fixtures), encoder configs and loading,
encoder choice and the messages for wrong files.  Generation with adapters is in tests/integration."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.fixtures.ip_adapter_factory import (
    CLIP_VISION,
    ENCODER_FOLDER,
    IPADAPTER,
    LAYOUT,
    adapter_state,
    build_clip_vision,
    place_ip_adapters,
)
from webui.models.cache import ComponentCache
from webui.models.catalog import Catalog
from webui.models.detect import BrokenModelFile, SafetensorsHeader, detect, detect_path
from webui.models.ip_adapter import (
    IpAdapterError,
    IpAdapterLoader,
    clip_vision_config,
    clip_vision_facts,
    load_clip_vision,
)
from webui.settings import Settings, build_arg_parser, settings_from_args
from webui.types import Arch, ModelKind

SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]  # 16 layers


def header(shapes):
    return SafetensorsHeader.from_shapes(shapes)


def real_adapter(context: int, widths: list[int], image_proj: dict) -> dict:
    shapes = {f"image_proj.{k}": v for k, v in image_proj.items()}
    for i, width in enumerate(widths):
        shapes[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = (width, context)
        shapes[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = (width, context)
    return shapes


def resampler(dim: int, embed: int, out: int, depth: int = 4) -> dict:
    shapes = {"latents": (1, 16, dim), "proj_in.weight": (dim, embed), "proj_in.bias": (dim,),
              "proj_out.weight": (out, dim), "proj_out.bias": (out,), "norm_out.weight": (out,),
              "norm_out.bias": (out,)}
    for i in range(depth):
        shapes.update({f"layers.{i}.0.to_q.weight": (dim, dim), f"layers.{i}.0.to_kv.weight": (2 * dim, dim),
                       f"layers.{i}.0.to_out.weight": (dim, dim), f"layers.{i}.0.norm1.weight": (dim,),
                       f"layers.{i}.1.1.weight": (4 * dim, dim), f"layers.{i}.1.3.weight": (dim, 4 * dim)})
    return shapes


def clip_vision_shapes(hidden: int, projection: int, layers: int, inter: int, patch: int = 14, size: int = 224) -> dict:
    shapes = {"vision_model.embeddings.class_embedding": (hidden,),
              "vision_model.embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
              "vision_model.embeddings.position_embedding.weight": ((size // patch) ** 2 + 1, hidden),
              "visual_projection.weight": (projection, hidden)}
    for i in range(layers):
        shapes[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"] = (inter, hidden)
        shapes[f"vision_model.encoder.layers.{i}.self_attn.q_proj.weight"] = (hidden, hidden)
    return shapes


# ---------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("shapes, arch, variant, need", [
    (real_adapter(768, SD15_WIDTHS, {"proj.weight": (3072, 1024), "proj.bias": (3072,), "norm.weight": (768,)}),
     Arch.SD1, "IP-Adapter", ("projection", 1024)),  # ip-adapter_sd15
    (real_adapter(768, SD15_WIDTHS, resampler(768, 1280, 768)), Arch.SD1, "IP-Adapter Plus", ("hidden", 1280)),
    (real_adapter(2048, [640] * 20 + [1280] * 50, {"proj.weight": (8192, 1280), "norm.weight": (2048,)}),
     Arch.SDXL, "IP-Adapter", ("projection", 1280)),  # ip-adapter_sdxl: ViT-bigG
    (real_adapter(2048, [640] * 20 + [1280] * 50, {"proj.weight": (8192, 1024), "norm.weight": (2048,)}),
     Arch.SDXL, "IP-Adapter", ("projection", 1024)),  # ip-adapter_sdxl_vit-h
    (real_adapter(2048, [640] * 20 + [1280] * 50, resampler(1280, 1280, 2048)), Arch.SDXL, "IP-Adapter Plus",
     ("hidden", 1280)),  # ip-adapter-plus_sdxl_vit-h
    (real_adapter(768, SD15_WIDTHS, {f"proj.{i}.weight": (1280, 1280) for i in (0, 2, 3)}), Arch.SD1,
     "IP-Adapter Full Face", ("hidden", 1280)),
])
def test_real_width_adapters(shapes, arch, variant, need):
    det = detect(header(shapes))
    facts = det.details["ip_adapter"]
    assert (det.kind, det.arch, facts["variant"]) == (ModelKind.IP_ADAPTER, arch, variant)
    assert (facts["input"], facts["input_width"]) == need
    assert det.details["warnings"] == [] and det.unsupported is None


def test_tiny_adapters_have_the_real_structure():
    for arch, layers, context in (("sd1", 16, 48), ("sdxl", 70, 128)):
        for plus in (False, True):
            state = adapter_state(arch, plus=plus)
            det = detect(header({k: tuple(v.shape) for k, v in state.items()}))
            facts = det.details["ip_adapter"]
            assert det.kind is ModelKind.IP_ADAPTER and det.arch is {"sd1": Arch.SD1, "sdxl": Arch.SDXL}[arch]
            assert (facts["layers"], facts["context_width"]) == (layers, context)
            assert facts["variant"] == ("IP-Adapter Plus" if plus else "IP-Adapter")
            assert sorted(int(k.split(".")[1]) for k in state if k.endswith("to_k_ip.weight")) == \
                list(range(1, 2 * layers, 2))


def test_faceid_is_recognised_but_unsupported():
    shapes = real_adapter(768, SD15_WIDTHS, {"proj.0.weight": (1024, 512), "proj.2.weight": (3072, 1024),
                                             "norm.weight": (768,)})
    shapes["ip_adapter.1.to_k_lora.down.weight"] = (128, 320)
    det = detect(header(shapes))
    assert det.kind is ModelKind.IP_ADAPTER and "InsightFace" in det.unsupported


def test_incomplete_adapter_is_broken():
    shapes = real_adapter(768, SD15_WIDTHS, {"proj.weight": (3072, 1024)})
    del shapes["ip_adapter.5.to_v_ip.weight"]
    with pytest.raises(BrokenModelFile, match=r"ip_adapter\.5\.to_v_ip"):
        detect(header(shapes))
    with pytest.raises(BrokenModelFile, match="no ip_adapter"):
        detect(header({"image_proj.proj.weight": (3072, 1024)}))


@pytest.mark.parametrize("hidden, projection, layers, inter, heads, act", [
    (1280, 1024, 32, 5120, 16, "gelu"),  # CLIP-ViT-H-14 (SD1.5 and "vit-h" adapters)
    (1664, 1280, 48, 8192, 16, "gelu"),  # CLIP-ViT-bigG-14 (ip-adapter_sdxl)
    (1024, 768, 24, 4096, 16, "quick_gelu"),  # OpenAI ViT-L/14
])
def test_clip_vision_config_from_real_shapes(hidden, projection, layers, inter, heads, act):
    det = detect(header(clip_vision_shapes(hidden, projection, layers, inter)))
    assert det.kind is ModelKind.CLIP_VISION and det.unsupported is None
    config = clip_vision_config(det.details["clip_vision"])
    assert config == {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                      "patch_size": 14, "image_size": 224, "projection_dim": projection,
                      "num_attention_heads": heads, "layer_norm_eps": 1e-5, "hidden_act": act}


def test_clip_vision_without_projection_is_unsupported():
    shapes = clip_vision_shapes(1280, 1024, 2, 5120)
    del shapes["visual_projection.weight"]
    assert "visual_projection" in detect(header(shapes)).unsupported
    assert clip_vision_facts({"text_model.x": (1,)}) is None


# ---------------------------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def models(fixture_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("ipa_unit") / "models"
    place_ip_adapters(root, fixture_cache, encoder_folder=True)
    return root


def make_loader(models: Path, *, encoders: bool = True) -> IpAdapterLoader:
    roots = {"ip_adapter": [models / IPADAPTER]}
    if encoders:
        roots["clip_vision"] = [models / CLIP_VISION]
    catalog = Catalog(roots)
    catalog.refresh()
    return IpAdapterLoader(catalog, ComponentCache(1 << 30))


def test_fixture_files_are_detected(models):
    for relative in [*LAYOUT, ENCODER_FOLDER[0] + "/model.safetensors"]:
        det = detect_path(models / relative)
        assert det.kind is (ModelKind.IP_ADAPTER if relative.startswith(IPADAPTER) else ModelKind.CLIP_VISION)


@pytest.mark.parametrize("relative, kind", [("tiny-CLIP-ViT-H-14.safetensors", "vit-h"),
                                            ("tiny_image_encoder/model.safetensors", None)])
def test_clip_vision_loads_exactly(models, relative, kind):
    """Single file (config from shapes) and save_pretrained folder (config.json) give the fixture model."""
    loaded = load_clip_vision(models / CLIP_VISION / relative, torch.float32)
    reference = build_clip_vision("vit-h", seed=30 if kind else 32)
    assert loaded.config.num_attention_heads == 16 and loaded.config.hidden_act == "gelu"
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref = loaded(pixels, output_hidden_states=True), reference(pixels, output_hidden_states=True)
    assert torch.equal(out.image_embeds, ref.image_embeds)
    assert torch.equal(out.hidden_states[-2], ref.hidden_states[-2])


def test_encoder_is_picked_by_the_width_the_adapter_needs(models):
    loader = make_loader(models)
    pick = {name: loader.pick_encoder(loader._record(ModelKind.IP_ADAPTER, name), None).name
            for name in loader.names_for()}
    assert pick == {"tiny-ip-adapter-plus_sd15": "tiny-CLIP-ViT-H-14",  # 64-dim hidden states
                    "tiny-ip-adapter-plus_sdxl_vit-h": "tiny-CLIP-ViT-H-14",
                    "tiny-ip-adapter_sd15": "tiny-CLIP-ViT-H-14",  # 32-dim projection
                    "tiny-ip-adapter_sdxl": "tiny-CLIP-ViT-bigG-14"}  # 40-dim projection (the bigG one)
    assert loader.names_for(Arch.SDXL) == ["tiny-ip-adapter-plus_sdxl_vit-h", "tiny-ip-adapter_sdxl"]
    assert loader.encoder_names() == ["tiny-CLIP-ViT-bigG-14", "tiny-CLIP-ViT-H-14", "tiny_image_encoder"]
    folder = loader.pick_encoder(loader._record(ModelKind.IP_ADAPTER, "tiny-ip-adapter_sd15"), "tiny_image_encoder")
    assert folder.path.name == "model.safetensors"


def test_wrong_or_missing_encoder_messages(models):
    loader = make_loader(models)
    sdxl = loader._record(ModelKind.IP_ADAPTER, "tiny-ip-adapter_sdxl")
    with pytest.raises(IpAdapterError, match="does not fit IP-Adapter tiny-ip-adapter_sdxl, which needs 40-dim "
                                             "projected image embeddings"):
        loader.pick_encoder(sdxl, "tiny-CLIP-ViT-H-14")
    with pytest.raises(IpAdapterError, match="CLIP vision encoder 'nope' not found"):
        loader.pick_encoder(sdxl, "nope")
    bare = make_loader(models, encoders=False)
    with pytest.raises(IpAdapterError) as info:
        bare.pick_encoder(bare._record(ModelKind.IP_ADAPTER, "tiny-ip-adapter_sd15"), None)
    assert "IP-Adapter tiny-ip-adapter_sd15 needs a CLIP vision encoder with 32-dim projected image embeddings " \
           "in models/clip_vision; found: none" in str(info.value)


def test_missing_adapter_and_wrong_arch_messages(models):
    loader = make_loader(models)
    with pytest.raises(IpAdapterError, match=r"IP-Adapter 'ip-adapter_sd15' not found .*Available: "
                                             r"tiny-ip-adapter-plus_sd15, "):
        loader._record(ModelKind.IP_ADAPTER, "ip-adapter_sd15")
    unet = SimpleNamespace(attn_processors={f"l{i}.attn2.processor": None for i in range(16)},
                           config=SimpleNamespace(cross_attention_dim=48))
    record = loader._record(ModelKind.IP_ADAPTER, "tiny-ip-adapter_sdxl")
    with pytest.raises(IpAdapterError, match="is for SDXL but the loaded checkpoint is SD 1.x: pick an SD 1.x "):
        loader.check(record, Arch.SD1, unet)
    with pytest.raises(IpAdapterError, match="refiner"):
        loader.check(record, Arch.SDXL_REFINER, unet)
    sd15 = loader._record(ModelKind.IP_ADAPTER, "tiny-ip-adapter_sd15")
    loader.check(sd15, Arch.SD1, unet)  # fits
    unet.config.cross_attention_dim = 768
    with pytest.raises(IpAdapterError, match="16 layers of width 48, but this checkpoint's UNet has 16 "
                                             "cross-attention layers of width 768"):
        loader.check(sd15, Arch.SD1, unet)


def test_misplaced_adapter_is_reported_by_the_catalog(models, tmp_path):
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    (lora_dir / "ipa.safetensors").write_bytes((models / IPADAPTER / "tiny-ip-adapter_sd15.safetensors").read_bytes())
    catalog = Catalog({"lora": [lora_dir]})
    catalog.refresh()
    (record,) = catalog.list("lora")
    assert record.error == "this is a IP-Adapter, not a LoRA: move it to models/ipadapter"


def test_settings_have_the_folders(tmp_path):
    settings = Settings.for_data_dir(tmp_path)
    dirs = settings.model_dirs()
    assert dirs["ip_adapter"] == tmp_path.resolve() / "models" / "ipadapter"
    assert dirs["clip_vision"] == tmp_path.resolve() / "models" / "clip_vision"
    args = build_arg_parser().parse_args(["--ipadapter-dir", str(tmp_path / "a"), "--clip-vision-dir",
                                          str(tmp_path / "b")])
    parsed = settings_from_args(args, default_data_dir=tmp_path)
    assert (parsed.ipadapter_dir, parsed.clip_vision_dir) == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())
