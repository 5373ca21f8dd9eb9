"""Upscaler registry, safe loading, tiling and A1111 postprocessing semantics on tiny spandrel fixtures."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.upscaler_factory import write_bad_files, write_upscalers
from webui.generation.upscale import (UpscaleSettings, model_upscale, postprocess_infotext, run_upscale,
                                      target_size, tiled_apply, upscale_image)
from webui.generation.upscalers import (UpscalerError, find_upscaler, get_descriptor, list_upscalers,
                                        load_descriptor)
from webui.io.metadata import parse_infotext
from webui.models.cache import ComponentCache
from webui.types import RequestError, UpscaleRequest

CPU = UpscaleSettings(tile=24, overlap=8, device=torch.device("cpu"))


class NoCatalog:
    def list(self, kind):
        return []


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("upscalers")
    paths = write_upscalers(root / "ESRGAN")
    (root / "RealESRGAN").mkdir()
    paths["RealESRGAN_sibling"] = root / "RealESRGAN" / "RealESRGAN_sibling.pth"
    paths["RealESRGAN_sibling"].write_bytes(paths["realesr-general-x4v3-tiny"].read_bytes())
    return SimpleNamespace(root=root, paths=paths, bad=write_bad_files(root / "bad"),
                           entries=list_upscalers(NoCatalog(), root / "ESRGAN"), cache=ComponentCache(1 << 30))


def noise(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 255, (h, w, channels), dtype=np.uint8), mode)


def test_registry_names_builtins_and_both_folders(models):
    names = [e.name for e in models.entries]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    for expected in ("4x-TinyUltraSharp", "RealESRGAN_x4plus_tiny", "realesr-general-x4v3-tiny", "2x-TinyCompact",
                     "4x-TinyESRGAN-st", "RealESRGAN_sibling"):
        assert expected in names
    assert find_upscaler(models.entries, "realesr-general-x4v3-tiny.pth").name == "realesr-general-x4v3-tiny"
    assert find_upscaler(models.entries, "lanczos").kind == "resample"
    with pytest.raises(RequestError, match="not found"):
        find_upscaler(models.entries, "RealESRGAN_x4plus")
    api = find_upscaler(models.entries, "2x-TinyCompact").as_api()
    assert api["scale"] == 2 and api["model_path"].endswith(".safetensors")


@pytest.mark.parametrize("name, arch, scale", [
    ("4x-TinyUltraSharp", "ESRGAN", 4), ("RealESRGAN_x4plus_tiny", "ESRGAN", 4), ("4x-TinyESRGAN-st", "ESRGAN", 4),
    ("realesr-general-x4v3-tiny", "RealESRGAN Compact", 4), ("2x-TinyCompact", "RealESRGAN Compact", 2),
])
def test_spandrel_loads_every_layout(models, name, arch, scale):
    descriptor = load_descriptor(models.paths[name])
    assert descriptor.architecture.name == arch and descriptor.scale == scale


def test_old_and_new_rrdb_layouts_are_the_same_network(models):
    img = noise(12, 10)
    a = model_upscale(load_descriptor(models.paths["4x-TinyUltraSharp"]), img, tile=0, overlap=0,
                      device=torch.device("cpu"))
    b = model_upscale(load_descriptor(models.paths["RealESRGAN_x4plus_tiny"]), img, tile=0, overlap=0,
                      device=torch.device("cpu"))
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bad, message", [
    ("not_upscaler", "not an upscaler model"), ("evil", "refused to load"), ("corrupt", "corrupt"),
    ("corrupt_pth", "corrupt"),
])
def test_bad_files_are_refused_with_a_message(models, bad, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UpscalerError, match=message) as info:
        load_descriptor(models.bad[bad])
    assert models.bad[bad].name in str(info.value)
    assert not list(tmp_path.iterdir())  # the pickle payload did not run


def test_tiled_equals_untiled_for_a_convolutional_model(models):
    descriptor = get_descriptor(models.cache, find_upscaler(models.entries, "realesr-general-x4v3-tiny"))
    img = noise(70, 52)
    whole = np.asarray(model_upscale(descriptor, img, tile=0, overlap=0, device=torch.device("cpu")), dtype=float)
    seen = []
    tiled = np.asarray(model_upscale(descriptor, img, tile=32, overlap=12, device=torch.device("cpu"),
                                     on_tile=lambda i, n: seen.append((i, n))), dtype=float)
    assert whole.shape == tiled.shape == (208, 280, 3)
    assert seen[-1][0] == seen[-1][1] > 1
    assert np.abs(whole - tiled).mean() < 1.0 and np.abs(whole - tiled).max() <= 8


def test_tiled_apply_identity_blend_is_exact():
    x = torch.rand(1, 3, 37, 53)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    out = tiled_apply(up, x, scale=2, tile=16, overlap=6)
    assert torch.allclose(out, up(x), atol=1e-5)


def test_tile_reduces_on_out_of_memory(models):
    descriptor = get_descriptor(models.cache, find_upscaler(models.entries, "2x-TinyCompact"))
    calls = []

    class OomOnBigTiles:
        def __init__(self, inner):
            self.inner, self.scale = inner, inner.scale
            self.supports_half, self.size_requirements, self.model = (inner.supports_half, inner.size_requirements,
                                                                      inner.model)

        def __call__(self, t):
            calls.append(t.shape[-1])
            if max(t.shape[-2:]) > 40:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
            return self.inner(t)

    out = model_upscale(OomOnBigTiles(descriptor), noise(64, 64), tile=128, overlap=4, device=torch.device("cpu"))
    assert out.size == (128, 128) and max(calls[1:]) <= 40


@pytest.mark.parametrize("mode, kwargs, expected", [
    (0, dict(scale=2.0), (100, 60)),
    (0, dict(scale=1.5), (75, 45)),
    (0, dict(scale=3.3), (165, 99)),
    (1, dict(target_w=120, target_h=120, crop=True), (120, 120)),
    (1, dict(target_w=120, target_h=120, crop=False), (200, 120)),
    (1, dict(target_w=77, target_h=31, crop=True), (77, 31)),
])
@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest", "None", "2x-TinyCompact", "4x-TinyUltraSharp"])
def test_output_size_is_exact_for_every_scale_mode(models, mode, kwargs, expected, upscaler):
    args = {**dict(scale=2.0, target_w=0, target_h=0, crop=False), **kwargs}
    out, params = upscale_image(noise(50, 30), upscaler_1=find_upscaler(models.entries, upscaler), upscaler_2=None,
                                visibility=0, resize_mode=mode, cache=models.cache, settings=CPU, **args)
    assert out.size == expected and out.mode == "RGB"
    assert params["Postprocess upscaler"] == upscaler


def test_target_size_rules():
    assert target_size(50, 30, resize_mode=0, scale=4, target_w=0, target_h=0, crop=False) == ((200, 120), None)
    assert target_size(50, 30, resize_mode=1, scale=1, target_w=100, target_h=100, crop=True) == ((167, 100), (100, 100))
    with pytest.raises(RequestError):
        target_size(50, 30, resize_mode=1, scale=1, target_w=0, target_h=10, crop=True)


def test_alpha_is_preserved(models):
    img = noise(20, 16, "RGBA")
    arr = np.asarray(img).copy()
    arr[:, :10, 3] = 0
    arr[:, 10:, 3] = 255
    out, params = upscale_image(Image.fromarray(arr, "RGBA"), upscaler_1=find_upscaler(models.entries, "2x-TinyCompact"),
                                upscaler_2=None, visibility=0, resize_mode=0, scale=2, target_w=0, target_h=0,
                                crop=False, cache=models.cache, settings=CPU)
    assert out.mode == "RGBA" and out.size == (40, 32)
    alpha = np.asarray(out.getchannel("A"))
    assert alpha[:, :15].max() < 30 and alpha[:, 25:].min() > 225
    assert params["Postprocess alpha"] == "kept"


def test_one_pixel_image_and_upscaler_2_blend(models):
    out, params = upscale_image(Image.new("RGB", (1, 1), (200, 10, 10)),
                                upscaler_1=find_upscaler(models.entries, "4x-TinyUltraSharp"),
                                upscaler_2=find_upscaler(models.entries, "Nearest"), visibility=0.5, resize_mode=0,
                                scale=4, target_w=0, target_h=0, crop=False, cache=models.cache, settings=CPU)
    assert out.size == (4, 4)
    assert params["Postprocess upscaler 2"] == "Nearest" and params["Postprocess upscaler 2 visibility"] == 0.5


def test_request_validation_messages():
    with pytest.raises(RequestError, match="largest accepted side"):
        UpscaleRequest(images=(SimpleNamespace(size=(20000, 20000)),), upscaler_1="Lanczos")
    with pytest.raises(RequestError, match="no image"):
        UpscaleRequest(images=(), upscaler_1="Lanczos")
    with pytest.raises(RequestError, match="resize_mode"):
        UpscaleRequest(images=(Image.new("RGB", (4, 4)),), resize_mode=3)
    with pytest.raises(RequestError, match="visibility"):
        UpscaleRequest(images=(Image.new("RGB", (4, 4)),), extras_upscaler_2_visibility=2)


def test_too_large_output_is_refused(models):
    with pytest.raises(RequestError, match="largest side"):
        upscale_image(Image.new("RGB", (8000, 10)), upscaler_1=find_upscaler(models.entries, "Lanczos"),
                      upscaler_2=None, visibility=0, resize_mode=0, scale=4, target_w=0, target_h=0, crop=False,
                      cache=None, settings=CPU)


def test_infotext_appends_to_source_and_parses():
    text = postprocess_infotext("a cat\nSteps: 20, Sampler: Euler, Seed: 1",
                                {"Postprocess upscale by": 4, "Postprocess upscaler": "R-ESRGAN 4x+"})
    parsed = parse_infotext(text)
    assert parsed["Steps"] == "20" and parsed["Postprocess upscaler"] == "R-ESRGAN 4x+"
    assert parsed["Postprocess upscale by"] == "4"
    alone = parse_infotext(postprocess_infotext(None, {"Postprocess upscale by": 2, "Postprocess upscaler": "Lanczos",
                                                       "Postprocess upscaler 2": "Nearest"}))
    assert alone["Postprocess upscaler 2"] == "Nearest"


class Control:
    def __init__(self, stop_after=None):
        self.updates, self.stop_after = [], stop_after

    def update(self, **kw):
        self.updates.append(kw)

    @property
    def interrupted(self):
        return self.stop_after is not None and sum("tile" in u.get("text", "") for u in self.updates) >= self.stop_after


def test_run_upscale_saves_png_with_infotext_and_reports_tiles(models, tmp_path):
    from webui.io.metadata import read_infotext

    request = UpscaleRequest(images=(noise(40, 40), noise(20, 30, "RGBA")), upscaler_1="2x-TinyCompact")
    control = Control()
    result = run_upscale(request, entries=models.entries, cache=models.cache, settings=CPU, control=control,
                         outdir=tmp_path)
    assert [img.image.size for img in result.images] == [(80, 80), (40, 60)]
    assert all(Path(img.path).suffix == ".png" for img in result.images)
    assert read_infotext(result.images[0].path) == "Postprocess upscale by: 2, Postprocess upscaler: 2x-TinyCompact"
    assert Image.open(result.images[1].path).mode == "RGBA"
    assert any("tile 4/4" in u.get("text", "") for u in control.updates)


def test_run_upscale_interrupt_between_tiles(models):
    request = UpscaleRequest(images=(noise(64, 64),), upscaler_1="2x-TinyCompact", save_images=False)
    result = run_upscale(request, entries=models.entries, cache=models.cache, settings=CPU,
                         control=Control(stop_after=2), outdir=None)
    assert result.interrupted and not result.images
