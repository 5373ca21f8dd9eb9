"""The tiny fixture factory: real layouts (checked against an independent writer), determinism, caching,
and the bundled configs it is built from."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.fixtures import factory
from webui.models import tiny
from webui import configs

HEADERS = Path(__file__).resolve().parents[1] / "fixtures" / "headers"
WIDTH_KEYS = {"block_out_channels", "cross_attention_dim", "sample_size", "projection_class_embeddings_input_dim",
              "hidden_size", "intermediate_size", "projection_dim"}


def keys_and_shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), "pt") as handle:
        return {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}


# ---------------------------------------------------------------------------------------------- bundled configs
# Parameter counts of the real releases (diffusers/transformers models built from these configs).
REAL_SIZES = {
    "sd15": {"unet": 859.52, "vae": 83.65, "text_encoder": 123.06},
    "sd2_v": {"unet": 865.91, "vae": 83.65, "text_encoder": 340.39},
    "sdxl_base": {"unet": 2567.46, "vae": 83.65, "text_encoder": 123.06, "text_encoder_2": 694.66},
    "sdxl_refiner": {"unet": 2259.53, "vae": 83.65, "text_encoder_2": 694.66},
}


@pytest.mark.parametrize("key", sorted(REAL_SIZES))
def test_bundled_configs_build_the_real_models(key):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with init_empty_weights():
        models = {"unet": UNet2DConditionModel.from_config(configs.load_config(key, "unet")),
                  "vae": AutoencoderKL.from_config(configs.load_config(key, "vae"))}
        for name in ("text_encoder", "text_encoder_2"):
            if name in configs.components(key):
                models[name] = tiny._text_model(configs.load_config(key, name))
    sizes = {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for n, m in models.items()}
    assert sizes == REAL_SIZES[key]


@pytest.mark.parametrize("key,component,pad,pad_id", [
    ("sd15", "tokenizer", "<|endoftext|>", 49407), ("sd2_v", "tokenizer", "!", 0),
    ("sdxl_base", "tokenizer", "<|endoftext|>", 49407), ("sdxl_base", "tokenizer_2", "!", 0),
])
def test_bundled_tokenizers(key, component, pad, pad_id):
    tokenizer = configs.make_tokenizer(key, component)
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token == pad and ids[-1] == pad_id and len(ids) == 77


def test_config_keys_for_each_architecture():
    from webui.types import Arch, Prediction, Variant

    assert configs.config_key(Arch.SD2, Variant.NORMAL, Prediction.V_PREDICTION) == "sd2_v"
    assert configs.config_key(Arch.SD2, Variant.NORMAL, Prediction.EPSILON) == "sd2"
    assert configs.config_key(Arch.SDXL, Variant.INPAINT) == "sdxl_inpaint"
    with pytest.raises(KeyError, match="no bundled config for sdxl/depth"):
        configs.config_key(Arch.SDXL, Variant.DEPTH)


def test_export_diffusers_config_dir(tmp_path):
    folder = configs.export_diffusers_config_dir("sdxl_base", tmp_path / "cfg")
    assert (folder / "tokenizer_2" / "vocab.json").is_file() and (folder / "unet" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- tiny structure
@pytest.mark.parametrize("key", configs.CONFIG_KEYS)
def test_tiny_configs_only_shrink_widths(key):
    """Same layout, layer counts and head counts as the bundled (real) config; widths fit GroupNorm and heads."""
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        if component not in configs.components(key):
            continue
        real, tiny = configs.load_config(key, component), factory.tiny_config(key, component)
        assert {k for k in real if real[k] != tiny.get(k)} <= WIDTH_KEYS, component
    unet = factory.tiny_config(key, "unet")
    heads = unet["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(unet["block_out_channels"])
    for width, head_count, block in zip(unet["block_out_channels"], heads, unet["down_block_types"]):
        assert width % 32 == 0 and (block == "DownBlock2D" or width % head_count == 0)
    if "text_encoder" in configs.components(key):
        text = factory.tiny_config(key, "text_encoder")
        assert text["hidden_size"] % text["num_attention_heads"] == 0 and text["vocab_size"] == 49408


def _corpus():
    if not (HEADERS / "build_corpus.py").is_file():
        pytest.skip("header corpus not present")
    spec = importlib.util.spec_from_file_location("header_corpus_for_factory", HEADERS / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fixture,entry", [
    ("sd15", "sd15"), ("sd15_inpaint", "sd15_inpaint"), ("sd2v", "sd21_v"), ("sdxl", "sdxl_base"),
    ("sdxl_inpaint", "sdxl_inpaint"), ("sdxl_vpred", "noobai_vpred"), ("sdxl_refiner", "sdxl_refiner"),
])
def test_tiny_files_have_the_real_key_set(tiny_models, fixture, entry):
    """An independently written header of the real layout (tests/fixtures/headers) has exactly our keys."""
    real = _corpus().load_entry(entry)["tensors"]
    ours = keys_and_shapes(tiny_models.path(fixture))
    assert set(ours) == set(real)
    markers = {"v_pred", "ztsnr"}
    assert all(len(ours[k]) == len(real[k][1]) for k in ours if k not in markers)


def test_tiny_files_are_detected_as_their_architecture(tiny_models):
    detect = pytest.importorskip("webui.models.detect")
    from webui.types import Arch, Prediction, Variant

    for name, arch, variant in (("sd15", Arch.SD1, Variant.NORMAL), ("sd15_inpaint", Arch.SD1, Variant.INPAINT),
                                ("sd2v", Arch.SD2, Variant.NORMAL), ("sdxl", Arch.SDXL, Variant.NORMAL),
                                ("sdxl_refiner", Arch.SDXL_REFINER, Variant.NORMAL)):
        found = detect.detect_path(tiny_models.path(name))
        assert (found.arch, found.variant) == (arch, variant), name
    assert detect.detect_path(tiny_models.sdxl_vpred).prediction is Prediction.V_PREDICTION


# ---------------------------------------------------------------------------------------------- files
def test_sizes_and_formats(tiny_models):
    sizes = {n: tiny_models.path(n).stat().st_size / 1e6 for n in ("sd15", "sd2v", "sdxl", "sdxl_refiner", "vae")}
    assert sizes["sd15"] < 30 and sizes["vae"] < 15
    assert sizes["sdxl"] < 200 and sizes["sd2v"] < 120  # real layouts need >=160-wide levels (see factory doc)
    with safe_open(str(tiny_models.sd15), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert handle.get_slice("model.diffusion_model.out.2.weight").get_dtype() == "F16"
        assert handle.get_slice("cond_stage_model.transformer.text_model.embeddings.position_ids").get_dtype() == "I64"
    with safe_open(str(tiny_models.sdxl_vpred), "pt") as handle:
        assert {"v_pred", "ztsnr"} <= set(handle.keys())


def test_writing_is_deterministic(tmp_path):
    first = factory.write_sd15_checkpoint(tmp_path / "a")
    second = factory.write_sd15_checkpoint(tmp_path / "b")
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    other = factory.write_sd15_checkpoint(tmp_path / "c", seed=1)
    assert first.read_bytes() != other.read_bytes()


def test_constant_parameters_are_perturbed():
    unet = factory.build_components("sd15")["unet"]
    for name, param in unet.named_parameters():
        assert param.numel() == 1 or not bool((param == param.flatten()[0]).all()), name
    assert all(torch.equal(p, p.half().float()) for p in unet.parameters())  # exactly representable in fp16


def test_corrupt_file_is_truncated(tmp_path):
    path = factory.write_corrupt_checkpoint(tmp_path)
    with pytest.raises(Exception, match="incomplete|invalid|truncated"):
        keys_and_shapes(path)


def test_diffusers_folder_layout(tiny_models):
    folder = tiny_models.diffusers_sd15
    for part in ("model_index.json", "unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (folder / part).is_file(), part
    keys = keys_and_shapes(folder / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in keys)  # as transformers 4.x wrote them
    assert (folder / "tokenizer" / "merges.txt").is_file() and not (folder / "tokenizer" / "tokenizer.json").exists()


# ---------------------------------------------------------------------------------------------- caching
def test_fixture_cache_builds_once_and_rebuilds_after_edits(tmp_path):
    calls = []

    def writer(directory: Path, *, size: int) -> Path:
        calls.append(size)
        path = directory / "thing.bin"
        path.write_bytes(b"x" * size)
        return path

    cache = factory.FixtureCache(tmp_path / "cache")
    first = cache.get(writer, size=3)
    assert cache.get(writer, size=3) == first and calls == [3]
    assert factory.FixtureCache(tmp_path / "cache").get(writer, size=3) == first and calls == [3]  # next session
    cache.get(writer, size=4)
    assert calls == [3, 4]
    first.write_bytes(b"changed in place")
    assert cache.get(writer, size=3).read_bytes() == b"xxx" and calls == [3, 4, 3]


def test_models_folder_layout(tiny_models):
    root = tiny_models.models_dir
    assert (root / "Stable-diffusion" / "tiny_sd15.safetensors").is_file()
    assert (root / "Stable-diffusion" / "subfolder" / "tiny_sdxl_vpred.safetensors").is_file()
    assert (root / "Stable-diffusion" / "tiny_diffusers" / "model_index.json").is_file()
    assert (root / "VAE" / "tiny_vae.safetensors").is_file()
    assert sorted(p.name for p in (root / "VAE").iterdir()) == ["tiny_sdxl_vae.safetensors", "tiny_vae.safetensors"]
