"""img2img / inpaint tab values -> Img2ImgRequest (webui.ui.img2img_requests) and send-to helpers."""
import numpy as np
import pytest
from PIL import Image

from webui.image_requests import FILL_FILL, FILL_LATENT_NOISE, RESIZE_AND_FILL, Img2ImgRequest
from webui.io.metadata import build_infotext
from webui.types import LoraRef, RequestError
from webui.ui.img2img_requests import (choice_index, image_fields, img2img_request, infotext_values,
                                       inpaint_inputs, inpaint_request, size_from_image)
from webui.ui.send_to import gallery_image, parameter_values

# what the tabs send untouched (sliders give ints with precision=0, radios their labels)
UI_VALUES = {
    "prompt": "a cat", "negative_prompt": "", "steps": 20, "sampler": "Euler a", "schedule": "Automatic",
    "width": 512, "height": 512, "cfg_scale": 7.0, "seed": -1, "n_iter": 1, "batch_size": 1, "clip_skip": 1,
    "lora_0_name": "", "lora_0_weight": 1.0, "lora_0_te_weight": -1.0, "lora_0_blocks": "",
    "resize_mode": "Just resize", "denoising_strength": 0.75, "image_cfg_scale": 1.5,
}
INPAINT_VALUES = {**UI_VALUES, "mask_blur": 4, "inpainting_mask_invert": "Inpaint masked",
                  "inpainting_fill": "original", "inpaint_full_res": "Whole picture", "inpaint_full_res_padding": 32}


def rgb(width=64, height=48, color=(200, 30, 30)):
    return Image.new("RGB", (width, height), color)


def stroke_layer(size=(64, 48), box=(10, 10, 30, 20), alpha=204):
    """An editor layer as Gradio 6 hands it over: transparent RGBA with a painted rectangle."""
    layer = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    x0, y0, x1, y1 = box
    layer[y0:y1, x0:x1] = (255, 255, 255, alpha)
    return Image.fromarray(layer, mode="RGBA")


def editor(background=None, layers=()):
    background = rgb() if background is None else background
    return {"background": background.convert("RGBA"), "layers": list(layers), "composite": background}


def test_ui_defaults_give_the_request_defaults():
    image = rgb()
    request = img2img_request(UI_VALUES, images=[image])
    default = Img2ImgRequest(prompt="a cat", init_images=(image,))
    for name in Img2ImgRequest.field_names():
        assert getattr(request, name) == getattr(default, name), name
    assert request.denoising_strength == 0.75 and request.mask is None and not request.is_inpaint
    assert request.init_images == (image,)


def test_txt2img_fields_and_lora_slots_are_converted_like_txt2img():
    values = {**UI_VALUES, "steps": 4.0, "width": "64", "height": 64.0, "seed": "77", "cfg_scale": "5.5",
              "lora_0_name": "style", "lora_0_weight": 0.6}
    request = img2img_request(values, images=[rgb()])
    assert (request.steps, request.width, request.height, request.seed, request.cfg_scale) == (4, 64, 64, 77, 5.5)
    assert request.loras == (LoraRef(name="style", weight=0.6),)


def test_radio_labels_and_a1111_numbers():
    assert image_fields({"resize_mode": "Resize and fill"})["resize_mode"] == RESIZE_AND_FILL
    assert image_fields({"resize_mode": 3})["resize_mode"] == 3
    assert image_fields({"resize_mode": "crop and resize"})["resize_mode"] == 1  # case-insensitive
    fields = image_fields({"inpainting_fill": "latent noise", "inpainting_mask_invert": "Inpaint not masked",
                           "inpaint_full_res": "Only masked", "mask_blur": 8.0}, inpaint=True)
    assert fields == {"inpainting_fill": FILL_LATENT_NOISE, "inpainting_mask_invert": True,
                      "inpaint_full_res": True, "mask_blur": 8}
    api = image_fields({"inpainting_fill": 0, "inpainting_mask_invert": False, "inpaint_full_res": True},
                       inpaint=True)
    assert api == {"inpainting_fill": FILL_FILL, "inpainting_mask_invert": False, "inpaint_full_res": True}


def test_bad_choice_names_the_widget_and_the_choices():
    with pytest.raises(RequestError, match=r"Resize mode 'Stretch' is not one of: 0 = Just resize, 1 = Crop"):
        image_fields({"resize_mode": "Stretch"})
    with pytest.raises(RequestError, match="Masked content 7 is not one of"):
        choice_index("Masked content", 7, ("fill", "original", "latent noise", "latent nothing"), 1)
    with pytest.raises(RequestError, match="Mask blur must be a whole number, got 2.5"):
        image_fields({"mask_blur": 2.5}, inpaint=True)


def test_denoising_strength_is_read_and_checked():
    assert img2img_request({**UI_VALUES, "denoising_strength": "0.3"}, images=[rgb()]).denoising_strength == 0.3
    with pytest.raises(RequestError, match="denoising_strength must be between 0.0 and 1.0, got 1.5"):
        img2img_request({**UI_VALUES, "denoising_strength": 1.5}, images=[rgb()])
    with pytest.raises(RequestError, match="Denoising strength must be a number"):
        img2img_request({**UI_VALUES, "denoising_strength": "lots"}, images=[rgb()])


def test_missing_image_is_a_message():
    with pytest.raises(RequestError, match="No input image: upload one, paste one"):
        img2img_request(UI_VALUES, images=[None])


