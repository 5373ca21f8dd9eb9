"""UI value dicts -> GenerationRequest (webui.ui.requests) and progress text (webui.ui.progress)."""
import threading
import time

import pytest

from webui.runtime.worker import Worker
from webui.types import GenerationRequest, JobState, Progress, RequestError
from webui.ui.progress import describe, describe_progress, format_eta, progress_html, watch
from webui.ui.requests import TXT2IMG_FIELDS, as_int, txt2img_field_values, txt2img_request

# What the txt2img tab sends untouched: sliders give ints (precision=0), Number gives int, CFG a float.
UI_DEFAULTS = {
    "prompt": "",
    "negative_prompt": "",
    "steps": 20,
    "sampler": "Euler a",
    "schedule": "Automatic",
    "width": 512,
    "height": 512,
    "cfg_scale": 7.0,
    "seed": -1,
    "n_iter": 1,
    "batch_size": 1,
    "clip_skip": 1,
}


def test_tab_defaults_equal_request_defaults():
    assert set(UI_DEFAULTS) == set(TXT2IMG_FIELDS)
    assert txt2img_request(UI_DEFAULTS) == GenerationRequest()


def test_empty_dict_gives_defaults_and_current_models():
    request = txt2img_request({})
    assert request == GenerationRequest()
    assert request.checkpoint is None and request.vae is None  # resolved by AppContext.submit


def test_values_are_converted_by_name():
    values = {**UI_DEFAULTS, "prompt": "a fox", "negative_prompt": "blurry", "steps": 2.0, "width": "64",
              "height": 64.0, "cfg_scale": "5.5", "seed": 123.0, "n_iter": 3, "batch_size": 2, "clip_skip": 2,
              "sampler": "DPM++ 2M", "schedule": "Karras"}
    request = txt2img_request(values, checkpoint="tiny.safetensors", vae="Automatic")
    assert request.prompt == "a fox" and request.negative_prompt == "blurry"
    assert (request.steps, request.width, request.height, request.seed) == (2, 64, 64, 123)
    assert isinstance(request.steps, int) and isinstance(request.seed, int)
    assert request.cfg_scale == 5.5
    assert (request.n_iter, request.batch_size, request.image_count) == (3, 2, 6)
    assert (request.sampler, request.schedule, request.clip_skip) == ("DPM++ 2M", "Karras", 2)
    assert (request.checkpoint, request.vae) == ("tiny.safetensors", "Automatic")


def test_seed_minus_one_means_random_and_empty_seed_too():
    assert txt2img_request({"seed": -1}).seed == -1
    assert txt2img_request({"seed": None}).seed == -1
    assert txt2img_request({"seed": ""}).seed == -1
    assert txt2img_request({"seed": 4294967295}).seed == 2**32 - 1


def test_bad_seed_is_a_clear_error():
    with pytest.raises(RequestError, match="seed must be -1"):
        txt2img_request({"seed": -5})
    with pytest.raises(RequestError, match="Seed must be a whole number"):
        txt2img_request({"seed": 1.5})


def test_width_not_multiple_of_8_names_the_fix():
    with pytest.raises(RequestError) as info:
        txt2img_request({**UI_DEFAULTS, "width": 100})
    assert str(info.value) == "width 100 is not a multiple of 8; use 96 or 104"
    with pytest.raises(RequestError, match="height 70 is not a multiple of 8; use 64 or 72"):
        txt2img_request({"height": 70})


def test_out_of_range_and_non_numbers():
    with pytest.raises(RequestError, match="steps must be between 1 and"):
        txt2img_request({"steps": 0})
    with pytest.raises(RequestError, match="Sampling steps must be a whole number, got 'many'"):
        txt2img_request({"steps": "many"})
    with pytest.raises(RequestError, match="CFG scale must be a number"):
        txt2img_request({"cfg_scale": "high"})
    with pytest.raises(RequestError, match="CFG scale must be a finite number"):
        txt2img_request({"cfg_scale": float("nan")})
    with pytest.raises(RequestError, match="whole number"):
        as_int("steps", True, 20)


def test_blank_sampler_falls_back_to_the_option_default():
    request = txt2img_request({"sampler": "", "schedule": " "},
                              options={"default_sampler": "DPM++ 2M", "default_schedule": "Karras"})
    assert (request.sampler, request.schedule) == ("DPM++ 2M", "Karras")


def test_infotext_fields_fill_only_txt2img_widgets():
    fields = {"prompt": "a fox", "steps": 2, "seed": "77", "width": 64.0, "height": 64, "cfg_scale": "6",
              "subseed": 5, "checkpoint": "x.safetensors", "sampler": "Euler", "clip_skip": "oops"}
    values = txt2img_field_values(fields)
    assert values == {"prompt": "a fox", "steps": 2, "seed": 77, "width": 64, "height": 64, "cfg_scale": 6.0,
                      "sampler": "Euler"}
    assert txt2img_request(values).seed == 77


# ---- progress text -------------------------------------------------------------------------------
def test_progress_text_has_step_batch_and_eta():
    p = Progress(step=3, total_steps=20, batch_index=1, batch_count=2, eta_seconds=75.4)
    assert describe_progress(p) == "Step 3/20 · Batch 2/2 · ETA 1m 15s"
    assert describe_progress(Progress()) == "Starting..."
    assert describe_progress(Progress(text="loading tiny.safetensors")) == "Loading tiny.safetensors"
    # the runner's own "batch 1/2" note is replaced by the full line once steps are counted
    assert describe_progress(Progress(step=1, total_steps=2, batch_count=2, text="batch 1/2")) == "Step 1/2 · Batch 1/2"
    assert format_eta(4.4) == "4s" and format_eta(None) == "" and format_eta(3725) == "1h 02m"


def test_state_descriptions():
    assert describe(JobState.QUEUED, Progress(), 2) == "Queued: position 2"
    assert describe(JobState.FAILED, Progress(), None, "boom") == "Failed: boom"
    assert describe(JobState.INTERRUPTED, Progress(), None) == "Interrupted"


def test_progress_html_escapes_and_clamps():
    out = progress_html("<b>x</b>", 1.7, error=True)
    assert "&lt;b&gt;" in out and "width:100.0%" in out and "webui-progress-error" in out


def test_watch_follows_a_job_and_reports_queue_position():
    gate = threading.Event()
    previews = [object(), object()]

    def handler(job, control):
        gate.wait(5)
        for step in (1, 2):
            control.report(Progress(step=step, total_steps=2, batch_count=1, preview=previews[step - 1],
                                    preview_step=step))
            time.sleep(0.2)
        return "ok"

    worker = Worker({GenerationRequest: handler}).start()
    try:
        first = worker.submit(GenerationRequest(), client="a")
        second = worker.submit(GenerationRequest(), client="b")
        seen = []
        for snap in watch(worker, second, poll_s=0.05):
            seen.append(snap)
            if snap.text == "Queued: position 1":
                gate.set()
        texts = [s.text for s in seen]
        assert "Queued: position 1" in texts
        assert texts.index("Queued: position 1") < texts.index("Step 2/2 · Batch 1/1")
        assert seen[-1].finished and seen[-1].state is JobState.DONE and texts[-1] == "Done"
        assert [s.preview for s in seen if s.preview is not None] == previews
        assert first.state is JobState.DONE
    finally:
        worker.stop()
