"""A1111 img2img JSON and sd-webui-controlnet units -> Img2ImgRequest / ControlUnit / ReferenceImages (pure)."""
import base64
import hashlib
import io
import json

import pytest
from PIL import Image

from webui.api import controlnet, convert
from webui.api.controlnet_units import alwayson_fields, controlnet_units, is_ip_adapter
from webui.api.convert import ApiDefaults, txt2img_request
from webui.api.convert_img2img import img2img_request
from webui.api.schemas import Img2ImgRequest, JobSubmit, Txt2ImgRequest
from webui.image_requests import ControlUnit, Img2ImgRequest as Img2ImgJob, ReferenceImages
from webui.types import GeneratedImage, GenerationResult, RequestError


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode("ascii")


RED = b64(Image.new("RGB", (64, 48), (255, 0, 0)))
BLUE = b64(Image.new("RGB", (32, 32), (0, 0, 255)))


def i2i(defaults: ApiDefaults = ApiDefaults(), **fields):
    return img2img_request(Img2ImgRequest.model_validate({"init_images": [RED], **fields}), defaults)


def t2i(**fields):
    return txt2img_request(Txt2ImgRequest.model_validate(fields))


def cn(*units, **fields):
    return {"alwayson_scripts": {"controlnet": {"args": list(units)}}, **fields}


# ---------------------------------------------------------------- img2img fields
def test_img2img_gets_a1111_api_defaults_and_shares_the_txt2img_fields():
    conv = i2i(prompt="a fox", steps=3, width=64, height=64, seed=5, sampler_name="DPM++ 2M Karras",
               override_settings={"CLIP_stop_at_last_layers": 2})
    r = conv.request
    assert isinstance(r, Img2ImgJob) and r.job_kind == "img2img" and r.is_inpaint is False
    assert (r.prompt, r.steps, r.width, r.height, r.seed, r.clip_skip) == ("a fox", 3, 64, 64, 5, 2)
    assert (r.sampler, r.schedule) == ("DPM++ 2M", "Karras")
    # StableDiffusionProcessingImg2Img defaults (A1111 v1.10), not the UI's
    assert (r.resize_mode, r.denoising_strength, r.mask_blur, r.inpainting_fill) == (0, 0.75, 4, 0)
    assert (r.inpaint_full_res, r.inpaint_full_res_padding, r.inpainting_mask_invert) == (True, 0, False)
    assert r.image_cfg_scale == 1.5 and r.save_images is False and conv.send_images is True
    assert r.names == ("init_images[0]",) and r.init_images[0].size == (64, 48)
    assert r.init_images[0].getpixel((0, 0)) == (255, 0, 0)
    assert r.controlnet == () and r.ip_adapters == () and conv.warnings == ()


@pytest.mark.parametrize("encode", [
    lambda img: b64(img),
    lambda img: "data:image/png;base64," + b64(img),
    lambda img: "data:image/jpeg;base64," + b64(img, "JPEG"),
    lambda img: b64(img, "WEBP"),
    lambda img: b64(img.convert("CMYK"), "JPEG"),
    lambda img: "\n".join(b64(img)[i:i + 76] for i in range(0, len(b64(img)), 76)),  # MIME line-wrapped
])
def test_init_images_in_every_accepted_form_become_rgb(encode):
    source = Image.new("RGB", (40, 24), (10, 200, 30))
    image = i2i(init_images=[encode(source)]).request.init_images[0]
    assert image.mode == "RGB" and image.size == (40, 24)
    assert all(abs(a - b) <= 12 for a, b in zip(image.getpixel((20, 12)), (10, 200, 30)))


def test_transparent_init_image_is_flattened_on_white_and_several_images_are_kept():
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    images = i2i(init_images=[b64(clear), BLUE]).request.init_images
    assert images[0].mode == "RGB" and images[0].getpixel((3, 3)) == (255, 255, 255)
    assert images[1].getpixel((0, 0)) == (0, 0, 255) and len(images) == 2


def test_mask_makes_an_inpaint_job_and_keeps_its_alpha():
    painted = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    painted.paste((255, 255, 255, 255), (0, 0, 32, 48))
    r = i2i(mask=b64(painted), inpainting_mask_invert=1, inpaint_full_res=False, inpainting_fill=1,
            inpaint_full_res_padding=16, denoising_strength=0.4).request
    assert r.is_inpaint and r.mask.mode == "RGBA" and r.mask.getpixel((40, 10))[3] == 0
    assert r.inpainting_mask_invert is True and r.inpaint_full_res is False
    assert (r.inpainting_fill, r.inpaint_full_res_padding, r.denoising_strength) == (1, 16, 0.4)


