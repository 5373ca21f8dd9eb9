"""The real app (webui.app.start) on tiny models, driven through gradio_client like an API user.

Endpoint outputs (States are not part of the API): progress, preview, gallery, infotext, seed, status.
"""
from __future__ import annotations

import html
import re
import time

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from webui.io.metadata import parse_infotext, read_infotext  # noqa: E402
from webui.settings import Settings  # noqa: E402
from webui.types import JobState  # noqa: E402
from tests.fixtures.net import free_port

PROGRESS, PREVIEW, GALLERY, INFOTEXT, SEED, STATUS = range(6)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def text_of(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup or "")).strip()


def is_update(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    from webui.app import start

    data = tmp_path_factory.mktemp("ui_client")
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    source = tiny_models.sd15.read_bytes()
    (ckpt_dir / "tiny_sd15.safetensors").write_bytes(source)
    (ckpt_dir / "broken.safetensors").write_bytes(source[: len(source) // 2])  # an interrupted download
    running = start(Settings.for_data_dir(data, port=free_port()))
    yield running
    running.close()


@pytest.fixture
def client(app):
    return Client(app.url, verbose=False)


def run_txt2img(client: Client, **values):
    """Submit, wait, return (final outputs, every output tuple seen)."""
    job = client.submit(api_name="/txt2img", **values)
    final = job.result(timeout=240)
    return final, job.outputs()


def wait_for(job, predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for out in job.outputs():
            if predicate(out):
                return out
        if job.done():
            break
        time.sleep(0.02)
    raise AssertionError(f"never saw the expected update; last outputs: {job.outputs()[-3:]}")


def progress_is(pattern):
    return lambda out: isinstance(out[PROGRESS], str) and re.search(pattern, text_of(out[PROGRESS]))


def test_api_names_and_parameters(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/txt2img", "/txt2img_interrupt", "/txt2img_skip", "/set_checkpoint", "/set_vae", "/refresh_models",
            "/png_info", "/apply_settings"} <= set(api)
    params = [p["parameter_name"] for p in api["/txt2img"]["parameters"]]
    assert params[:12] == ["prompt", "negative_prompt", "steps", "sampler", "schedule", "width", "height",
                           "cfg_scale", "seed", "n_iter", "batch_size", "clip_skip"]
    assert {"enable_hr", "hr_scale", "hr_upscaler", "denoising_strength"} <= set(params)  # hires-fix accordion
    assert "/upscale" in api


def test_txt2img_returns_image_with_parsable_infotext(client):
    final, _ = run_txt2img(client, prompt="a red fox", negative_prompt="blurry", steps=2, width=64, height=64,
                           seed=42)
    assert text_of(final[PROGRESS]).startswith("Done: 1 image")
    assert len(final[GALLERY]) == 1
    path = final[GALLERY][0]["image"]
    parsed = parse_infotext(final[INFOTEXT])
    assert "Steps: 2" in final[INFOTEXT] and "Seed: 42" in final[INFOTEXT] and "Size: 64x64" in final[INFOTEXT]
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Steps"], parsed["Seed"]) == (
        "a red fox", "blurry", "2", "42")
    assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "64")
    assert read_infotext(path) == final[INFOTEXT]  # the served PNG keeps its parameters chunk
    assert text_of(final[SEED]) == "Seed: 42"


def test_random_seed_is_resolved_and_shown(client):
    final, _ = run_txt2img(client, prompt="x", steps=2, width=64, height=64, seed=-1, batch_size=2)
    seed = int(parse_infotext(final[INFOTEXT])["Seed"])
    assert seed >= 0 and text_of(final[SEED]).startswith(f"Seeds: {seed}")
    assert len(final[GALLERY]) == 2


def test_progress_and_previews_stream_while_generating(client):
    _, outputs = run_txt2img(client, prompt="x", steps=12, width=64, height=64, seed=1)
    steps = [text_of(o[PROGRESS]) for o in outputs if isinstance(o[PROGRESS], str) and "Step" in o[PROGRESS]]
    assert any(re.match(r"Step ([1-9]|1[01])/12 · Batch 1/1", s) for s in steps), steps
    previews = [o[PREVIEW] for o in outputs if o[PREVIEW] and not is_update(o[PREVIEW])]
    assert previews, "no live preview image was streamed"
    assert text_of(outputs[-1][PROGRESS]).startswith("Done")


def test_bad_width_is_a_clear_error(client):
    with pytest.raises(Exception, match="width 100 is not a multiple of 8; use 96 or 104"):
        client.predict(prompt="x", steps=2, width=100, height=64, api_name="/txt2img")


def test_interrupt_stops_early_and_keeps_finished_images(app, client):
    job = client.submit(prompt="x", steps=60, width=64, height=64, seed=3, n_iter=2, api_name="/txt2img")
    wait_for(job, progress_is(r"Step \d+/60 · Batch 2/2"), timeout=240)
    status = client.predict(api_name="/txt2img_interrupt")
    assert "Interrupting" in text_of(status)
    final = job.result(timeout=120)
    assert text_of(final[PROGRESS]) == "Interrupted: kept 1 image(s)"
    assert len(final[GALLERY]) == 1
    worker_job = [j for j in app.ctx.worker.jobs() if getattr(j.request, "n_iter", None) == 2][-1]
    assert worker_job.state is JobState.INTERRUPTED


def test_skip_drops_the_current_batch_and_goes_on(client):
    job = client.submit(prompt="skip", steps=60, width=64, height=64, seed=20, n_iter=2, api_name="/txt2img")
    wait_for(job, progress_is(r"Step \d+/60 · Batch 1/2"), timeout=240)
    assert "Skipping" in text_of(client.predict(api_name="/txt2img_skip"))
    final = job.result(timeout=240)
    assert text_of(final[PROGRESS]).startswith("Done: 1 image")
    assert "Seed: 21" in final[INFOTEXT]  # the second batch's seed: the first batch was skipped


def test_two_clients_are_served_in_order_and_cannot_stop_each_other(app):
    first, second, idle = (Client(app.url, verbose=False) for _ in range(3))
    long_job = first.submit(prompt="first", steps=150, width=64, height=64, seed=5, api_name="/txt2img")
    wait_for(long_job, progress_is(r"Step \d+/150"), timeout=240)
    short_job = second.submit(prompt="second", steps=2, width=64, height=64, seed=6, api_name="/txt2img")
    wait_for(short_job, progress_is(r"Queued: position 1"))
    # a user with nothing submitted cannot stop someone else's job
    assert "Nothing of yours is running" in text_of(idle.predict(api_name="/txt2img_interrupt"))
    assert "Nothing of yours is running" in text_of(idle.predict(api_name="/txt2img_skip"))
    time.sleep(0.3)
    assert not long_job.done() and not short_job.done()
    first.predict(api_name="/txt2img_interrupt")
    long_final, short_final = long_job.result(timeout=120), short_job.result(timeout=120)
    assert text_of(long_final[PROGRESS]).startswith("Interrupted")
    assert text_of(short_final[PROGRESS]).startswith("Done") and "Seed: 6" in short_final[INFOTEXT]
    jobs = {getattr(j.request, "prompt", None): j for j in app.ctx.worker.jobs()}
    assert jobs["first"].number < jobs["second"].number
    assert jobs["first"].finished_at <= jobs["second"].started_at


def test_interrupt_while_queued_cancels_only_your_own_job(app):
    first, second = Client(app.url, verbose=False), Client(app.url, verbose=False)
    long_job = first.submit(prompt="blocker", steps=150, width=64, height=64, api_name="/txt2img")
    wait_for(long_job, progress_is(r"Step \d+/150"), timeout=240)
    queued = second.submit(prompt="queued", steps=2, width=64, height=64, api_name="/txt2img")
    wait_for(queued, progress_is(r"Queued: position 1"))
    assert "Interrupting" in text_of(second.predict(api_name="/txt2img_interrupt"))
    final = queued.result(timeout=60)
    assert text_of(final[PROGRESS]).startswith("Cancelled")
    assert not long_job.done()
    first.predict(api_name="/txt2img_interrupt")
    assert text_of(long_job.result(timeout=120)[PROGRESS]).startswith("Interrupted")


def test_checkpoint_dropdown_loads_and_rejects_broken_files(app, client):
    job = client.submit("tiny_sd15", api_name="/set_checkpoint")
    value, status = job.result(timeout=120)
    assert value == "tiny_sd15" and "Loaded tiny_sd15.safetensors" in text_of(status)
    busy = [text_of(update[1]) for update in job.outputs() if "Loading" in text_of(update[1])]
    assert busy and re.search(r"Loading tiny_sd15\.safetensors \(about \d+\.\d GB of weights \(RAM\)\)", busy[0])
    assert app.ctx.options.get("sd_model_checkpoint") == "tiny_sd15"
    value, status = client.predict("broken", api_name="/set_checkpoint")
    assert value == "tiny_sd15"  # the previous choice is kept
    assert "broken.safetensors cannot be used" in text_of(status)
    assert app.ctx.options.get("sd_model_checkpoint") == "tiny_sd15"
    value, status = client.predict("Automatic", api_name="/set_vae")
    assert value == "Automatic" and text_of(status) == "VAE: Automatic."


def test_refresh_finds_new_files(app, client):
    ckpt_dir = app.ctx.settings.ckpt_dir
    copy = ckpt_dir / "tiny_copy.safetensors"
    copy.write_bytes((ckpt_dir / "tiny_sd15.safetensors").read_bytes())
    try:
        *_, status = client.predict(api_name="/refresh_models")
        assert text_of(status) == "Found 2 usable checkpoint(s)."
        assert "tiny_copy" in [r.name for r in app.ctx.usable_checkpoints()]
    finally:
        copy.unlink()
        client.predict(api_name="/refresh_models")


def test_settings_apply_and_reject(app, client):
    result = client.predict(samples_filename_pattern="[seed]-[number]", api_name="/apply_settings")
    assert "Saved 1 setting(s): samples_filename_pattern" in text_of(result)
    assert app.ctx.options.get("samples_filename_pattern") == "[seed]-[number]"
    result = client.predict(show_progress_every_n_steps=0, api_name="/apply_settings")
    assert "option 'show_progress_every_n_steps' must be >= 1, got 0" in text_of(result)
    assert app.ctx.options.get("show_progress_every_n_steps") == 1
    client.predict(samples_filename_pattern="[number]-[seed]", api_name="/apply_settings")


def test_png_info_reads_a_generated_image(client):
    final, _ = run_txt2img(client, prompt="png info", steps=2, width=64, height=64, seed=9)
    text, parsed, status = client.predict(handle_file(final[GALLERY][0]["image"]), api_name="/png_info")
    assert text == final[INFOTEXT]
    assert parsed["Seed"] == "9" and parsed["Prompt"] == "png info"
    assert text_of(status) == ""
