"""DiT families end to end through the app (AppContext -> worker -> manager -> runner), as a user runs them:
Flux from the split layout with a kohya (BFL-named) LoRA, SD3.5 single file, Kontext edit with a reference
image, infotext and the clear refusals; the checkpoint switch back is a RAM-cache hit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.fixtures.dit_factory import DitModels
from tests.fixtures.lora_factory import make_dit_lora
from tests.fixtures.jobs import done, pixels
from webui.context import AppContext
from webui.image_requests import Img2ImgRequest
from webui.io.metadata import parse_infotext
from webui.types import GenerationRequest, JobState, LoraRef

SMALL = dict(width=64, height=64, steps=2, prompt="a lighthouse at dusk", sampler="Euler", schedule="Simple", seed=4)


@pytest.fixture(scope="module")
def ctx(fixture_cache, tmp_path_factory):
    dit = DitModels(tmp_path_factory.mktemp("dit_e2e"), fixture_cache)
    dit.flux_unet(), dit.text_encoders(), dit.vae(), dit.sd3_single(), dit.folder("kontext")
    context = AppContext.create(dit.settings())
    yield context
    context.close()


def test_flux_txt2img_is_deterministic_and_writes_infotext(ctx):
    a = done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny"), timeout=300))
    b = done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny"), timeout=300))
    c = done(ctx.run(GenerationRequest(**{**SMALL, "seed": 5}, checkpoint="flux1-dev-tiny"), timeout=300))
    assert a.images[0].image.size == (64, 64)
    assert np.array_equal(pixels(a), pixels(b)) and not np.array_equal(pixels(a), pixels(c))
    fields = parse_infotext(a.images[0].infotext)
    assert fields["Sampler"] == "Euler" and fields["Model"].startswith("flux1-dev-tiny")


def test_flux_lora_changes_the_image_and_is_restored(ctx, tmp_path):
    done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny"), timeout=300))
    model = ctx.manager.current
    lora = make_dit_lora({"transformer": model.pipe.transformer}, "kohya_bfl", rank=2, amp=0.5, seed=3)
    path = ctx.settings.lora_dir / "tiny_flux_lora.safetensors"
    save_file({k: v.contiguous() for k, v in lora.state_dict.items()}, str(path))
    ctx.refresh_models("lora")
    plain = done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny"), timeout=300))
    styled = done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny",
                                            loras=(LoraRef(name="tiny_flux_lora", weight=1.0),)), timeout=300))
    assert not np.array_equal(pixels(plain), pixels(styled))
    assert "tiny_flux_lora" in parse_infotext(styled.images[0].infotext).get("Lora hashes", "")
    again = done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny"), timeout=300))
    assert np.array_equal(pixels(plain), pixels(again))  # the stack was restored exactly


def test_sd3_single_file_and_switch_back_is_a_cache_hit(ctx):
    done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny"), timeout=300))
    sd3 = done(ctx.run(GenerationRequest(**SMALL, checkpoint="sd3.5_medium_incl_clips_tiny",
                                         negative_prompt="blurry"), timeout=300))
    assert sd3.images[0].image.size == (64, 64)
    done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny"), timeout=300))
    assert ctx.manager.current.cache_hit


def test_kontext_edits_a_reference_image(ctx):
    kontext = next(r.name for r in ctx.checkpoints() if "kontext" in r.name.lower())
    reference = Image.new("RGB", (64, 64), (200, 40, 40))
    result = done(ctx.run(Img2ImgRequest(**SMALL, checkpoint=kontext, init_images=[reference]), timeout=300))
    assert result.images[0].image.size == (64, 64) and result.info["mode"] == "img2img"


def test_refusals_are_clear_and_the_app_keeps_working(ctx):
    job = ctx.run(GenerationRequest(**{**SMALL, "sampler": "DPM++ 2M"}, checkpoint="flux1-dev-tiny"), timeout=300)
    assert job.state is JobState.FAILED and "Euler" in job.error
    job = ctx.run(GenerationRequest(**{**SMALL, "width": 72}, checkpoint="flux1-dev-tiny"), timeout=300)
    assert job.state is JobState.FAILED and "multiple of 16" in job.error
    default = done(ctx.run(GenerationRequest(**{**SMALL, "sampler": "Euler a"}, checkpoint="flux1-dev-tiny"),
                           timeout=300))  # A1111's default sampler name: sampled as flow Euler, with a note
    assert any("Euler" in w for w in default.info["warnings"])


def test_memory_estimate_counts_the_split_parts_the_load_will_use(ctx):
    """Flux transformer file + CLIP-L + T5 + the 16-channel VAE (not CLIP-G, which Flux does not use), each at
    the run dtype (files are assumed fp16: run dtype bytes / 2)."""
    record = ctx.catalog.get("checkpoint", "flux1-dev-tiny")
    folder = ctx.settings.data_dir / "models"
    files = [record.path, folder / "text_encoders" / "clip_l.safetensors",
             folder / "text_encoders" / "t5xxl_fp16.safetensors", *sorted((folder / "VAE").glob("*.safetensors"))]
    estimate = ctx.manager.estimate(record)
    scale = ctx.manager.plan.dtype.itemsize / 2
    assert estimate.weights == sum(int(p.stat().st_size * scale) for p in files)
    assert estimate.largest == int(max(p.stat().st_size for p in files) * scale)


def test_fp8_storage_keeps_a_flux_transformer_in_float8_and_disable_brings_the_full_one_back(ctx):
    request = GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny")
    full = pixels(done(ctx.run(request, timeout=300)))
    ctx.options.update({"fp8_storage": "Enable"})
    try:
        first = pixels(done(ctx.run(request, timeout=300)))
        dtypes = {p.dtype for p in ctx.manager.current.pipe.transformer.parameters()}
        assert torch.float8_e4m3fn in dtypes and torch.float32 in dtypes  # norms / embeddings stay
        assert np.array_equal(first, pixels(done(ctx.run(request, timeout=300))))
    finally:
        ctx.options.update({"fp8_storage": "Disable"})
    assert np.array_equal(pixels(done(ctx.run(request, timeout=300))), full)
    assert torch.float8_e4m3fn not in {p.dtype for p in ctx.manager.current.pipe.transformer.parameters()}