def test_mask_blur_sets_both_axes_and_differing_axes_use_the_larger():
    assert i2i(mask_blur=9, mask_blur_x=1, mask_blur_y=2).request.mask_blur == 9
    assert i2i(mask_blur_x=6, mask_blur_y=6).request.mask_blur == 6
    conv = i2i(mask_blur_x=2, mask_blur_y=7)
    assert conv.request.mask_blur == 7
    assert any("mask_blur_x 2 and mask_blur_y 7 differ" in w for w in conv.warnings)


def test_nulls_mean_a1111_defaults():
    r = i2i(resize_mode=None, denoising_strength=None, image_cfg_scale=None, inpainting_fill=None,
            inpaint_full_res=None, mask_blur_x=None, mask_blur_y=None, inpainting_mask_invert=None).request
    assert (r.resize_mode, r.denoising_strength, r.image_cfg_scale, r.inpainting_fill) == (0, 0.75, 1.5, 0)
    assert r.inpaint_full_res is True and r.mask_blur == 4 and r.inpainting_mask_invert is False


@pytest.mark.parametrize("fields, message", [
    ({"init_images": []}, "init_images is empty"),
    ({"init_images": None}, "init_images is empty"),
    ({"init_images": [RED, "not base64 !!"]}, r"init_images\[1\] is not valid base64"),
    ({"init_images": [base64.b64encode(b"just some text").decode()]}, r"init_images\[0\] is not a PNG, JPEG, WebP"),
    ({"init_images": [5]}, r"init_images\[0\] must be a base64 PNG/JPEG/WebP string"),
    ({"init_images": ["https://example.com/cat.png"]}, "not fetched"),
    ({"mask": "%%%"}, "mask is not valid base64"),
    ({"mask": base64.b64encode(b"GIF8 nope").decode()}, "mask is not a PNG"),
    ({"denoising_strength": 1.5}, "denoising_strength must be between"),
    ({"resize_mode": 7}, "resize_mode must be 0..3"),
    ({"inpainting_fill": 9}, "inpainting_fill must be 0..3"),
    ({"inpainting_mask_invert": 2}, "inpainting_mask_invert must be 0"),
    ({"mask_blur": 100}, "mask_blur must be between"),
    ({"width": 65}, "width 65 is not a multiple of 8"),
    ({"sampler_name": "Nope"}, "sampler_name 'Nope' is unknown"),
    ({"script_name": "x/y plot"}, "script 'x/y plot' not found"),
])
def test_invalid_img2img_requests_name_the_field(fields, message):
    with pytest.raises(RequestError, match=message):
        i2i(**fields)


def test_parameters_echo_the_request_without_images_unless_asked():
    body = Img2ImgRequest(init_images=[RED], mask=BLUE, prompt="p", steps=3)
    params = convert.a1111_parameters(body)
    assert params["init_images"] is None and params["mask"] is None  # as A1111
    assert params["prompt"] == "p" and params["steps"] == 3 and params["inpaint_full_res"] is True
    assert set(Img2ImgRequest.model_fields) <= set(params) and "enable_hr" not in params
    echoed = convert.a1111_parameters(Img2ImgRequest(init_images=[RED], mask=BLUE, include_init_images=True))
    assert echoed["init_images"] == [RED] and echoed["mask"] == BLUE
    json.dumps(params)


def test_infotext_fills_unset_fields_including_denoising_strength():
    r = i2i(infotext="a cat\nSteps: 7, Sampler: Euler a, CFG scale: 3, Seed: 8, Size: 64x64, "
                     "Denoising strength: 0.35", steps=2).request
    assert (r.prompt, r.steps, r.cfg_scale, r.seed, r.denoising_strength) == ("a cat", 2, 3.0, 8, 0.35)


def test_unavailable_img2img_fields_are_reported_as_warnings():
    warnings = i2i(initial_noise_multiplier=0.9, latent_mask=BLUE, mask_round=False).warnings
    assert any("initial_noise_multiplier" in w for w in warnings)
    assert any("latent_mask" in w for w in warnings) and any("mask_round" in w for w in warnings)


