"""A1111 JSON <-> our types: defaults, nulls, samplers, overrides, errors, info/progress shapes, images."""
import base64
import io
import json
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from webui.api import convert
from webui.api.convert import ApiDefaults, NotAvailable, txt2img_request
from webui.api.images import decode_image, encode_png_b64, png_bytes, text_items
from webui.api.schemas import JobSubmit, Txt2ImgRequest
from webui.options import OptionError
from webui.types import GeneratedImage, GenerationRequest, GenerationResult, JobState, Progress, RequestError


def conv(defaults: ApiDefaults = ApiDefaults(), **fields):
    return txt2img_request(Txt2ImgRequest.model_validate(fields), defaults)


# ---------------------------------------------------------------- request defaults (A1111 v1.10)
def test_empty_body_gets_a1111_api_defaults():
    result = conv()
    r = result.request
    assert (r.prompt, r.negative_prompt, r.steps, r.cfg_scale) == ("", "", 50, 7.0)
    assert (r.width, r.height, r.seed, r.subseed, r.subseed_strength) == (512, 512, -1, -1, 0.0)
    assert (r.batch_size, r.n_iter, r.sampler, r.schedule) == (1, 1, "Euler", "Automatic")
    assert r.save_images is False, "A1111's API does not save unless save_images is true"
    assert r.checkpoint is None and r.vae is None and r.styles == ()
    assert result.send_images is True and result.warnings == ()


def test_schema_defaults_match_a1111():
    body = Txt2ImgRequest()
    assert body.sampler_index == "Euler" and body.sampler_name is None and body.scheduler is None
    assert body.steps == 50 and body.save_images is False and body.send_images is True
    assert body.override_settings_restore_afterwards is True and body.enable_hr is False
    assert body.denoising_strength == 0.75 and body.hr_scale == 2.0 and body.script_args == []


def test_nulls_mean_defaults_and_unknown_fields_are_ignored():
    r = conv(prompt=None, steps=None, width=None, cfg_scale=None, seed=None, sampler_name=None, styles=None,
             override_settings=None, send_images=None, some_future_field={"x": 1}, eta=None).request
    assert (r.prompt, r.steps, r.width, r.cfg_scale, r.seed, r.sampler) == ("", 50, 512, 7.0, -1, "Euler")


def test_fields_map_to_the_request():
    result = conv(ApiDefaults(clip_skip=2), prompt="a cat", negative_prompt="dog", steps=4, cfg_scale=5.5,
                  width=64, height=128, seed=7, subseed=9, subseed_strength=0.25, batch_size=2, n_iter=3,
                  styles=["s1", "missing"], save_images=True, send_images=False)
    r = result.request
    assert (r.prompt, r.negative_prompt, r.steps, r.cfg_scale, r.width, r.height) == ("a cat", "dog", 4, 5.5, 64, 128)
    assert (r.seed, r.subseed, r.subseed_strength, r.batch_size, r.n_iter) == (7, 9, 0.25, 2, 3)
    assert r.styles == ("s1", "missing") and r.save_images is True and r.clip_skip == 2
    assert result.send_images is False


def test_numbers_as_strings_are_coerced_like_a1111():
    r = conv(steps="12", cfg_scale="6", seed="5").request
    assert (r.steps, r.cfg_scale, r.seed) == (12, 6.0, 5)


# ---------------------------------------------------------------- samplers and schedules
@pytest.mark.parametrize("fields, expected", [
    ({"sampler_name": "DPM++ 2M Karras"}, ("DPM++ 2M", "Karras")),
    ({"sampler_name": "DPM++ 2M", "scheduler": "karras"}, ("DPM++ 2M", "Karras")),
    ({"sampler_name": "DPM++ 2M", "scheduler": "Exponential"}, ("DPM++ 2M", "Exponential")),
    ({"sampler_index": "k_euler_a"}, ("Euler a", "Automatic")),
    ({"sampler_name": "euler a"}, ("Euler a", "Automatic")),
    ({"sampler_name": "", "sampler_index": "DDIM"}, ("DDIM", "Automatic")),
    ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Exponential"}, ("DPM++ 2M", "Karras")),
])
def test_sampler_and_scheduler_resolution(fields, expected):
    r = conv(**fields).request
    assert (r.sampler, r.schedule) == expected


