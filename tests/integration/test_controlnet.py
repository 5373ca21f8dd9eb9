"""ControlNet end to end on tiny models: every file layout through the loader and a real ComponentCache,
then diffusers ControlNet pipelines built with ``from_pipe`` over a loaded checkpoint (CPU, 64x64, 2 steps).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.fixtures.controlnet_factory import LAYOUT, build_controlnet, place_controlnets
from tests.fixtures.factory import TinyModels
from webui.generation.control import UnitControlNets, prepare_control
from webui.generation.pipeline_tasks import task_pipeline
from webui.image_requests import ControlUnit
from webui.models import loaders
from webui.models.cache import ComponentCache
from webui.models.catalog import Catalog
from webui.models.controlnet import ControlNetLoader
from webui.types import Arch, RequestError

SD1_NAMES = ("tiny_control_sd15_canny", "tiny_control_sd15_noprefix", "tiny_cn_sd15_diffusers")
SDXL_NAMES = ("tiny_cn_sdxl", "tiny_control_sdxl_ldm")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("controlnet")
    tiny = TinyModels(root, fixture_cache)
    tiny.path("sd15")
    tiny.path("sdxl")
    place_controlnets(root / "models" / "ControlNet", fixture_cache, names=tuple(LAYOUT))
    annotators = root / "models" / "ControlNet" / "annotators"
    annotators.mkdir()
    (annotators / "ControlNetHED.pth").write_bytes(b"\0" * 64)  # annotator weights are not ControlNets
    return SimpleNamespace(root=root, tiny=tiny, controlnet_dir=root / "models" / "ControlNet")


def make_loader(models_root, *, allow_pickle=False, budget=1 << 30):
    catalog = Catalog({"controlnet": [models_root.controlnet_dir]}, allow_pickle=allow_pickle)
    catalog.refresh()
    cache = ComponentCache(budget)
    return ControlNetLoader(catalog, cache, SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32),
                            allow_pickle=allow_pickle), cache


def reference_state(arch: str, seed: int) -> dict:
    return build_controlnet(arch, seed=seed).state_dict()


def test_catalog_lists_each_layout_and_skips_annotators(models_root):
    loader, _ = make_loader(models_root)
    assert loader.names_for(Arch.SD1) == sorted(SD1_NAMES, key=str.casefold)
    assert loader.names_for(Arch.SDXL) == list(SDXL_NAMES)
    assert not any("annotators" in r.name for r in loader._catalog.list("controlnet"))


@pytest.mark.parametrize("name,arch,key,seed", [
    ("tiny_control_sd15_canny", Arch.SD1, "sd1", 20),
    ("tiny_control_sd15_noprefix", Arch.SD1, "sd1", 21),
    ("tiny_cn_sd15_diffusers", Arch.SD1, "sd1", 20),
    ("tiny_cn_sdxl", Arch.SDXL, "sdxl", 20),
    ("tiny_control_sdxl_ldm", Arch.SDXL, "sdxl", 22),
])
def test_each_format_loads_exactly_and_is_cached(models_root, name, arch, key, seed):
    loader, cache = make_loader(models_root)
    model = loader.get(name, arch)
    expected = reference_state(key, seed)
    state = model.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    hits = cache.stats().hits
    assert loader.get(name, arch) is model
    assert cache.stats().hits == hits + 1 and cache.stats().entries == 1


def test_pickle_loads_only_with_allow_pickle(models_root):
    loader, _ = make_loader(models_root)
    with pytest.raises(RequestError, match="allow-pickle"):
        loader.get("tiny_control_sd15_pickle", Arch.SD1)
    loader, _ = make_loader(models_root, allow_pickle=True)
    with pytest.raises(RequestError, match="is for SD 1.x but the loaded checkpoint is SDXL"):
        loader.get("tiny_control_sd15_pickle", Arch.SDXL)  # arch known only after loading
    model = loader.get("tiny_control_sd15_pickle", Arch.SD1)
    expected = reference_state("sd1", 23)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_wrong_arch_with_real_files(models_root):
    loader, _ = make_loader(models_root)
    with pytest.raises(RequestError, match="tiny_cn_sdxl is for SDXL but the loaded checkpoint is SD 1.x: "
                                           "pick an SD 1.x ControlNet"):
        loader.get("tiny_cn_sdxl", Arch.SD1)


# ---------------------------------------------------------------------------------------------- generation
def control_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill="black")
    return image


@pytest.fixture(scope="module")
def sd15(models_root):
    components = loaders.load_checkpoint(models_root.tiny.path("sd15"), arch=Arch.SD1)
    pipe = loaders.build_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(arch=Arch.SD1, pipe=pipe, task_pipes={}, components=components)


def generate(model, cond, *, task="txt2img", cfg=5.0, **extra):
    pipe = task_pipeline(model, task, controlnet=cond.controlnet if cond else None)
    kwargs = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=2, width=64, height=64,
                  guidance_scale=cfg, generator=torch.Generator().manual_seed(3), output_type="np", **extra)
    if cond is not None:
        kwargs["image" if task == "txt2img" else "control_image"] = cond.images
        kwargs.update(cond.kwargs)
    with torch.no_grad():
        return pipe(**kwargs).images[0]


def cond_for(loader, units, arch=Arch.SD1, **kw):
    return prepare_control(units, base_arch=arch, width=64, height=64, loader=loader, **kw)


def test_sd1_txt2img_control_changes_the_image(models_root, sd15):
    loader, _ = make_loader(models_root)
    plain = generate(sd15, None)
    unit = dict(model="tiny_control_sd15_canny", module="canny", image=control_image(), processor_res=64)
    controlled = generate(sd15, cond_for(loader, [ControlUnit(**unit)]))
    zero = generate(sd15, cond_for(loader, [ControlUnit(**unit, weight=0.0)]))
    assert np.abs(controlled - plain).mean() > 1e-3
    assert np.abs(controlled - zero).mean() > 1e-3
    assert np.abs(zero - plain).max() < 1e-4  # weight 0 adds zero residuals


def test_sd1_two_units_and_guidance_window(models_root, sd15):
    loader, _ = make_loader(models_root)
    units = [ControlUnit(model="tiny_control_sd15_canny", module="canny", image=control_image(), processor_res=64),
             ControlUnit(model="tiny_cn_sd15_diffusers", module="invert", image=control_image(), processor_res=64)]
    both = generate(sd15, cond_for(loader, units))
    one = generate(sd15, cond_for(loader, units[:1]))
    assert np.abs(both - one).mean() > 1e-3
    late = [units[0], ControlUnit(model="tiny_cn_sd15_diffusers", module="invert", image=control_image(),
                                  processor_res=64, guidance_start=0.6)]  # second unit skips step 0 of 2
    assert np.abs(generate(sd15, cond_for(loader, late)) - both).mean() > 1e-4


def test_control_modes_change_the_output(models_root, sd15):
    loader, _ = make_loader(models_root)
    base = dict(model="tiny_control_sd15_canny", module="canny", image=control_image(), processor_res=64)
    outputs = [generate(sd15, cond_for(loader, [ControlUnit(**base, control_mode=mode)], do_cfg=True))
               for mode in (0, 1, 2)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(outputs[i] - outputs[j]).mean() > 1e-4, (i, j)
    # "ControlNet is more important" per unit (UnitControlNets: soft scales + conditional branch only)
    # gives what diffusers' guess_mode gives for the whole pipeline.
    model = loader.get("tiny_control_sd15_canny", Arch.SD1)
    per_unit = cond_for(loader, [ControlUnit(**base, control_mode=2)], do_cfg=True)
    wrapped = SimpleNamespace(controlnet=UnitControlNets([model], soft=[True], cond_only=[True], cfg=True),
                              images=per_unit.images,
                              kwargs={**per_unit.kwargs, "guess_mode": False,
                                      "controlnet_conditioning_scale": [1.0], "control_guidance_start": [0.0],
                                      "control_guidance_end": [1.0]})
    assert np.abs(generate(sd15, wrapped) - outputs[2]).max() < 1e-4


def test_img2img_unit_uses_the_init_image(models_root, sd15):
    loader, _ = make_loader(models_root)
    init = control_image()
    cond = cond_for(loader, [ControlUnit(model="tiny_control_sd15_canny", module="canny", processor_res=64)],
                    init_image=init)
    out = generate(sd15, cond, task="img2img", image=init, strength=0.6)
    plain = generate(sd15, None, task="img2img", image=init, strength=0.6)
    assert out.shape == (64, 64, 3) and np.abs(out - plain).mean() > 1e-3


def test_sdxl_txt2img_with_two_units(models_root):
    components = loaders.load_checkpoint(models_root.tiny.path("sdxl"), arch=Arch.SDXL)
    model = SimpleNamespace(arch=Arch.SDXL, pipe=loaders.build_pipeline(components), task_pipes={},
                            components=components)
    model.pipe.set_progress_bar_config(disable=True)
    loader, _ = make_loader(models_root)
    units = [ControlUnit(model=name, module="canny", image=control_image(), processor_res=64, control_mode=mode)
             for name, mode in zip(SDXL_NAMES, (0, 1))]
    cond = cond_for(loader, units, arch=Arch.SDXL, do_cfg=True)
    assert isinstance(cond.controlnet, UnitControlNets)
    assert np.abs(generate(model, cond) - generate(model, None)).mean() > 1e-3