def test_job_body_selects_the_conversion_by_type():
    from webui.api.jobs import CONVERTERS

    job = JobSubmit.model_validate({"type": "img2img", "init_images": [RED], "steps": 2, "width": 64, "height": 64})
    assert isinstance(CONVERTERS[job.type](job).request, Img2ImgJob)
    plain = JobSubmit.model_validate({"steps": 2, "init_images": [RED]})  # no type: txt2img, images unused
    request = CONVERTERS[plain.type](plain).request
    assert plain.type == "txt2img" and request.job_kind == "txt2img"
    hires = JobSubmit.model_validate({"type": "img2img", "init_images": [RED], "enable_hr": True})
    assert any("enable_hr" in w for w in CONVERTERS["img2img"](hires).warnings)


def test_info_reports_denoising_strength_for_img2img_and_plain_drops_images():
    request = i2i(steps=2, width=64, height=64, denoising_strength=0.3).request
    result = GenerationResult(images=(GeneratedImage(image=Image.new("RGB", (64, 64)), seed=1, infotext="x"),),
                              parameters={"init_images": request.init_images, "steps": 2}, info={})
    assert convert.a1111_info(result, request)["denoising_strength"] == 0.3
    assert convert.a1111_info(result, t2i(steps=2).request)["denoising_strength"] is None
    assert convert.plain(result.parameters) == {"init_images": [None], "steps": 2}
    as_plain = convert.plain(request)
    assert as_plain["init_images"] == [None] and as_plain["denoising_strength"] == 0.3
    json.dumps(as_plain)


# ---------------------------------------------------------------- ControlNet units (sd-webui-controlnet API)
def test_controlnet_unit_fields_names_and_hash_stripping():
    unit_json = {"image": RED, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]", "weight": 0.8,
                 "guidance_start": 0.1, "guidance_end": 0.9, "control_mode": "controlnet is more important",
                 "resize_mode": "Resize and Fill", "pixel_perfect": True, "processor_res": 256,
                 "threshold_a": 50, "threshold_b": 150, "low_vram": True}
    r = t2i(**cn(unit_json, steps=2)).request
    (unit,) = r.controlnet
    assert isinstance(unit, ControlUnit) and unit.model == "control_v11p_sd15_canny" and unit.module == "canny"
    assert (unit.weight, unit.guidance_start, unit.guidance_end) == (0.8, 0.1, 0.9)
    assert unit.control_mode == "ControlNet is more important" and unit.resize_mode == 2
    assert unit.pixel_perfect is True and unit.processor_res == 256
    assert (unit.threshold_a, unit.threshold_b) == (50, 150)
    assert unit.image.size == (64, 48) and unit.image.mode == "RGB" and r.ip_adapters == ()


def test_controlnet_unit_defaults_sentinels_numbers_and_old_names():
    (unit,) = controlnet_units([{"input_image": "data:image/png;base64," + RED, "model": "cn",
                                 "processor_res": -1, "threshold_a": -1, "threshold_b": -1, "guessmode": True,
                                 "resize_mode": "0"}]).controlnet
    assert unit.image.size == (64, 48) and unit.module == "none"
    assert unit.processor_res == 512 and unit.threshold_a is None and unit.threshold_b is None
    assert unit.control_mode == "ControlNet is more important" and unit.resize_mode == 0
    (plain,) = controlnet_units({"args": [{"image": RED, "model": "cn", "control_mode": 1}]}).controlnet
    assert plain.control_mode == "My prompt is more important" and plain.resize_mode == 1 and plain.weight == 1.0


def test_disabled_and_placeholder_units_are_dropped():
    found = controlnet_units([{"enabled": False, "model": "cn", "image": "broken!!"},
                              {"model": "None", "module": "none"},
                              {"image": RED, "model": "cn"}])
    assert [u.model for u in found.controlnet] == ["cn"]
    assert found.warnings == ("alwayson_scripts.controlnet.args[1] has no model and no module and was skipped",)
    assert t2i(**cn()).request.controlnet == ()


def test_unit_image_with_mask_and_gradio_dict_form():
    found = controlnet_units([{"image": {"image": BLUE, "mask": RED}, "model": "cn", "module": "canny"}])
    assert found.controlnet[0].image.size == (32, 32)
    assert "unit masks are not used" in found.warnings[0]


def test_units_without_image_use_the_img2img_input_and_are_an_error_in_txt2img():
    r = i2i(**cn({"model": "cn", "module": "canny"})).request
    assert r.controlnet[0].image is None  # the generator uses the init image
    with pytest.raises(RequestError, match=r"args\[0\]: ControlNet cn has no image; txt2img units need one"):
        t2i(**cn({"model": "cn", "module": "canny"}))


