"""T2I-Adapter files: detection of every layout from safetensors headers, the key table's round trip,
loading into diffusers' ``T2IAdapter`` exactly, the architecture filter, and refusals that say why."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.fixtures.t2i_adapter_factory import (
    CONFIGS,
    LAYOUT,
    build_adapter,
    kind_of,
    original_state,
    place_t2i_adapters,
    reference_state,
)
from webui.generation.adapter_control import active_units
from webui.models.cache import ComponentCache
from webui.models.catalog import Catalog
from webui.models.controlnet import ControlNetLoader
from webui.models.detect import detect_path
from webui.models.t2i_adapter import adapter_facts, diffusers_to_original, original_to_diffusers
from webui.models.tiny import save_safetensors
from webui.types import Arch, ModelKind, RequestError

# name -> (arch, layout, adapter_type, in_channels)
EXPECTED = {
    "tiny_t2i_sd15_diffusers": (Arch.SD1, "diffusers", "full_adapter", 3),
    "t2iadapter_tiny_sd15v2.safetensors": (Arch.SD1, "original", "full_adapter", 3),
    "t2iadapter_tiny_sketch_sd15v2.safetensors": (Arch.SD1, "original", "full_adapter", 1),
    "t2iadapter_tiny_color_sd14v1.safetensors": (Arch.SD1, "original", "light_adapter", 3),
    "t2i-adapter_tiny_xl.safetensors": (Arch.SDXL, "diffusers", "full_adapter_xl", 3),
    "tiny_t2i_sdxl_diffusers": (Arch.SDXL, "diffusers", "full_adapter_xl", 3),
}


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory, fixture_cache):
    folder = tmp_path_factory.mktemp("t2i") / "ControlNet"
    place_t2i_adapters(folder, fixture_cache, names=tuple(LAYOUT))
    return folder


def loader_for(folder, *, allow_pickle=False):
    catalog = Catalog({"controlnet": [folder]}, allow_pickle=allow_pickle)
    catalog.refresh()
    plan = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    return ControlNetLoader(catalog, ComponentCache(1 << 30), plan, allow_pickle=allow_pickle)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detection_from_the_header(controlnet_dir, name):
    path = controlnet_dir / name
    det = detect_path(path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path)
    arch, layout, adapter_type, channels = EXPECTED[name]
    assert (det.kind, det.arch) == (ModelKind.CONTROLNET, arch)
    assert (det.details["format"], det.details["layout"], det.details["adapter_type"],
            det.details["in_channels"]) == ("t2i_adapter", layout, adapter_type, channels)
    assert det.details["detector"] == "t2i_adapter" and det.unsupported is None


def test_real_first_convolution_widths_decide_the_architecture():
    """Real TencentARC / diffusers shapes (headers only): 192 = SD 1.5 RGB, 64 = sketch, 768 = SDXL."""
    def full(first_width, prefix=""):
        return {f"{prefix}conv_in.weight": (320, first_width, 3, 3), "body.0.block1.weight": (320, 320, 3, 3),
                "body.0.block2.weight": (320, 320, 1, 1)} if not prefix else {
                f"{prefix}conv_in.weight": (320, first_width, 3, 3),
                f"{prefix}body.0.resnets.0.block1.weight": (320, 320, 3, 3)}
    assert adapter_facts(full(192)).arch is Arch.SD1 and adapter_facts(full(192)).in_channels == 3
    assert adapter_facts(full(64)).in_channels == 1
    xl = adapter_facts(full(768, "adapter."))
    assert (xl.arch, xl.adapter_type, xl.downscale_factor) == (Arch.SDXL, "full_adapter_xl", 16)
    odd = adapter_facts(full(100))
    assert "first convolution takes 100 channels" in odd.unsupported
    ksize3 = {**full(192), "body.0.block2.weight": (320, 320, 3, 3)}
    assert "3x3 block2" in adapter_facts(ksize3).unsupported
    assert "skip convolutions" in adapter_facts({**full(192), "body.0.skep.weight": (320, 320, 1, 1)}).unsupported
    style = {"style_embedding": (1, 8, 1024), "transformer_layes.0.attn.in_proj_weight": (3072, 1024)}
    assert "style adapter" in adapter_facts(style).unsupported
    assert adapter_facts({"conv_in.weight": (320, 4, 3, 3)}) is None  # a UNet/VAE key alone is not an adapter


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_key_table_round_trip(kind):
    state = build_adapter(kind, seed=1).state_dict()
    original = original_state(build_adapter(kind, seed=1), kind)
    assert not any(k.startswith("adapter.") for k in original)
    back = original_to_diffusers(original, kind_of(kind))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert diffusers_to_original(back, kind_of(kind), CONFIGS[kind]["num_res_blocks"]).keys() == original.keys()


def test_exact_key_names_of_the_tencentarc_layout():
    original = original_state(build_adapter("sd1", seed=1), "sd1")
    assert {"conv_in.weight", "body.0.block1.weight", "body.1.block2.bias", "body.2.in_conv.weight",
            "body.4.in_conv.weight", "body.7.block2.weight"} <= set(original)
    light = original_state(build_adapter("sd1_light", seed=1), "sd1_light")
    assert {"body.0.in_conv.weight", "body.0.body.1.block2.weight", "body.3.out_conv.bias"} <= set(light)
    with pytest.raises(ValueError, match="do not belong to a T2I-Adapter"):
        original_to_diffusers({**original, "extra.weight": torch.zeros(1)}, "full")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_layout_loads_exactly(controlnet_dir, name):
    loader = loader_for(controlnet_dir)
    model = loader.get(name.removesuffix(".safetensors"), EXPECTED[name][0])
    assert type(model).__name__ == "T2IAdapter"
    assert model.config.adapter_type == EXPECTED[name][2]
    state, expected = model.state_dict(), reference_state(name)
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)


def test_arch_filter_lists_and_refuses_like_controlnets(controlnet_dir):
    loader = loader_for(controlnet_dir)
    assert loader.names_for(Arch.SD1) == sorted(
        ["tiny_t2i_sd15_diffusers", "t2iadapter_tiny_sd15v2", "t2iadapter_tiny_sketch_sd15v2",
         "t2iadapter_tiny_color_sd14v1"], key=str.casefold)
    assert loader.names_for(Arch.SDXL) == ["t2i-adapter_tiny_xl", "tiny_t2i_sdxl_diffusers"]
    with pytest.raises(RequestError, match="t2i-adapter_tiny_xl is for SDXL but the loaded checkpoint is SD 1.x"):
        loader.get("t2i-adapter_tiny_xl", Arch.SD1)
    with pytest.raises(RequestError, match="is for SD 1.x but the loaded checkpoint is SDXL"):
        loader.get("t2iadapter_tiny_sd15v2", Arch.SDXL)


def test_pickle_only_with_allow_pickle(controlnet_dir):
    with pytest.raises(RequestError, match="allow-pickle"):
        loader_for(controlnet_dir).get("t2iadapter_tiny_pickle", Arch.SD1)
    loader = loader_for(controlnet_dir, allow_pickle=True)
    with pytest.raises(RequestError, match="is for SD 1.x but the loaded checkpoint is SDXL"):
        loader.get("t2iadapter_tiny_pickle", Arch.SDXL)  # known only after loading
    model = loader.get("t2iadapter_tiny_pickle", Arch.SD1)
    expected = reference_state("t2iadapter_tiny_pickle.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_unsupported_file_is_listed_with_its_reason(tmp_path):
    state = original_state(build_adapter("sd1", seed=1), "sd1")
    state["body.0.block2.weight"] = torch.zeros(64, 64, 3, 3)
    save_safetensors(state, tmp_path / "t2iadapter_ksize3.safetensors")
    catalog = Catalog({"controlnet": [tmp_path]})
    catalog.refresh()
    record = catalog.list("controlnet")[0]
    assert not record.usable and "3x3 block2" in record.error


def test_guidance_window_rule():
    assert active_units(0, 4, [0.0, 0.5], [0.5, 1.0]) == (True, False)
    assert active_units(1, 4, [0.0, 0.5], [0.5, 1.0]) == (True, False)
    assert active_units(2, 4, [0.0, 0.5], [0.5, 1.0]) == (False, True)
    assert active_units(3, 4, [0.0, 0.5], [0.5, 1.0]) == (False, True)
