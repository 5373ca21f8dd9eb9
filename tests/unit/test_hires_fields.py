"""Hires-fix request fields: UI conversion, validation, target size and infotext (pure, no models)."""
from __future__ import annotations

import pytest

from webui.generation.hires import infotext_extra, target_size
from webui.io.metadata import build_infotext, infotext_params, infotext_to_request_fields, parse_infotext
from webui.types import GenerationRequest, RequestError
from webui.ui.requests import hires_fields


def test_ui_values_to_request_fields():
    assert hires_fields({"enable_hr": False, "hr_scale": 3}) == {}
    fields = hires_fields({"enable_hr": True, "hr_upscaler": "Lanczos", "hr_scale": "1.5", "hr_second_pass_steps": 4.0,
                           "denoising_strength": 0.3, "hr_sampler_name": "Use same sampler",
                           "hr_scheduler": "Karras", "hr_prompt": "x"})
    request = GenerationRequest(**fields)
    assert request.hr_scale == 1.5 and request.hr_second_pass_steps == 4 and request.hr_sampler_name is None
    assert request.hr_scheduler == "Karras" and request.hr_prompt == "x"
    with pytest.raises(RequestError, match="Hires steps"):
        hires_fields({"enable_hr": True, "hr_second_pass_steps": "many"})


@pytest.mark.parametrize("fields, expected", [
    (dict(hr_scale=2.0), (1024, 768)),
    (dict(hr_scale=1.5), (768, 576)),
    (dict(hr_resize_x=1000), (1000, 744)),
    (dict(hr_resize_y=1000), (1328, 1000)),
    (dict(hr_resize_x=640, hr_resize_y=640), (640, 640)),
])
def test_target_size(fields, expected):
    assert target_size(GenerationRequest(width=512, height=384, enable_hr=True, **fields)) == expected


def test_infotext_round_trip_with_a1111_keys():
    request = GenerationRequest(prompt="cat", width=512, height=512, enable_hr=True, hr_scale=2,
                                hr_upscaler="R-ESRGAN 4x+", hr_second_pass_steps=10, denoising_strength=0.45,
                                hr_sampler_name="DPM++ 2M", hr_negative_prompt="ugly")
    text = build_infotext("cat", "", infotext_params(request, seed=1, extra=infotext_extra(request)))
    assert "Denoising strength: 0.45, Hires upscale: 2, Hires steps: 10, Hires upscaler: R-ESRGAN 4x+" in text
    fields = infotext_to_request_fields(parse_infotext(text))
    again = GenerationRequest(**fields)
    assert (again.enable_hr, again.hr_scale, again.hr_upscaler, again.hr_second_pass_steps) == (True, 2.0,
                                                                                                "R-ESRGAN 4x+", 10)
    assert again.denoising_strength == 0.45 and again.hr_sampler_name == "DPM++ 2M"
    assert again.hr_negative_prompt == "ugly"
    assert "enable_hr" not in infotext_to_request_fields(parse_infotext("cat\nSteps: 20, Seed: 1, Size: 512x512"))
