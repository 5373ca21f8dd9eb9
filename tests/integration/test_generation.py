"""The one generation path (AppContext -> worker -> manager -> runner) on tiny real-format models.

Behaviour, not status codes: same seed gives the same pixels, Interrupt stops within a step and keeps
finished batches, Skip drops one batch, previews stream, a broken file fails its job with a message that
names it and the next job works, VAE swaps only the VAE, switching back is a RAM-cache hit, RSS plateaus.
"""
from __future__ import annotations

import gc
import shutil
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.fixtures.factory import TinyModels, write_corrupt_checkpoint, write_pickle_checkpoint
from webui.context import AppContext
from webui.io.metadata import parse_infotext, read_infotext
from webui.settings import Settings
from webui.types import GenerationRequest, JobState, LoadModelRequest, RequestError

SMALL = dict(width=64, height=64, steps=3, prompt="a red fox, (forest:1.2)", negative_prompt="blurry")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("gen")
    models = TinyModels(root, fixture_cache)
    for name in ("sd15", "sd2v", "vae"):
        models.path(name)
    shutil.copy(models.sd15, root / "models" / "Stable-diffusion" / "tiny_sd15_copy.safetensors")
    write_corrupt_checkpoint(root / "models" / "Stable-diffusion", "broken.safetensors")
    write_pickle_checkpoint(root / "models" / "Stable-diffusion", "old.ckpt")
    context = AppContext.create(Settings.for_data_dir(root))
    context.options.update({"sd_model_checkpoint": "tiny_sd15"})
    yield context
    context.close()


def pixels(job, index=0) -> np.ndarray:
    assert job.state is JobState.DONE, job.error
    return np.asarray(job.result.images[index].image, dtype=np.int16)


def wait_for_step(job, step, timeout=60):
    deadline = time.monotonic() + timeout
    version = 0
    while job.progress.step < step and not job.state.finished:
        assert time.monotonic() < deadline, "job made no progress"
        version = job.wait_for_change(version, timeout=1)


def test_same_seed_same_image_and_batch_position_does_not_matter(ctx):
    a = ctx.run(GenerationRequest(**SMALL, seed=5), timeout=120)
    b = ctx.run(GenerationRequest(**SMALL, seed=5), timeout=120)
    c = ctx.run(GenerationRequest(**SMALL, seed=6), timeout=120)
    batch = ctx.run(GenerationRequest(**SMALL, seed=5, batch_size=2), timeout=120)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    assert [img.seed for img in batch.result.images] == [5, 6]
    assert np.abs(pixels(batch, 1) - pixels(c)).max() <= 1, "image 2 of a batch equals the single image of seed+1"
    assert np.abs(pixels(batch, 0) - pixels(a)).max() <= 1


def test_random_seed_is_resolved_and_reported(ctx):
    job = ctx.run(GenerationRequest(**SMALL, seed=-1), timeout=120)
    seed = job.result.images[0].seed
    assert 0 <= seed < 2**32
    assert f"Seed: {seed}" in job.result.images[0].infotext
    assert job.result.info["seed"] == seed


def test_saved_png_carries_a1111_infotext(ctx):
    job = ctx.run(GenerationRequest(**SMALL, seed=11, sampler="DPM++ 2M", schedule="Karras"), timeout=120)
    path = job.result.images[0].path
    assert path and path.endswith(".png") and "txt2img" in path
    parsed = parse_infotext(read_infotext(path))
    assert parsed["Prompt"] == SMALL["prompt"]
    assert parsed["Negative prompt"] == "blurry"
    assert parsed["Steps"] == "3" and parsed["Seed"] == "11"
    assert parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert parsed["Size-1"] == "64" and parsed["Size-2"] == "64"
    assert parsed["Model"] == "tiny_sd15" and len(parsed["Model hash"]) == 10
    with Image.open(path) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(job.result.images[0].image))


def test_previews_stream_while_sampling(ctx):
    job = ctx.submit(GenerationRequest(**{**SMALL, "steps": 8}, seed=1, preview_every=1))
    previews, version = [], 0
    while not job.state.finished:
        version = job.wait_for_change(version, timeout=5)
        if job.progress.preview is not None and job.progress.preview_step not in [p for p, _ in previews]:
            previews.append((job.progress.preview_step, job.progress.preview))
    assert job.state is JobState.DONE
    assert len(previews) >= 2, "several distinct preview frames during one job"
    assert all(isinstance(img, Image.Image) for _, img in previews)


