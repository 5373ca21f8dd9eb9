"""ControlNet preprocessors: output sizes and content, parameters, missing annotator files, extensions."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from webui.generation import preprocessors as pp
from webui.generation.preprocessors import PreprocessorRegistry, run_preprocessor
from webui.models.cache import ComponentCache
from webui.types import RequestError


def square(width=96, height=64) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle((30, 16, 66, 48), fill="black")
    return image


def arr(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_canny_gives_an_edge_map_at_the_processor_resolution():
    out = run_preprocessor("canny", square(), resolution=128)
    assert out.mode == "RGB" and out.size == (192, 128)  # short side = resolution, aspect kept
    edges = arr(out)[..., 0]
    assert set(np.unique(edges)) <= {0, 255}
    assert edges[32:96, 60:62].max() == 255  # the square's left edge (x = 30 * 2)
    assert edges[40:90, 70:120].max() == 0  # flat inside the square
    assert edges[:20, :40].max() == 0  # flat background


def test_canny_thresholds_change_the_map():
    from PIL import ImageFilter

    noise = (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)
    image = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2)).convert("RGB")  # soft and strong edges
    low = (arr(run_preprocessor("canny", image, resolution=64, threshold_a=10, threshold_b=30)) > 0).sum()
    high = (arr(run_preprocessor("canny", image, resolution=64, threshold_a=200, threshold_b=250)) > 0).sum()
    assert low > high


def test_none_and_invert():
    image = square()
    assert np.array_equal(arr(run_preprocessor("none", image)), arr(image))
    inverted = run_preprocessor("invert", image, resolution=64)
    assert np.array_equal(arr(inverted), 255 - arr(image))


def test_weight_free_line_maps_are_white_lines_on_black():
    for name in ("lineart_standard", "scribble_xdog"):
        out = arr(run_preprocessor(name, square(), resolution=64))
        assert out.shape == (64, 96, 3)
        assert out[:10, :20].max() == 0, name  # background: black
        assert out[14:50, 26:70].max() > 100, name  # lines near the square's outline


def test_shuffle_is_deterministic_and_keeps_colours():
    a = arr(run_preprocessor("shuffle", square(), resolution=64))
    b = arr(run_preprocessor("shuffle", square(), resolution=64))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, arr(square()))
    assert a.min() < 30 and a.max() > 225  # still made of the input's black and white


def test_tile_resample_and_threshold_parameters():
    assert run_preprocessor("tile_resample", square(), threshold_a=2).size == (48, 32)
    grey = Image.new("RGB", (64, 64), (100, 100, 100))
    assert arr(run_preprocessor("threshold", grey, resolution=64, threshold_a=50)).min() == 255
    assert arr(run_preprocessor("threshold", grey, resolution=64, threshold_a=150)).max() == 0


def test_rgba_input_is_flattened_on_white():
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert arr(run_preprocessor("none", image)).min() == 255


def test_missing_annotator_names_the_file_and_the_folder(tmp_path):
    with pytest.raises(RequestError) as exc:
        run_preprocessor("depth_midas", square(), annotators_dir=tmp_path)
    message = str(exc.value)
    assert "dpt_hybrid-midas-501f0c75.pt" in message and str(tmp_path) in message
    with pytest.raises(RequestError, match="body_pose_model.pth, hand_pose_model.pth, facenet.pth"):
        run_preprocessor("openpose", square(), annotators_dir=tmp_path)


def test_names_descriptions_and_lookup():
    registry = PreprocessorRegistry()
    names = registry.names()
    assert names[0] == "none" and {"canny", "shuffle", "lineart_standard", "depth_midas", "openpose"} <= set(names)
    assert registry.describe("canny")["sliders"][1:] == [
        {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1.0},
        {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255, "step": 1.0}]
    assert registry.describe("depth_midas")["model_free"] is False
    assert registry.canonical("CANNY") == "canny" and registry.canonical("lineart") == "lineart_realistic"
    with pytest.raises(RequestError, match="not a ControlNet preprocessor; choose one of: none, invert, canny"):
        registry.get("cany")


def test_extension_preprocessors_join_the_registry():
    seen = {}

    def posterize(image, **params):
        seen.update(params)
        return image.convert("L").point(lambda v: 255 if v > 128 else 0)

    entry = SimpleNamespace(name="posterize", factory=posterize, description="Posterize")
    registry = PreprocessorRegistry().with_entries([("my_ext", entry),
                                                    ("other", SimpleNamespace(name="Canny", factory=posterize))])
    assert "posterize" in registry.names() and registry.names().count("canny") == 1
    assert any("'Canny'" in r for r in registry.refused)
    out = registry.run("posterize", square(), resolution=256, threshold_a=3)
    assert out.mode == "RGB" and out.size == (96, 64)
    assert seen == {"resolution": 256, "threshold_a": 3.0, "threshold_b": 0.0}
    # the module-level API takes the same entries as a mapping
    assert run_preprocessor("posterize", square(), extra={"posterize": posterize}).size == (96, 64)


def test_extension_entries_run_through_the_plugin_manager():
    calls = []

    class Plugins:
        def registry_entries(self, hook):
            assert hook == "webui_controlnet_preprocessors"
            return [("ext", SimpleNamespace(name="flip", factory=lambda image, **p: image.transpose(0)))]

        def call_entry(self, name, where, fn, *args, **kwargs):
            calls.append((name, where))
            return fn(*args, **kwargs)

    registry = PreprocessorRegistry.from_plugins(Plugins())
    out = registry.run("flip", square())
    assert np.array_equal(arr(out), arr(square())[:, ::-1])
    assert calls == [("ext", "ControlNet preprocessor 'flip'")]


def test_annotator_weights_load_locally_and_are_cached(tmp_path):
    """softedge_hed with a random-weight HED network saved where real annotators go: loaded from the
    folder (no download), run, and kept in the ComponentCache."""
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), tmp_path / "ControlNetHED.pth")
    cache = ComponentCache(1 << 30)
    registry = PreprocessorRegistry(cache=cache)
    out = registry.run("softedge_hed", square(), resolution=64, annotators_dir=tmp_path)
    assert out.size == (96, 64) and out.mode == "RGB"
    assert cache.stats().entries == 1
    registry.run("softedge_hed", square(), resolution=64, annotators_dir=tmp_path)
    assert cache.stats().hits == 1


def test_damaged_annotator_file_is_reported(tmp_path):
    (tmp_path / "ControlNetHED.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RequestError, match="could not load ControlNetHED.pth"):
        run_preprocessor("softedge_hed", square(), annotators_dir=tmp_path)


def test_annotators_dir_is_inside_the_controlnet_folder(tmp_path):
    assert pp.annotators_dir(SimpleNamespace(controlnet_dir=tmp_path)) == tmp_path / "annotators"