def test_ip_adapter_units_become_reference_images():
    r = i2i(ApiDefaults(ip_adapter_models=frozenset({"my_adapter"})),
            **cn({"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15 [6a3f6166]", "weight": 0.6,
                  "image": BLUE},
                 {"module": "ip-adapter-auto", "model": "ip-adapter_sd15", "image": [BLUE, {"image": RED}]},
                 {"module": "none", "model": "my_adapter.safetensors", "image": RED},
                 {"module": "ip-adapter_clip_h", "model": "ip-adapter_sd15"})).request
    assert r.controlnet == ()
    first, multi, by_catalog, from_init = r.ip_adapters
    assert isinstance(first, ReferenceImages) and first.model == "ip-adapter_sd15" and first.weight == 0.6
    assert [img.size for img in multi.images] == [(32, 32), (64, 48)]
    assert by_catalog.model == "my_adapter.safetensors" and by_catalog.images[0].size == (64, 48)
    assert from_init.images == (r.init_images[0],)
    with pytest.raises(RequestError, match="IP-Adapter ip-adapter_sd15 needs a reference image"):
        t2i(**cn({"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15"}))
    assert is_ip_adapter("IP-Adapter_Clip_SDXL", "x") and not is_ip_adapter("canny", "control_canny")


@pytest.mark.parametrize("units, message", [
    ([{"image": "not base64 !!", "model": "cn"}],
     r"alwayson_scripts\.controlnet\.args\[0\]\.image is not valid base64"),
    ([{"image": {"image": 7}, "model": "cn"}], r"args\[0\]\.image\.image must be a base64"),
    ([{"image": RED, "model": "cn"}, {"image": RED, "model": "cn", "weight": 3}],
     r"args\[1\]: ControlNet weight must be between"),
    ([{"image": RED, "model": "cn", "weight": "heavy"}], r"args\[0\]\.weight: Input should be a valid number"),
    ([{"image": RED, "model": "cn", "control_mode": 5}], "control_mode must be 0, 1 or 2"),
    ([{"image": RED, "model": "cn", "control_mode": "loud"}], "control_mode 'loud' is not one of"),
    ([{"image": RED, "model": "cn", "resize_mode": "Stretch"}], "resize_mode 'Stretch' is not"),
    ([{"image": RED, "model": "cn", "guidance_start": 0.8, "guidance_end": 0.2}], "guidance start 0.8 must be below"),
    ([{"image": RED, "module": "canny", "model": "None"}], r"args\[0\]: model is empty"),
    ([{"image": [RED, BLUE], "model": "cn"}], "takes one image, got 2"),
    (["canny"], r"args\[0\] must be an object with ControlNet unit fields"),
    ([{"image": RED, "model": "cn"}] * 9, "at most 8 enabled units"),
])
def test_bad_units_are_refused_with_the_unit_named(units, message):
    with pytest.raises(RequestError, match=message):
        t2i(**cn(*units))


def test_alwayson_scripts_registry():
    with pytest.raises(RequestError, match="always on script 'ADetailer' not found"):
        t2i(alwayson_scripts={"ADetailer": {"args": []}})
    with pytest.raises(RequestError, match=r'must be \{"args": \[unit, ...\]\}'):
        t2i(alwayson_scripts={"controlnet": {"args": "canny"}})
    mixed_case = alwayson_fields({"ControlNet": {"args": [{"image": RED, "model": "cn"}]}})
    assert len(mixed_case.controlnet) == 1
    assert alwayson_fields(None).controlnet == () and alwayson_fields({"controlnet": {"args": None}}).controlnet == ()


# ---------------------------------------------------------------- /controlnet helpers
def test_legacy_hash_reads_64k_at_one_megabyte(tmp_path):
    data = bytearray(b"\x01" * (0x100000 + 0x20000))
    path = tmp_path / "cn.safetensors"
    path.write_bytes(bytes(data))
    first = controlnet.legacy_hash(path)
    data[10] = 0xFF  # outside the window: same hash
    path.write_bytes(bytes(data))
    assert controlnet.legacy_hash(path) == first and len(first) == 8
    data[0x100000 + 5] = 0xFF  # inside: a different hash
    path.write_bytes(bytes(data))
    assert controlnet.legacy_hash(path) != first
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"tiny")
    assert controlnet.legacy_hash(small) == hashlib.sha256(b"").hexdigest()[:8]  # A1111 hashes an empty read
    assert controlnet.legacy_hash(tmp_path / "missing") == "NOFILE"
