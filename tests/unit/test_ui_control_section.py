"""ControlNet / reference-image section: widget values -> ControlUnit / ReferenceImages, model lists, layout."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from webui.image_requests import CONTROL_MODES, ControlUnit, ReferenceImages
from webui.models.catalog import ModelRecord
from webui.types import Arch, ModelKind, RequestError
from webui.ui import control_section as cs


def rgb(width=64, height=48, color=(10, 200, 30)):
    return Image.new("RGB", (width, height), color)


def unit_values(i=0, **changes):
    """One unit as the page sends it untouched (labels for radios, -1 for hidden thresholds)."""
    values = {
        "enabled": True, "image": rgb(), "module": "canny", "model": "control_canny", "weight": 1.0,
        "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "Balanced", "resize_mode": "Crop and Resize",
        "pixel_perfect": False, "processor_res": 512, "threshold_a": -1, "threshold_b": -1,
    }
    values.update(changes)
    return {f"cn{i}_{k}": v for k, v in values.items()}


def ip_values(j=0, **changes):
    values = {"model": "", "images": None, "weight": 1.0}
    values.update(changes)
    return {f"ip{j}_{k}": v for k, v in values.items()}


def page_values(*units, slots=None):
    out = {}
    for i, unit in enumerate(units):
        out.update(unit_values(i, **unit))
    for j, slot in enumerate(slots or [{}, {}]):
        out.update(ip_values(j, **slot))
    return out


def test_every_unit_field_is_converted():
    image = rgb()
    values = page_values({"image": image, "module": "canny", "model": "sd15_canny", "weight": 0.55,
                          "guidance_start": 0.1, "guidance_end": 0.8, "control_mode": "ControlNet is more important",
                          "resize_mode": "Resize and Fill", "pixel_perfect": True, "processor_res": 256,
                          "threshold_a": 50, "threshold_b": 120.5})
    units, refs = cs.requests_from(values, "txt2img")
    assert refs == ()
    (unit,) = units
    assert isinstance(unit, ControlUnit)
    assert unit.enabled and unit.image is image
    assert (unit.module, unit.model, unit.weight) == ("canny", "sd15_canny", 0.55)
    assert (unit.guidance_start, unit.guidance_end) == (0.1, 0.8)
    assert unit.control_mode == "ControlNet is more important"
    assert unit.resize_mode == 2 and unit.pixel_perfect is True
    assert (unit.processor_res, unit.threshold_a, unit.threshold_b) == (256, 50.0, 120.5)


def test_defaults_and_unset_sliders():
    values = page_values({"processor_res": -1, "threshold_a": -1, "threshold_b": None, "control_mode": None,
                          "resize_mode": "", "module": ""})
    (unit,) = cs.requests_from(values, "txt2img")[0]
    assert unit.processor_res == 512 and unit.threshold_a is None and unit.threshold_b is None
    assert unit.control_mode == "Balanced" and unit.resize_mode == 1 and unit.module == "none"


@pytest.mark.parametrize(("sent", "expected"), [(0, "Balanced"), (1, "My prompt is more important"),
                                                 ("2", "ControlNet is more important"),
                                                 ("my prompt is more important", "My prompt is more important")])
def test_control_mode_by_name_or_number(sent, expected):
    (unit,) = cs.requests_from(page_values({"control_mode": sent}), "txt2img")[0]
    assert unit.control_mode == expected


@pytest.mark.parametrize(("sent", "expected"), [(0, 0), ("1", 1), (2.0, 2), ("Just Resize", 0),
                                                 ("resize and fill", 2), ("Crop and Resize", 1)])
def test_resize_mode_by_name_or_number(sent, expected):
    (unit,) = cs.requests_from(page_values({"resize_mode": sent}), "txt2img")[0]
    assert unit.resize_mode == expected


@pytest.mark.parametrize(("field", "sent", "message"), [
    ("control_mode", 3, "control mode 3 is not one of: 0 = Balanced, 1 = My prompt"),
    ("control_mode", "Prompt wins", "control mode 'Prompt wins' is not one of: 0 = Balanced"),
    ("resize_mode", 5, "resize mode 5 is not one of: 0 = Just Resize, 1 = Crop and Resize, 2 = Resize and Fill"),
    ("resize_mode", "Stretch", "resize mode 'Stretch' is not one of"),
    ("weight", 2.5, "weight must be between 0.0 and 2.0"),
    ("weight", "heavy", "weight must be a number"),
    ("processor_res", 300.5, "whole number of pixels"),
    ("processor_res", 32, "processor resolution must be between 64 and 2048"),
    ("guidance_start", 0.9, "guidance start 0.9 must be below its end 0.5"),
])
def test_bad_values_name_the_unit(field, sent, message):
    changes = {field: sent}
    if field == "guidance_start":
        changes["guidance_end"] = 0.5
    values = page_values({}, changes)
    with pytest.raises(RequestError, match=message) as info:
        cs.requests_from(values, "txt2img")
    assert str(info.value).startswith("ControlNet unit 1")


def test_disabled_units_are_dropped_and_order_kept():
    values = page_values({"enabled": False, "model": ""}, {"model": "b", "weight": 0.5}, {"model": "c"})
    units, _ = cs.requests_from(values, "txt2img")
    assert [u.model for u in units] == ["b", "c"]
    assert units[0].weight == 0.5
    assert cs.requests_from(page_values({"enabled": False}, {"enabled": "false"}), "txt2img") == ((), ())


def test_enabled_unit_without_model_is_an_error():
    with pytest.raises(RequestError, match="ControlNet unit 0: ControlNet unit has no model"):
        cs.requests_from(page_values({"model": ""}), "img2img")


def test_missing_image_is_an_error_in_txt2img_only():
    values = page_values({"image": None})
    with pytest.raises(RequestError, match="ControlNet unit 0 .* has no control image: upload one"):
        cs.requests_from(values, "txt2img")
    (unit,) = cs.requests_from(values, "img2img")[0]
    assert unit.image is None  # img2img: the input image is used


def test_image_forms_become_pil(tmp_path):
    path = tmp_path / "control.png"
    rgb(32, 16).save(path)
    array = np.zeros((16, 32, 4), dtype=np.uint8)
    for value in (str(path), {"path": str(path)}, array, rgb(32, 16).convert("RGBA")):
        (unit,) = cs.requests_from(page_values({"image": value}), "txt2img")[0]
        assert isinstance(unit.image, Image.Image) and unit.image.size == (32, 16) and unit.image.mode == "RGB"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(RequestError, match="ControlNet unit 0 image: cannot read bad.png"):
        cs.requests_from(page_values({"image": str(tmp_path / "bad.png")}), "txt2img")


def test_reference_image_slots():
    a, b, c = rgb(color=(1, 2, 3)), rgb(color=(4, 5, 6)), rgb(color=(7, 8, 9))
    values = page_values({"enabled": False}, slots=[
        {"model": "ip-adapter_sd15", "images": [(a, None), (b, "caption")], "weight": 0.7},
        {"model": "ip-adapter-plus_sd15", "images": [c]},
    ])
    units, refs = cs.requests_from(values, "txt2img")
    assert units == ()
    assert all(isinstance(r, ReferenceImages) for r in refs)
    assert [(r.model, r.weight, len(r.images)) for r in refs] == [("ip-adapter_sd15", 0.7, 2),
                                                                   ("ip-adapter-plus_sd15", 1.0, 1)]
    assert refs[0].images == (a, b) and refs[1].images == (c,)


def test_reference_slot_errors_and_empty_slots():
    assert cs.requests_from(page_values(slots=[{}, {"weight": 1.5}]), "txt2img") == ((), ())
    with pytest.raises(RequestError, match="Reference images 1: pick an IP-Adapter model for the 1 image"):
        cs.requests_from(page_values(slots=[{"images": [rgb()]}]), "txt2img")
    with pytest.raises(RequestError, match="Reference images 2: .*add at least one reference image"):
        cs.requests_from(page_values(slots=[{}, {"model": "ip"}]), "txt2img")
    with pytest.raises(RequestError, match="Reference images 1: IP-Adapter ip weight must be between"):
        cs.requests_from(page_values(slots=[{"model": "ip", "images": [rgb()], "weight": 3}]), "txt2img")


def test_input_names_cover_the_value_widgets_only():
    components = {**page_values({}, {}), "cn0_preview": 1, "cn0_preview_button": 1, "cn0_refresh": 1,
                  "controlnet_hint": 1, "ipadapter_refresh": 1, "prompt": 1}
    names = cs.input_names(components)
    assert "cn1_threshold_b" in names and "ip1_images" in names and "cn0_enabled" in names
    assert not {"cn0_preview", "cn0_preview_button", "cn0_refresh", "controlnet_hint", "prompt"} & set(names)
    assert len(names) == 2 * len(cs.UNIT_PARTS) + 2 * len(cs.IP_PARTS)


def test_sliders_follow_the_preprocessor():
    from webui.generation.preprocessors import PreprocessorRegistry

    registry = PreprocessorRegistry()
    resolution, a, b = cs.slider_updates(registry, "canny")
    assert resolution["visible"] and (a["label"], a["value"], a["visible"]) == ("Canny Low Threshold", 100, True)
    assert (b["label"], b["value"]) == ("Canny High Threshold", 200)
    assert (a["minimum"], a["maximum"], a["step"]) == (1, 255, 1)
    resolution, a, b = cs.slider_updates(registry, "tile_resample")
    assert not resolution["visible"] and a["label"] == "Down Sampling Rate" and a["step"] == 0.01
    assert (b["visible"], b["value"]) == (False, cs.UNSET)
    resolution, a, b = cs.slider_updates(registry, "none")
    assert not resolution["visible"] and not a["visible"] and not b["visible"]
    assert a["minimum"] <= cs.UNSET and a["maximum"] >= 255  # first render: API callers may send any value or -1
    assert cs.slider_updates(registry, "no such thing")[1]["visible"] is False


def square(size=64):
    image = Image.new("RGB", (size, size), (0, 0, 0))
    image.paste((255, 255, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def test_preview_runs_the_preprocessor(tmp_path):
    ctx = SimpleNamespace(settings=SimpleNamespace(controlnet_dir=tmp_path))
    values = {"image": square(), "module": "canny", "processor_res": 64, "threshold_a": -1, "threshold_b": -1,
              "pixel_perfect": False, "resize_mode": "Crop and Resize"}
    edges = np.asarray(cs.run_preview(ctx, values).convert("L"))
    assert edges.shape == (64, 64) and set(np.unique(edges)) == {0, 255}
    assert edges[16:48, 16:48].any() and not edges[24:40, 24:40].any()  # the outline, not the flat inside
    # an empty unit image falls back to the tab's input image; pixel perfect follows the output size
    big = cs.run_preview(ctx, {**values, "image": None, "pixel_perfect": True}, fallback=square(), target=(128, 96))
    assert big.size == (128, 128)
    with pytest.raises(RequestError, match="no control image"):
        cs.run_preview(ctx, {**values, "image": None})
    with pytest.raises(RequestError, match="needs the annotator file"):
        cs.run_preview(ctx, {**values, "module": "depth_midas"})


# ---- model lists and hints (a catalog stand-in holding real ModelRecords) -------------------------------
def record(name, arch, kind=ModelKind.CONTROLNET, error=None):
    return ModelRecord(name=name, filename=f"{name}.safetensors", path=Path(f"/m/{name}.safetensors"),
                       folder=kind, kind=kind, arch=arch, error=error)


class FakeCatalog:
    def __init__(self, records, checkpoint_arch=Arch.SD1):
        self.records, self.arch = records, checkpoint_arch

    def list(self, kind):
        if kind not in ("controlnet", "ip_adapter"):
            raise ValueError(kind)
        return [r for r in self.records if r.folder.value == kind]

    def get(self, kind, name):
        assert kind == "checkpoint"
        return SimpleNamespace(arch=self.arch)

    def roots(self, kind):
        return (Path("/data/models/ipadapter"),) if kind == "ip_adapter" else ()


def fake_ctx(records, arch=Arch.SD1):
    return SimpleNamespace(catalog=FakeCatalog(records, arch), selected_checkpoint=lambda: "tiny",
                           settings=SimpleNamespace(controlnet_dir=Path("/data/models/ControlNet")),
                           options=SimpleNamespace(as_dict=lambda: {}))


def test_model_lists_follow_the_checkpoint_architecture():
    records = [record("canny15", Arch.SD1), record("cannyxl", Arch.SDXL), record("odd", Arch.UNKNOWN),
               record("broken", Arch.SD1, error="truncated file"),
               record("ip15", Arch.SD1, kind=ModelKind.IP_ADAPTER)]
    ctx = fake_ctx(records)
    arch = cs.checkpoint_arch(ctx)
    assert arch is Arch.SD1
    assert cs.control_choices(ctx, arch) == ["canny15", "odd"]
    assert cs.control_choices(ctx, Arch.SDXL) == ["cannyxl", "odd"]
    assert cs.control_choices(ctx) == ["canny15", "cannyxl", "odd"]
    assert cs.ip_adapter_choices(ctx, arch) == ["ip15"] and cs.ip_adapter_choices(ctx, Arch.SDXL) == []
    assert cs.models_hint(ctx, "controlnet", arch) == ""


def test_hints_name_the_folder_to_fill():
    ctx = fake_ctx([record("broken", Arch.SD1, error="truncated file")])
    hint = cs.models_hint(ctx, "controlnet", Arch.SD1)
    assert "No ControlNet models found" in hint and "/data/models/ControlNet" in hint
    assert "`broken.safetensors` cannot be used: truncated file" in hint
    ip_hint = cs.models_hint(ctx, "ip_adapter", Arch.SD1)
    assert "No IP-Adapter models found" in ip_hint and "/data/models/ipadapter" in ip_hint
    ctx = fake_ctx([record("cannyxl", Arch.SDXL)])
    assert "for this checkpoint's architecture (SD 1.x)" in cs.models_hint(ctx, "controlnet", Arch.SD1)


def test_unit_count_option():
    ctx = fake_ctx([])
    assert cs.unit_count(ctx) == cs.DEFAULT_UNITS
    ctx.options = SimpleNamespace(as_dict=lambda: {"control_net_unit_count": 5})
    assert cs.unit_count(ctx) == 5
    ctx.options = SimpleNamespace(as_dict=lambda: {"control_net_unit_count": 99})
    assert cs.unit_count(ctx) == 8


def test_render_gives_named_components_with_elem_ids():
    gr = pytest.importorskip("gradio")
    ctx = fake_ctx([record("canny15", Arch.SD1)])
    with gr.Blocks():
        comps = cs.render(ctx, "img2img")
    assert cs.unit_indices(comps) == [0, 1, 2] and cs.slot_indices(comps) == [0, 1]
    assert comps["cn0_preview_button"].elem_id == "img2img_cn0_preview_button"
    assert comps["cn2_preview"].elem_id == "img2img_cn2_preview"
    assert comps["ip1_model"].elem_id == "img2img_ip1_model"
    assert ("canny15", "canny15") in comps["cn0_model"].choices
    assert comps["cn1_control_mode"].choices == [(m, m) for m in CONTROL_MODES]
    assert set(cs.input_names(comps)) <= set(comps)


def test_optional_images_lets_api_callers_leave_images_out():
    import inspect

    def handler(request, image=None, **values):
        return values

    components = page_values({}, {})
    fn = cs.optional_images(handler, components)
    params = inspect.signature(fn).parameters
    assert list(params) == ["request", "image", "cn0_image", "cn1_image", "ip0_images", "ip1_images", "values"]
    assert all(params[n].default is None for n in ("cn0_image", "ip1_images"))
    assert fn(None, cn0_image="x", prompt="p") == {"cn0_image": "x", "prompt": "p"}  # still goes to **values


def test_infotext_unit_values_tolerate_odd_values_and_model_names_with_commas():
    from webui.io.metadata import control_units_from_infotext, parse_infotext
    from webui.ui.control_requests import unit_values_from_infotext

    text = ('a cat\nSteps: 4, Seed: 1, ControlNet 1: "Module: none, Model: depth, v2 [0123abcd], Weight: lots, '
            'Resize Mode: Sideways, Processor Res: -1, Threshold A: -1, Threshold B: -1, Guidance Start: 0.0, '
            'Guidance End: 1.0, Pixel Perfect: True, Control Mode: My prompt is more important"')
    units = control_units_from_infotext(parse_infotext(text))
    assert units[1]["Model"] == "depth, v2" and units[1]["Weight"] == "lots"
    values = unit_values_from_infotext(units, 2)
    assert values["cn0_enabled"] is False and values["cn1_enabled"] is True
    assert values["cn1_model"] == "depth, v2" and values["cn1_processor_res"] == -1
    assert "cn1_weight" not in values and "cn1_resize_mode" not in values  # left as they are
    assert values["cn1_pixel_perfect"] is True and values["cn1_control_mode"] == "My prompt is more important"
    assert unit_values_from_infotext({}, 3) == {}
