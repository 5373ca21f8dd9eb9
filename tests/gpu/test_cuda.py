"""GPU tier: runs only where CUDA is available (skipped elsewhere, including CI).

fp16 on the real device: no NaN, deterministic, and the worker path matches plain diffusers' speed on an
SD1.5-architecture model at real dimensions (random weights, 512x512, 20 steps).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def cuda_ctx(tmp_path_factory, fixture_cache):
    from tests.fixtures.factory import TinyModels
    from webui.context import AppContext
    from webui.settings import Settings

    root = tmp_path_factory.mktemp("gpu")
    models = TinyModels(root, fixture_cache)
    models.path("sd15")
    models.path("sdxl")
    ctx = AppContext.create(Settings.for_data_dir(root, device="cuda", precision="fp16"))
    yield ctx
    ctx.close()


@pytest.mark.parametrize("checkpoint", ["tiny_sd15", "tiny_sdxl"])
def test_fp16_generation_has_no_nan_and_is_deterministic(cuda_ctx, checkpoint):
    from webui.types import GenerationRequest, JobState

    request = GenerationRequest(prompt="a cat", steps=4, width=64, height=64, seed=7, checkpoint=checkpoint)
    first = cuda_ctx.run(request, timeout=300)
    second = cuda_ctx.run(request, timeout=300)
    assert first.state is JobState.DONE, first.error
    a = np.asarray(first.result.images[0].image)
    b = np.asarray(second.result.images[0].image)
    assert np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert cuda_ctx.manager.current.pipe.unet.dtype == torch.float16


def _real_sd15_components():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from webui import configs

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(configs.load_config("sd15", "unet"))
    vae = AutoencoderKL.from_config(configs.load_config("sd15", "vae"))
    text = CLIPTextModel(CLIPTextConfig(**configs.load_config("sd15", "text_encoder")))
    return unet, vae, text


def test_real_dims_sd15_speed_vs_plain_diffusers(tmp_path):
    """Prints it/s for both paths (the numbers go into the closing note); asserts only sanity."""
    from webui.generation.runner import RunOptions, run_txt2img
    from webui.models import loaders
    from webui.models.manager import LoadedModel
    from webui.prompt.encode import PromptEncoder
    from webui.types import Arch, GenerationRequest, Prediction, Variant

    unet, vae, text = _real_sd15_components()
    from webui import configs

    components = loaders.CheckpointComponents(
        unet=unet.half(), vae=vae.half(), text_encoder=text.half(),
        tokenizer=configs.make_tokenizer("sd15"),
        scheduler_config=configs.load_config("sd15", "scheduler"), arch=Arch.SD1, variant=Variant.NORMAL,
        prediction=Prediction.EPSILON, config_key="sd15",
    )
    pipe = loaders.build_pipeline(components).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    steps = 20

    def plain():
        torch.cuda.synchronize()
        t = time.perf_counter()
        pipe(prompt="a cat", num_inference_steps=steps, width=512, height=512,
             generator=torch.Generator("cpu").manual_seed(0), output_type="pil")
        torch.cuda.synchronize()
        return time.perf_counter() - t

    class Control:
        interrupted = False

        def update(self, **_):
            pass

        def consume_skip(self):
            return False

    model = LoadedModel(record=type("R", (), {"name": "real_dims_sd15"})(), components=components, pipe=pipe,
                        encoder=PromptEncoder.from_pipeline(pipe, Arch.SD1), vae_record=None, model_hash=None,
                        load_seconds=0.0, cache_hit=False)
    request = GenerationRequest(prompt="a cat", steps=steps, width=512, height=512, seed=0, sampler="Euler",
                                save_images=False, preview_every=0)

    def ours():
        torch.cuda.synchronize()
        t = time.perf_counter()
        run_txt2img(model, request, Control(), RunOptions(outdir=tmp_path, save=False, previews=False))
        torch.cuda.synchronize()
        return time.perf_counter() - t

    plain(), ours()  # warm-up
    base = min(plain() for _ in range(3))
    mine = min(ours() for _ in range(3))
    print(f"\nSD1.5 real dims 512x512 {steps} steps: plain {steps / base:.2f} it/s, ours {steps / mine:.2f} it/s, "
          f"ratio {mine / base:.3f}")
    assert mine / base < 1.5