@pytest.mark.parametrize("fields, message", [
    ({"sampler_name": "Nope"}, "sampler_name 'Nope' is unknown; valid samplers: DPM++ 2M"),
    ({"scheduler": "wobbly"}, "scheduler 'wobbly' is unknown"),
    ({"sampler_name": "LCM", "scheduler": "Karras"}, "does not support schedule type 'Karras'"),
])
def test_unknown_sampler_or_scheduler_is_a_clear_error(fields, message):
    with pytest.raises(RequestError, match=message.replace("+", r"\+")):
        conv(**fields)


# ---------------------------------------------------------------- override_settings
def test_override_settings_become_per_job_fields():
    result = conv(override_settings={"sd_model_checkpoint": "sub/model.safetensors [0123456789]",
                                     "sd_vae": "vae.safetensors", "CLIP_stop_at_last_layers": "2",
                                     "eta_noise_seed_delta": 31337, "samples_save": False})
    r = result.request
    assert r.checkpoint == "sub/model.safetensors" and r.vae == "vae.safetensors" and r.clip_skip == 2
    assert result.keep_options == {}
    assert result.warnings == ("override_settings not applied per job: eta_noise_seed_delta, samples_save",)


def test_override_settings_kept_when_restore_afterwards_is_false():
    result = conv(override_settings={"sd_model_checkpoint": "m", "CLIP_stop_at_last_layers": 3},
                  override_settings_restore_afterwards=False)
    assert result.keep_options == {"sd_model_checkpoint": "m", "CLIP_stop_at_last_layers": 3}


def test_invalid_override_value_is_rejected():
    with pytest.raises(OptionError, match="CLIP_stop_at_last_layers"):
        conv(override_settings={"CLIP_stop_at_last_layers": "many"})
    with pytest.raises(OptionError, match="must be <= 12"):
        conv(override_settings={"CLIP_stop_at_last_layers": 40})


def test_strip_title_hash():
    assert convert.strip_title_hash("a/b.safetensors [6ce0161689]") == "a/b.safetensors"
    assert convert.strip_title_hash("plain") == "plain"
    assert convert.strip_title_hash("name [not a hash]") == "name [not a hash]"


# ---------------------------------------------------------------- invalid values and unsupported features
@pytest.mark.parametrize("fields, message", [
    ({"width": 65}, "width 65 is not a multiple of 8"),
    ({"height": 32}, "height must be between 64"),
    ({"steps": 0}, "steps must be between 1"),
    ({"cfg_scale": 99}, "cfg_scale must be between"),
    ({"seed": 2**32}, "seed must be -1"),
    ({"batch_size": 0}, "batch_size must be between"),
    ({"n_iter": 1000}, "n_iter must be between"),
    ({"script_name": "x/y plot"}, "script 'x/y plot' not found"),
    ({"alwayson_scripts": {"adetailer": {"args": []}}}, "always on script 'adetailer' not found"),
])
def test_invalid_values_raise_request_error(fields, message):
    with pytest.raises(RequestError, match=message):
        conv(**fields)


def test_hires_converts_and_refiner_is_not_available_yet():
    request = conv(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (nearest-exact)", denoising_strength=0.4,
                   hr_sampler_name="Use same sampler").request
    assert request.enable_hr and request.hr_scale == 1.5 and request.denoising_strength == 0.4
    assert request.hr_upscaler == "Latent (nearest-exact)" and request.hr_sampler_name is None
    with pytest.raises(NotAvailable, match="refiner"):
        conv(refiner_checkpoint="refiner.safetensors")
    assert conv(refiner_checkpoint="None", enable_hr=False).request.steps == 50


def test_ignored_features_are_reported_as_warnings():
    assert conv(restore_faces=True, tiling=True).warnings == (
        "restore_faces is not available yet in this version and was ignored",
        "tiling is not available yet in this version and was ignored",
    )


# ---------------------------------------------------------------- infotext field (A1111 v1.10)
def test_infotext_fills_unset_fields_and_explicit_fields_win():
    text = "a fox\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M Karras, CFG scale: 4, Seed: 99, " \
           "Size: 64x96, Clip skip: 2"
    result = conv(infotext=text, steps=3)
    r = result.request
    assert (r.prompt, r.negative_prompt, r.steps, r.cfg_scale, r.seed) == ("a fox", "blurry", 3, 4.0, 99)
    assert (r.width, r.height, r.sampler, r.schedule, r.clip_skip) == (64, 96, "DPM++ 2M", "Karras", 2)


# ---------------------------------------------------------------- results and progress
def _result(seeds=(5, 6), interrupted=False):
    images = tuple(GeneratedImage(image=Image.new("RGB", (64, 64)), seed=s, infotext=f"p\nSeed: {s}") for s in seeds)
    return GenerationResult(images=images, parameters={"prompt": "p"},
                            info={"seed": seeds[0] if seeds else 1, "sd_model_name": "m", "version": "v"},
                            interrupted=interrupted)


