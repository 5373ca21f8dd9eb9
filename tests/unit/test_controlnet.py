"""ControlNet loading pieces and unit preparation, without running a pipeline.

Config from tensor shapes, ldm <-> diffusers key conversion (exact round trip), arch inference for
pickles, the loader's arch/pickle/missing-model messages, pixel perfect, resize modes, control modes
and the kwargs handed to diffusers.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.fixtures.controlnet_factory import build_controlnet, controlnet_to_ldm
from webui.generation import control
from webui.generation.control import (ControlConditioning, UnitControlNets, fit_map, pixel_perfect_resolution,
                                      prepare_control, soft_scales, unit_infotext)
from webui.image_requests import ControlUnit
from webui.models import controlnet as cn
from webui.models.ldm_convert import ConversionError
from webui.types import Arch, ModelKind, RequestError

CONFIG_KEYS = ("in_channels", "conditioning_channels", "conditioning_embedding_out_channels", "block_out_channels",
               "layers_per_block", "down_block_types", "mid_block_type", "transformer_layers_per_block",
               "cross_attention_dim", "use_linear_projection", "attention_head_dim", "addition_embed_type",
               "addition_time_embed_dim", "projection_class_embeddings_input_dim", "global_pool_conditions")


@pytest.fixture(scope="module")
def models():
    return {"sd1": build_controlnet("sd1"), "sdxl": build_controlnet("sdxl")}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("arch,key", [(Arch.SD1, "sd1"), (Arch.SDXL, "sdxl")])
def test_config_from_shapes_matches_the_model(models, arch, key):
    model = models[key]
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    config = cn.controlnet_config(_state(model), arch)
    with init_empty_weights():
        derived = ControlNetModel.from_config(config).config
    for name in CONFIG_KEYS:
        assert _norm(derived[name]) == _norm(model.config[name]), name


@pytest.mark.parametrize("key", ["sd1", "sdxl"])
def test_ldm_key_conversion_round_trip_is_exact(models, key):
    state = _state(models[key])
    ldm = controlnet_to_ldm(state, dict(models[key].config))
    assert "input_hint_block.14.weight" in ldm and "zero_convs.0.0.weight" in ldm and "middle_block_out.0.bias" in ldm
    assert not any(k.startswith(("controlnet_", "down_blocks", "mid_block")) for k in ldm)
    back = cn.convert_ldm_controlnet(ldm)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_split_layout_recognises_each_layout(models):
    state = _state(models["sd1"])
    ldm = controlnet_to_ldm(state, dict(models["sd1"].config))
    prefixed = {"control_model." + k: v for k, v in ldm.items()} | {"model.diffusion_model.x": torch.zeros(1)}
    assert cn.split_layout(dict(prefixed))[0] == "ldm"
    assert set(cn.split_layout(dict(prefixed))[1]) == set(ldm)  # the rest of a full v1.0 file is dropped
    assert cn.split_layout(dict(ldm))[0] == "ldm"
    assert cn.split_layout(dict(state))[0] == "diffusers"
    with pytest.raises(ConversionError, match="Control-LoRA"):
        cn.split_layout({"lora_controlnet": torch.zeros(1)})
    with pytest.raises(ConversionError, match="no ControlNet weights"):
        cn.split_layout({"foo.weight": torch.zeros(1)})


def test_incomplete_ldm_file_names_the_missing_tensors(models):
    ldm = controlnet_to_ldm(_state(models["sd1"]), dict(models["sd1"].config))
    del ldm["zero_convs.3.0.weight"]
    with pytest.raises(ConversionError, match="controlnet_down_blocks.3.weight"):
        cn.convert_ldm_controlnet(ldm)


def test_wrong_family_weights_are_refused(models):
    with pytest.raises(ConversionError, match="different architecture"):
        cn.controlnet_config(_state(models["sd1"]), Arch.SDXL)  # 4 levels, SDXL has 3
    with pytest.raises(ConversionError, match="different architecture|not for SD 1.x"):
        cn.controlnet_config(_state(models["sdxl"]), Arch.SD1)


def test_arch_from_weights_and_arch_of(models):
    assert cn.arch_from_weights(_state(models["sd1"])) is Arch.SD1
    assert cn.arch_from_weights(_state(models["sdxl"])) is Arch.SDXL
    assert cn.arch_of(models["sd1"]) is Arch.SD1 and cn.arch_of(models["sdxl"]) is Arch.SDXL
    real_width = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)}
    assert cn.arch_from_weights(real_width) is Arch.SD2


def test_shuffle_controlnets_pool_their_conditions(tmp_path):
    assert cn.wants_global_pool(tmp_path / "control_v11e_sd15_shuffle.safetensors")
    assert not cn.wants_global_pool(tmp_path / "control_v11p_sd15_canny.safetensors")
    (tmp_path / "my_cn.yaml").write_text("model:\n  params:\n    global_average_pooling: True\n")
    assert cn.wants_global_pool(tmp_path / "my_cn.safetensors")


# ---------------------------------------------------------------------------------------------- loader checks
class FakeCatalog:
    def __init__(self, records):
        self.records = records

    def list(self, kind):
        return list(self.records)

    def get(self, kind, query):
        for record in self.records:
            if query in (record.name, record.filename):
                return record
        raise LookupError(f"no ControlNet matches {query!r}")


def _record(tmp_path, name, arch, fmt="safetensors", error=None, folder=False):
    if folder:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "config.json").write_text("{}")
        path = tmp_path / name / "diffusion_pytorch_model.safetensors"
        name = f"{name}/diffusion_pytorch_model"
    else:
        path = tmp_path / (name + (".pth" if fmt == "pickle" else ".safetensors"))
    path.write_bytes(b"\0" * 16)
    return SimpleNamespace(name=name, filename=path.name, path=path, arch=arch, format=fmt, error=error,
                           kind=ModelKind.CONTROLNET, size=16, mtime=1.0, usable=error is None)


def test_wrong_arch_message_names_both_architectures(tmp_path):
    loader = cn.ControlNetLoader(FakeCatalog([_record(tmp_path, "control_v11p_sd15_canny", Arch.SD1)]), cache=None)
    with pytest.raises(RequestError) as exc:
        loader.get("control_v11p_sd15_canny", Arch.SDXL)
    assert str(exc.value) == ("ControlNet control_v11p_sd15_canny is for SD 1.x but the loaded checkpoint is SDXL: "
                              "pick an SDXL ControlNet")
    with pytest.raises(RequestError, match="refiner"):
        loader.get("control_v11p_sd15_canny", Arch.SDXL_REFINER)


def test_missing_model_lists_what_exists(tmp_path):
    records = [_record(tmp_path, "canny_a", Arch.SD1), _record(tmp_path, "depth_xl", Arch.SDXL, folder=True)]
    loader = cn.ControlNetLoader(FakeCatalog(records), cache=None)
    with pytest.raises(RequestError) as exc:
        loader.get("openpose", Arch.SD1)
    assert "'openpose' not found" in str(exc.value) and "canny_a, depth_xl" in str(exc.value)


def test_pickle_needs_allow_pickle(tmp_path):
    loader = cn.ControlNetLoader(FakeCatalog([_record(tmp_path, "old", Arch.UNKNOWN, fmt="pickle")]), cache=None)
    with pytest.raises(RequestError, match="--allow-pickle"):
        loader.get("old", Arch.SD1)


def test_names_for_filters_by_arch_and_shows_folder_names(tmp_path):
    records = [_record(tmp_path, "canny_a", Arch.SD1), _record(tmp_path, "depth_xl", Arch.SDXL, folder=True),
               _record(tmp_path, "broken", Arch.SD1, error="truncated")]
    loader = cn.ControlNetLoader(FakeCatalog(records), cache=None)
    assert loader.names_for(Arch.SD1) == ["canny_a"]
    assert loader.names_for(Arch.SDXL) == ["depth_xl"]
    assert loader.record("depth_xl").name == "depth_xl/diffusion_pytorch_model"  # the folder name resolves


# ---------------------------------------------------------------------------------------------- geometry
def test_pixel_perfect_resolution():
    # 1024x768 image into 512x512: crop and resize covers (k = max(0.5, 0.667)) -> 768 * 0.667 = 512
    assert pixel_perfect_resolution((1024, 768), 512, 512, 1) == 512
    # resize and fill fits inside (k = min) -> 768 * 0.5 = 384
    assert pixel_perfect_resolution((1024, 768), 512, 512, 2) == 384
    assert pixel_perfect_resolution((512, 512), 768, 1024, 0) == 1024


def _marked(width, height):
    image = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width - 1, height - 1), outline=(200, 200, 200))
    draw.rectangle((0, 0, 9, 9), fill=(255, 0, 0))  # top-left marker
    return image


def test_resize_modes():
    source = _marked(200, 100)
    for mode in (0, 1, 2):
        assert fit_map(source, 64, 64, mode).size == (64, 64)
    stretched = np.asarray(fit_map(source, 64, 64, 0))
    assert stretched[1, 1, 0] > 200  # the red marker survives a stretch at the corner
    cropped = np.asarray(fit_map(source, 64, 64, 1))
    assert cropped[32, 0, 0] < 50  # the left edge was cropped away: no red marker, no border at mid-height
    filled = np.asarray(fit_map(source, 64, 64, 2))
    assert filled.shape == (64, 64, 3)
    assert (filled[:10] == filled[0, 0]).all() and (filled[-10:] == filled[-1, -1]).all()  # padded bands
    assert filled[32, 32].tolist() == [0, 0, 0]  # the content sits in the middle, scaled to fit


# ---------------------------------------------------------------------------------------------- units
class FakeLoader:
    def __init__(self):
        self.models = {}

    def get(self, name, base_arch):
        return self.models.setdefault(name, torch.nn.Linear(1, 1))

    def record(self, name):
        return SimpleNamespace(name=name)

    def title(self, record):
        return f"{record.name} [abcd1234]"


def _image():
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).ellipse((20, 8, 76, 56), fill="black")
    return image


def test_no_enabled_unit_gives_none():
    units = [ControlUnit(enabled=False, model="x")]
    assert prepare_control(units, base_arch=Arch.SD1, width=64, height=64, loader=FakeLoader()) is None


def test_txt2img_unit_without_image_is_an_error():
    units = [ControlUnit(enabled=False, model="x"), ControlUnit(model="x")]
    with pytest.raises(RequestError, match="ControlNet unit 1 has no image"):
        prepare_control(units, base_arch=Arch.SD1, width=64, height=64, loader=FakeLoader())


def test_unit_without_image_uses_the_img2img_input():
    init = _image().resize((64, 64))
    cond = prepare_control([ControlUnit(model="x", module="none")], base_arch=Arch.SD1, width=64, height=64,
                           loader=FakeLoader(), init_image=init)
    assert np.array_equal(np.asarray(cond.images[0]), np.asarray(init))


def test_single_unit_kwargs_and_infotext():
    unit = ControlUnit(model="cn_a", module="canny", image=_image(), weight=0.8, guidance_start=0.1,
                       guidance_end=0.7, processor_res=256, threshold_a=50)
    cond = prepare_control([unit], base_arch=Arch.SD1, width=64, height=48, loader=FakeLoader())
    assert isinstance(cond, ControlConditioning)
    assert [im.size for im in cond.images] == [(64, 48)] and len(cond.maps) == 1
    assert cond.kwargs == {"controlnet_conditioning_scale": 0.8, "control_guidance_start": 0.1,
                           "control_guidance_end": 0.7, "guess_mode": False}
    assert cond.infotext == {"ControlNet 0": "Module: canny, Model: cn_a [abcd1234], Weight: 0.8, Resize Mode: Crop "
                             "and Resize, Processor Res: 256, Threshold A: 50.0, Threshold B: 200.0, Guidance Start: "
                             "0.1, Guidance End: 0.7, Pixel Perfect: False, Control Mode: Balanced"}


def test_pixel_perfect_sets_the_processor_resolution():
    unit = ControlUnit(model="cn_a", module="canny", image=_image(), pixel_perfect=True, processor_res=1024)
    cond = prepare_control([unit], base_arch=Arch.SD1, width=48, height=32, loader=FakeLoader())
    assert "Processor Res: 32," in cond.infotext["ControlNet 0"]  # 96x64 -> 48x32: k = 0.5, short side 32


def test_two_units_give_per_unit_lists_and_a_multi_controlnet():
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    units = [ControlUnit(model="a", module="canny", image=_image()),
             ControlUnit(model="b", module="invert", image=_image(), weight=0.5, guidance_start=0.2, guidance_end=0.9)]
    cond = prepare_control(units, base_arch=Arch.SD1, width=64, height=64, loader=FakeLoader())
    assert isinstance(cond.controlnet, MultiControlNetModel) and len(cond.controlnet.nets) == 2
    assert cond.kwargs == {"controlnet_conditioning_scale": [1.0, 0.5], "control_guidance_start": [0.0, 0.2],
                           "control_guidance_end": [1.0, 0.9], "guess_mode": False}
    assert set(cond.infotext) == {"ControlNet 0", "ControlNet 1"}


@pytest.mark.parametrize("modes,kind,guess", [
    ((0,), "Linear", False),
    ((2,), "Linear", True),  # diffusers guess_mode = "ControlNet is more important" exactly
    ((2, 2), "MultiControlNetModel", True),
    ((1,), "UnitControlNets", False),
    ((0, 2), "UnitControlNets", False),
])
def test_control_modes_pick_the_mechanism(modes, kind, guess):
    units = [ControlUnit(model=f"m{i}", module="none", image=_image(), control_mode=m) for i, m in enumerate(modes)]
    cond = prepare_control(units, base_arch=Arch.SD1, width=64, height=64, loader=FakeLoader(), do_cfg=True)
    assert type(cond.controlnet).__name__ == kind
    assert cond.kwargs["guess_mode"] is guess
    if kind == "UnitControlNets":
        assert cond.controlnet.soft == tuple(m != 0 for m in modes)
        assert cond.controlnet.cond_only == tuple(m == 2 for m in modes)


def test_soft_scales_are_sd_webui_controlnets():
    scales = soft_scales(13)
    expected = torch.tensor([0.825 ** (12 - i) for i in range(13)])
    assert torch.allclose(scales, expected, rtol=1e-2)  # 0.825 is 10^(-1/12) = 0.8254 rounded
    assert float(scales[-1]) == pytest.approx(1.0)


class _Residuals(torch.nn.Module):
    """Stands in for a ControlNet: every residual is ones x scale."""

    def forward(self, sample, conditioning_scale, guess_mode, **_):
        down = [torch.ones_like(sample) * conditioning_scale for _ in range(3)]
        return down, torch.ones_like(sample) * conditioning_scale


def test_unit_controlnets_apply_soft_scales_and_cond_only():
    nets = UnitControlNets([_Residuals(), _Residuals()], soft=[True, False], cond_only=[True, False], cfg=True)
    sample = torch.zeros(2, 1, 2, 2)  # [uncond, cond]
    down, mid = nets(sample, 1, None, [None, None], [1.0, 0.5], return_dict=False)
    scales = soft_scales(4)
    # unconditional half: only unit 1 (balanced, 0.5); conditional half: unit 0 soft-scaled + unit 1
    assert torch.allclose(down[0][0], torch.full((1, 2, 2), 0.5))
    assert torch.allclose(down[0][1], torch.full((1, 2, 2), float(scales[0]) + 0.5))
    assert torch.allclose(mid[1], torch.full((1, 2, 2), 1.5))


def test_unit_infotext_formats_like_sd_webui_controlnet():
    unit = ControlUnit(model="m", module="none", control_mode=2, resize_mode=2, pixel_perfect=True)
    text = unit_infotext(unit, module="none", title="m [1]", resolution=-1, a=None, b=None)
    assert text.startswith("Module: none, Model: m [1], Weight: 1.0, Resize Mode: Resize and Fill")
    assert text.endswith("Pixel Perfect: True, Control Mode: ControlNet is more important")
    assert control.RESIZE_NAMES[1] == "Crop and Resize"


@pytest.mark.parametrize("header,arch,layout,params_m", [
    ("controlnet_sd15_ldm", Arch.SD1, "ldm", 361.3),  # control_v11p_sd15_*: 361M parameters
    ("controlnet_sdxl_diffusers", Arch.SDXL, "diffusers", 1251.0),  # diffusers/controlnet-canny-sdxl-1.0
])
def test_real_width_layouts_build_the_full_size_model(header, arch, layout, params_m):
    """Headers with the real key sets and widths (tests/fixtures/headers): conversion, config and a strict
    load on the meta device give the full-size model."""
    import json
    from pathlib import Path

    from diffusers import ControlNetModel

    from webui.models.loaders import instantiate

    tensors = json.loads((Path(__file__).parents[1] / "fixtures" / "headers" / f"{header}.json").read_text())["tensors"]
    state = {k: torch.empty(shape, device="meta", dtype=torch.float16) for k, (_dtype, shape) in tensors.items()}
    found, own = cn.split_layout(state)
    assert found == layout
    weights = cn.convert_ldm_controlnet(own) if layout == "ldm" else own
    assert cn.arch_from_weights(weights) is arch
    config = cn.controlnet_config(weights, arch)
    model = instantiate(lambda: ControlNetModel.from_config(config), weights, "ControlNet")
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.1)