def test_interrupt_stops_within_a_step_and_keeps_finished_batches(ctx):
    job = ctx.submit(GenerationRequest(**{**SMALL, "steps": 30}, seed=3, n_iter=3))
    deadline = time.monotonic() + 120
    version = 0
    while job.progress.batch_index < 1 or job.progress.step < 2:
        assert time.monotonic() < deadline and not job.state.finished
        version = job.wait_for_change(version, timeout=1)
    assert ctx.worker.interrupt(job.id)
    step_when_pressed = job.progress.step
    assert job.wait(60)
    assert job.state is JobState.INTERRUPTED
    assert job.progress.batch_index == 1
    assert job.progress.step <= step_when_pressed + 1, "stops within one sampling step"
    assert [img.seed for img in job.result.images] == [3], "the finished first batch is kept"
    after = ctx.run(GenerationRequest(**SMALL, seed=3), timeout=120)
    assert after.state is JobState.DONE, "the next job works"


def test_skip_drops_only_the_current_batch(ctx):
    job = ctx.submit(GenerationRequest(**{**SMALL, "steps": 20}, seed=40, n_iter=2))
    wait_for_step(job, 2)
    assert job.progress.batch_index == 0
    assert ctx.worker.skip(job.id)
    assert job.wait(120)
    assert job.state is JobState.DONE
    assert [img.seed for img in job.result.images] == [41]


@pytest.mark.parametrize(
    "checkpoint, fragment",
    [("broken", "broken.safetensors"), ("old", "--allow-pickle")],
)
def test_bad_checkpoint_fails_its_job_with_a_clear_message(ctx, checkpoint, fragment):
    job = ctx.run(GenerationRequest(**SMALL, checkpoint=checkpoint), timeout=120)
    assert job.state is JobState.FAILED
    assert fragment in job.error
    assert ctx.run(GenerationRequest(**SMALL, seed=1), timeout=120).state is JobState.DONE


def test_unknown_checkpoint_and_bad_size_are_refused():
    with pytest.raises(RequestError, match="multiple of 8"):
        GenerationRequest(width=65)


def test_vae_swap_changes_only_the_vae(ctx):
    plain = ctx.run(GenerationRequest(**SMALL, seed=9), timeout=120)
    unet = ctx.manager.current.pipe.unet
    swapped = ctx.run(GenerationRequest(**SMALL, seed=9, vae="tiny_vae"), timeout=120)
    assert ctx.manager.current.pipe.unet is unet, "same UNet object: only the VAE was swapped"
    assert ctx.manager.current.vae_name == "tiny_vae"
    assert "VAE: tiny_vae" in swapped.result.images[0].infotext
    assert not np.array_equal(pixels(plain), pixels(swapped))


def test_switching_back_is_a_ram_cache_hit_and_rss_plateaus(ctx):
    names = ["tiny_sd15", "tiny_sd2v", "tiny_sd15_copy"]
    for name in names:  # warm: every model loaded once
        assert ctx.run(LoadModelRequest(checkpoint=name), timeout=300).state is JobState.DONE
    gc.collect()
    rss_warm = psutil.Process().memory_info().rss
    results = []
    for i in range(10):
        job = ctx.run(LoadModelRequest(checkpoint=names[i % 3]), timeout=300)
        assert job.state is JobState.DONE, job.error
        results.append(job.result)
    gc.collect()
    rss_after = psutil.Process().memory_info().rss
    assert all(r["cache_hit"] for r in results)
    assert (rss_after - rss_warm) < 64 * 1024 * 1024, f"RSS grew by {(rss_after - rss_warm) / 2**20:.1f} MiB"
    ctx.run(LoadModelRequest(checkpoint="tiny_sd15"), timeout=300)


def test_prompt_editing_switches_conditioning_mid_run(ctx):
    def image(prompt):
        return pixels(ctx.run(GenerationRequest(**{**SMALL, "prompt": prompt, "steps": 4}, seed=21), timeout=120))

    red, blue, edited = image("red"), image("blue"), image("[red:blue:2]")
    assert not np.array_equal(edited, red) and not np.array_equal(edited, blue)
    assert np.array_equal(image("[red:blue:9]"), red), "an edit after the last step never takes effect"