def test_a1111_info_has_processed_js_keys_and_runner_values():
    request = GenerationRequest(prompt="p", steps=2, width=64, height=64, batch_size=2, checkpoint="m")
    info = convert.a1111_info(_result(), request, job_id="j1", started_at=time.time(), warnings=("w",))
    for key in ("prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
                "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
                "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
                "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
                "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp",
                "clip_skip", "is_using_inpainting_conditioning", "version"):
        assert key in info, key
    assert info["all_seeds"] == [5, 6] and info["infotexts"] == ["p\nSeed: 5", "p\nSeed: 6"]
    assert info["all_prompts"] == ["p", "p"] and info["seed"] == 5 and info["version"] == "v"
    assert info["job_id"] == "j1" and info["warnings"] == ["w"] and info["interrupted"] is False
    assert len(info["job_timestamp"]) == 14
    json.dumps(info)


def test_a1111_parameters_lists_every_request_field():
    params = convert.a1111_parameters(Txt2ImgRequest(prompt="x"))
    assert params["prompt"] == "x" and params["steps"] == 50 and params["sampler_index"] == "Euler"
    assert set(Txt2ImgRequest.model_fields) <= set(params)
    assert "type" in JobSubmit.model_fields


def test_progress_idle_shape():
    data = convert.a1111_progress(None)
    assert data["progress"] == 0 and data["eta_relative"] == 0 and data["current_image"] is None
    assert set(data["state"]) >= {"skipped", "interrupted", "job", "job_count", "job_timestamp", "job_no",
                                  "sampling_step", "sampling_steps"}
    assert data["state"]["job_count"] == 0


def test_progress_running_shape():
    job = SimpleNamespace(id="abc", kind="txt2img", state=JobState.RUNNING, started_at=100.0,
                          progress=Progress(step=5, total_steps=10, batch_index=1, batch_count=2, text="step 5/10"))
    data = convert.a1111_progress(job, now=103.0)
    assert data["progress"] == pytest.approx(0.75)
    assert data["eta_relative"] == pytest.approx(1.0)
    assert data["state"]["sampling_step"] == 5 and data["state"]["sampling_steps"] == 10
    assert data["state"]["job_no"] == 1 and data["state"]["job_count"] == 2 and data["state"]["job"] == "txt2img"
    assert data["current_task"] == "abc" and data["textinfo"] == "step 5/10"
    starting = SimpleNamespace(id="x", kind="txt2img", state=JobState.RUNNING, started_at=100.0,
                               progress=Progress(eta_seconds=7.0))
    assert convert.a1111_progress(starting, now=100.5)["progress"] == 0.01
    assert convert.a1111_progress(starting, now=100.5)["eta_relative"] == 7.0


def test_plain_makes_json_safe_values():
    from pathlib import Path

    value = convert.plain({"p": Path("/x"), "s": JobState.DONE, "t": (1, 2), "f": float("nan"), 3: object})
    assert value["p"] == "/x" and value["s"] == "done" and value["t"] == [1, 2] and value["f"] is None
    json.dumps(value)


# ---------------------------------------------------------------- images
def test_png_carries_infotext_round_trip():
    encoded = encode_png_b64(Image.new("RGB", (16, 16), "red"), "prompt\nSteps: 2, Seed: 1")
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.format == "PNG" and image.info["parameters"] == "prompt\nSteps: 2, Seed: 1"
    again = decode_image("data:image/png;base64," + encoded)
    assert again.size == (16, 16) and text_items(again) == {}


@pytest.mark.parametrize("data, message", [
    ("", "empty"),
    ("not base64 !!", "not valid base64"),
    (base64.b64encode(b"plain text, not an image").decode(), "not a PNG"),
    ("https://example.com/x.png", "not fetched"),
])
def test_bad_image_inputs_are_rejected(data, message):
    with pytest.raises(RequestError, match=message):
        decode_image(data)


def test_oversized_and_pickled_inputs_are_rejected():
    huge = base64.b64encode(png_bytes(Image.new("L", (9000, 1)))).decode()
    with pytest.raises(RequestError, match="9000x1"):
        decode_image(huge)
    import pickle

    pickled = base64.b64encode(pickle.dumps({"a": 1})).decode()
    with pytest.raises(RequestError, match="not a PNG"):
        decode_image(pickled)
