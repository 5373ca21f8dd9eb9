import io
import json
import re

import pytest
from PIL import Image

from webui.io import metadata as md
from webui.types import GenerationRequest, LoraRef

# A1111 modules/infotext_utils.py re_param_code, copied literally so we test against it, not ours.
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

PARAMS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7.0,
    "Seed": 1,
    "Size": "512x768",
    "Model hash": "0123456789",
    "Model": "v1-5-pruned-emaonly",
    "Denoising strength": 0.5,
    "Clip skip": 2,
    "Lora hashes": "detail: abcdef123456, style: 0011aa",
    "Hires upscaler": None,
    "Version": "v0.1.0",
}

EXPECTED_TEXT = (
    "a cat, (masterpiece:1.2)\nNegative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, "
    "Model hash: 0123456789, Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, "
    'Lora hashes: "detail: abcdef123456, style: 0011aa", Version: v0.1.0'
)


def a1111_parse_pairs(text):
    lastline = text.strip().split("\n")[-1]
    out = {}
    for k, v in A1111_RE_PARAM.findall(lastline):
        out[k] = json.loads(v) if v[:1] == '"' and v[-1:] == '"' else v
    return out


def test_build_exact_a1111_format():
    assert md.build_infotext("a cat, (masterpiece:1.2)", "blurry, lowres", PARAMS) == EXPECTED_TEXT


def test_no_negative_line_when_empty_and_float_formatting():
    text = md.build_infotext("p", "", {"Steps": 4, "CFG scale": 7.5, "Denoising strength": 0.1 + 0.2, "X": None})
    assert text == "p\nSteps: 4, CFG scale: 7.5, Denoising strength: 0.3"
    assert md.format_value(7.0) == "7" and md.format_value(0.5) == "0.5" and md.format_value(True) == "True"


def test_quote_rules():
    assert md.quote("plain") == "plain"
    assert md.quote("a, b") == '"a, b"'
    assert md.quote("k: v") == '"k: v"'
    assert md.quote('say "hi"') == '"say \\"hi\\""'
    assert md.quote("two\nlines") == '"two\\nlines"'
    assert md.quote("ünïcode, x") == '"ünïcode, x"'  # ensure_ascii=False, like A1111


def test_a1111_regex_reads_our_output():
    params = dict(PARAMS, Weird='with "quotes", commas: colons\nand newline', Unicode="猫, ねこ")
    text = md.build_infotext("prompt", "neg", params)
    pairs = a1111_parse_pairs(text)
    expected = {k: md.format_value(v) for k, v in params.items() if v is not None}
    assert pairs == expected


def test_round_trip():
    text = md.build_infotext("a cat\nsecond line", "blurry\nugly", PARAMS)
    parsed = md.parse_infotext(text)
    assert parsed["Prompt"] == "a cat\nsecond line"
    assert parsed["Negative prompt"] == "blurry\nugly"
    assert parsed["Steps"] == "20"
    assert parsed["CFG scale"] == "7"
    assert parsed["Size-1"] == "512" and parsed["Size-2"] == "768"
    assert "Size" not in parsed  # as in A1111
    assert parsed["Lora hashes"] == PARAMS["Lora hashes"]
    assert parsed["Clip skip"] == "2"
    assert md.build_infotext(parsed["Prompt"], parsed["Negative prompt"], {
        k: v for k, v in parsed.items() if k in PARAMS}).startswith("a cat\nsecond line\nNegative prompt: blurry\nugly\n")


def test_parse_defaults_and_no_params_line():
    parsed = md.parse_infotext("just a prompt\nNegative prompt: bad")
    assert parsed["Prompt"] == "just a prompt"
    assert parsed["Negative prompt"] == "bad"
    assert parsed["Clip skip"] == "1"
    assert parsed["Schedule type"] == "Automatic"
    assert md.parse_infotext("")["Prompt"] == ""