def test_img2img_ignores_inpaint_widgets():
    request = img2img_request({**INPAINT_VALUES, "inpainting_fill": "fill", "mask_blur": 30}, images=[rgb()])
    assert request.mask is None and request.inpainting_fill == Img2ImgRequest.__dataclass_fields__[
        "inpainting_fill"].default and request.mask_blur == 4


def test_editor_stroke_layer_becomes_the_mask():
    image, mask = inpaint_inputs(editor(layers=[stroke_layer(box=(10, 10, 30, 20))]))
    assert image.mode == "RGB" and image.size == (64, 48)
    assert image.getpixel((0, 0)) == (200, 30, 30)
    assert mask.mode == "L" and mask.size == (64, 48)
    assert mask.getbbox() == (10, 10, 30, 20)
    assert mask.getpixel((15, 15)) > 127 and mask.getpixel((40, 40)) == 0


def test_inpaint_request_carries_image_mask_and_options():
    values = {**INPAINT_VALUES, "editor": editor(layers=[stroke_layer()]), "mask": None,
              "inpainting_fill": "fill", "inpaint_full_res": "Only masked", "inpaint_full_res_padding": 16,
              "mask_blur": 0, "denoising_strength": 0.9, "width": 64, "height": 64}
    request = inpaint_request(values)
    assert request.is_inpaint and request.init_images[0].size == (64, 48)
    assert request.mask.getbbox() == (10, 10, 30, 20)
    assert (request.inpainting_fill, request.inpaint_full_res, request.inpaint_full_res_padding,
            request.mask_blur, request.denoising_strength) == (FILL_FILL, True, 16, 0, 0.9)


def test_uploaded_mask_is_resized_and_added_to_the_strokes():
    upload = Image.new("L", (32, 24), 0)
    upload.paste(255, (24, 12, 32, 24))  # bottom-right quarter -> (48, 24, 64, 48) at image size
    image, mask = inpaint_inputs(editor(layers=[stroke_layer(box=(0, 0, 8, 8))]), upload)
    assert mask.size == image.size == (64, 48)
    values = np.asarray(mask) > 127
    assert values[2, 2] and values[40, 60] and not values[30, 20]
    _, only_upload = inpaint_inputs(editor(), upload.convert("RGB"))
    expected = np.zeros((48, 64), dtype=bool)
    expected[24:, 48:] = True
    assert np.array_equal(np.asarray(only_upload) > 127, expected)


def test_inpaint_without_image_or_mask_explains():
    with pytest.raises(RequestError, match="Inpaint: no image: upload one into the editor"):
        inpaint_inputs(None)
    with pytest.raises(RequestError, match="Inpaint: no image"):
        inpaint_request({**INPAINT_VALUES, "editor": {"background": None, "layers": [], "composite": None}})
    with pytest.raises(RequestError, match="the mask is empty: paint over the part"):
        inpaint_request({**INPAINT_VALUES, "editor": editor(layers=[stroke_layer(alpha=0)])})
    with pytest.raises(RequestError, match="the mask is empty"):
        inpaint_request({**INPAINT_VALUES, "editor": editor()})


def test_inverted_empty_mask_changes_everything():
    request = inpaint_request({**INPAINT_VALUES, "editor": editor(), "inpainting_mask_invert": "Inpaint not masked",
                               "width": 64, "height": 64})
    assert request.inpainting_mask_invert and request.mask.getbbox() is None


def test_size_from_image_keeps_aspect_in_multiples_of_8():
    assert size_from_image(rgb(640, 480)) == (640, 480)
    assert size_from_image(rgb(517, 300)) == (520, 304)
    width, height = size_from_image(rgb(4000, 1000))  # larger than the sliders: shrunk
    assert (width, height) == (2048, 512)
    width, height = size_from_image(rgb(20, 40))  # smaller: grown
    assert width == 64 and height == 128
    with pytest.raises(RequestError, match="there is no input image yet"):
        size_from_image(None)


def test_infotext_values_for_send_to():
    text = build_infotext("a dog", "ugly", {"Steps": 12, "Sampler": "DPM++ 2M", "Schedule type": "Karras",
                                            "CFG scale": 5, "Seed": 99, "Size": "64x72", "Denoising strength": 0.4})
    from webui.io.metadata import infotext_to_request_fields, parse_infotext

    values = infotext_values(infotext_to_request_fields(parse_infotext(text)))
    assert values["prompt"] == "a dog" and values["negative_prompt"] == "ugly"
    assert (values["steps"], values["seed"], values["sampler"], values["schedule"]) == (12, 99, "DPM++ 2M", "Karras")
    assert values["denoising_strength"] == 0.4
    assert "width" not in values and "height" not in values  # the size comes from the sent image


def test_send_to_takes_the_selected_gallery_image_and_its_parameters(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    rgb(64, 48, (1, 2, 3)).save(first)
    rgb(80, 64, (9, 9, 9)).save(second)
    gallery = [(str(first), None), (str(second), None)]
    assert gallery_image(gallery, 1).getpixel((0, 0)) == (9, 9, 9)
    assert gallery_image(gallery, 5).size == (64, 48)  # out of range: the first
    assert gallery_image([], 0) is None
    image = gallery_image(gallery, 1)
    values = parameter_values(build_infotext("p", "", {"Steps": 3, "Seed": 5, "Size": "64x64"}), image)
    assert (values["prompt"], values["steps"], values["seed"]) == ("p", 3, 5)
    assert (values["width"], values["height"]) == (80, 64)