def test_parse_real_a1111_text():
    text = ("masterpiece, 1girl\nNegative prompt: (worst quality:1.4)\n"
            "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3528406154, Size: 512x768, "
            "Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.45, Hires upscale: 2, "
            'Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.6.0')
    parsed = md.parse_infotext(text)
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54"
    fields = md.infotext_to_request_fields(parsed)
    assert fields["sampler"] == "DPM++ 2M" and fields["schedule"] == "Karras"
    assert fields["seed"] == 3528406154 and fields["cfg_scale"] == 6.5
    assert (fields["width"], fields["height"]) == (512, 768)
    assert fields["clip_skip"] == 1
    request = GenerationRequest(**fields)
    assert request.prompt == "masterpiece, 1girl" and request.negative_prompt == "(worst quality:1.4)"
    assert md.checkpoint_hint(parsed) == ("v1-5", "6ce0161689")


def test_request_fields_accepted_by_request_and_round_trip():
    req = GenerationRequest(prompt="a, b: c", negative_prompt="n", steps=12, cfg_scale=4.5, sampler="Euler",
                            schedule="Karras", width=640, height=448, seed=42, clip_skip=2,
                            subseed=7, subseed_strength=0.25, loras=(LoraRef(name="x"),))
    params = md.infotext_params(req, seed=42, model_name="tiny", model_hash="deadbeef" * 8,
                                lora_hashes={"x": "ab" * 16}, version="test")
    text = md.build_infotext(req.prompt, req.negative_prompt, params)
    assert "Model hash: deadbeefde," in text and "Variation seed: 7" in text
    fields = md.infotext_to_request_fields(md.parse_infotext(text))
    back = GenerationRequest(**fields)
    for name in ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "width", "height",
                 "seed", "clip_skip", "subseed", "subseed_strength"):
        assert getattr(back, name) == getattr(req, name), name
    with_models = md.infotext_to_request_fields(md.parse_infotext(text), with_models=True)
    assert with_models["checkpoint"] == "tiny"


def test_request_fields_skip_garbage():
    fields = md.infotext_to_request_fields({"Steps": "abc", "Seed": "12.5", "CFG scale": "5", "Sampler": "Restart"})
    assert "steps" not in fields and "seed" not in fields
    assert fields["cfg_scale"] == 5.0 and fields["sampler"] == "Restart" and fields["schedule"] == "Automatic"
    GenerationRequest(**fields)


def test_png_chunk_round_trip_latin1_and_unicode(tmp_path):
    for text in ("plain prompt\nSteps: 1, Seed: 2, Size: 64x64", "猫 prompt\nSteps: 1, Seed: 2, Size: 64x64"):
        img = Image.new("RGB", (8, 8))
        img.info["other"] = "kept"
        buf = io.BytesIO()
        img.save(buf, format="PNG", pnginfo=md.png_with_infotext(img, text))
        data = buf.getvalue()
        assert md.read_infotext(data) == text
        path = tmp_path / "x.png"
        path.write_bytes(data)
        assert md.read_infotext(path) == text
        assert md.read_infotext(str(path)) == text
        with Image.open(path) as opened:
            assert md.read_infotext(opened) == text
            assert opened.info["other"] == "kept"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment_round_trip(fmt):
    text = "ünicode 猫, prompt\nSteps: 1, Seed: 2"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format=fmt, exif=md.exif_with_infotext(text))
    assert md.read_infotext(buf.getvalue()) == text


def test_read_none_and_non_image():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    assert md.read_infotext(buf.getvalue()) is None
    assert md.read_infotext(b"not an image") is None


def test_user_comment_variants():
    assert md.decode_user_comment(b"ASCII\x00\x00\x00hello") == "hello"
    assert md.decode_user_comment(b"UNICODE\x00" + "hé".encode("utf-16-le")) == "hé"
    assert md.decode_user_comment(b"UNICODE\x00" + "hé".encode("utf-16-be")) == "hé"
