"""GPU tier for the DiT families: Flux.1-dev and SD3.5-large *architecture* at real transformer and VAE sizes
(random bf16 weights, 1024x1024), every memory mode, our worker path vs plain diffusers on the same pipeline in
the same run.  Prints it/s and peak accelerator memory per mode (the numbers go into the closing note);
asserts sanity only (finite output, our path within 1.5x of plain diffusers, offload modes use less memory).

Text encoders keep their real *output* widths (CLIP-L 768, CLIP-G 1280, T5 4096) with one layer each: they
run once per image and do not change what is measured here (denoiser steps, offload traffic).
Skipped without CUDA (CI, the CPU development machine).  ``WEBUI_GPU_DIT_STEPS`` sets the steps (default 4).
"""
from __future__ import annotations

import gc
import os
import time
from typing import Any

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = int(os.environ.get("WEBUI_GPU_DIT_STEPS", "4"))
SIZE = 1024
MODES = ("full", "model_offload", "group_offload", "sequential_offload")


def _clip(width: int, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=width * 4, num_hidden_layers=1,
                            num_attention_heads=width // 64, projection_dim=width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5() -> Any:
    from transformers import T5Config, T5EncoderModel

    from tests.fixtures.dit_factory import t5_vocab_size

    return T5EncoderModel(T5Config(vocab_size=t5_vocab_size(), d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                   num_heads=64))


def _flux_components() -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    from tests.fixtures.dit_factory import clip_tokenizer, t5_tokenizer_object

    transformer = FluxTransformer2DModel(guidance_embeds=True)  # Flux.1 dev: 19 double + 38 single blocks, 3072
    return dict(pipeline_class="FluxPipeline", config_key="flux-dev", family="flux", transformer=transformer,
                text_encoder=_clip(768, False), tokenizer=clip_tokenizer(), text_encoder_2=_t5(),
                tokenizer_2=t5_tokenizer_object())


def _sd35_components() -> dict[str, Any]:
    from diffusers import SD3Transformer2DModel

    from tests.fixtures.dit_factory import clip_tokenizer, t5_tokenizer_object

    transformer = SD3Transformer2DModel(  # SD3.5 large: 38 joint blocks, width 2432, qk rms norm
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm")
    return dict(pipeline_class="StableDiffusion3Pipeline", config_key="sd3", family="sd3", transformer=transformer,
                text_encoder=_clip(768, True), tokenizer=clip_tokenizer(), text_encoder_2=_clip(1280, True),
                tokenizer_2=clip_tokenizer(), text_encoder_3=_t5(), tokenizer_3=t5_tokenizer_object())


BUILDERS = {"flux-dev": _flux_components, "sd3.5-large": _sd35_components}
SCHEDULERS = {
    "flux-dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True,
                 "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "sd3.5-large": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family_pipe(request):
    """(family, pipeline, components) built on the GPU in bf16 (fast random init), then parked on the CPU."""
    from diffusers import AutoencoderKL

    from webui.models.dit import configs
    from webui.models.dit.components import DitComponents, build_dit_pipeline
    from webui.types import Arch

    family = request.param
    torch.manual_seed(0)
    with torch.device("cuda"):
        parts = BUILDERS[family]()
        vae = AutoencoderKL(**{k: v for k, v in configs.vae_base(parts.pop("family")).items()
                               if not k.startswith("_")})
    for value in (*parts.values(), vae):
        if isinstance(value, torch.nn.Module):
            value.to(dtype=torch.bfloat16, device="cpu").eval().requires_grad_(False)
    arch = Arch.FLUX if family.startswith("flux") else Arch.SD3
    components = DitComponents(vae=vae, scheduler_config=SCHEDULERS[family], arch=arch, **parts)
    pipe = build_dit_pipeline(components)
    torch.cuda.empty_cache()
    yield family, pipe, components
    del pipe, components
    gc.collect()
    torch.cuda.empty_cache()


def _ours(pipe: Any, components: Any, tmp_path) -> tuple[float, np.ndarray]:
    from tests.fixtures.dit_pipes import Control, FakeModel
    from webui.generation.dit import build_dit_plan
    from webui.generation.runner import RunOptions, run_generation
    from webui.types import GenerationRequest

    model = FakeModel(pipe=pipe, arch=components.arch)
    request = GenerationRequest(prompt="a lighthouse at dusk", steps=STEPS, width=SIZE, height=SIZE, seed=0,
                                sampler="Euler", cfg_scale=3.5, save_images=False, preview_every=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = run_generation(model, request, Control(), RunOptions(outdir=tmp_path, save=False, previews=False),
                            build_dit_plan(model, request))
    torch.cuda.synchronize()
    return time.perf_counter() - start, np.asarray(result.images[0].image)


def _plain(pipe: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(prompt="a lighthouse at dusk", num_inference_steps=STEPS, width=SIZE, height=SIZE, guidance_scale=3.5,
         generator=torch.Generator("cpu").manual_seed(0), output_type="pil")
    torch.cuda.synchronize()
    return time.perf_counter() - start


@pytest.mark.parametrize("mode", MODES)
def test_memory_mode_speed_and_peak_vs_plain_diffusers(family_pipe, mode, tmp_path, record_property):
    from webui.runtime import memory

    family, pipe, components = family_pipe
    device = torch.device("cuda")
    memory.apply_memory_mode(pipe, mode, device)
    try:
        torch.cuda.reset_peak_memory_stats()
        _ours(pipe, components, tmp_path)  # warm-up (kernels, offload hooks, streams)
        ours, image = min((_ours(pipe, components, tmp_path) for _ in range(2)), key=lambda r: r[0])
        peak = torch.cuda.max_memory_allocated() / 2**30
        plain = min(_plain(pipe) for _ in range(2))
    finally:
        memory.release(pipe)
        pipe.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
    line = (f"{family} {SIZE}x{SIZE} {STEPS} steps {mode}: ours {STEPS / ours:.3f} it/s, plain diffusers "
            f"{STEPS / plain:.3f} it/s (ratio {ours / plain:.3f}), peak {peak:.1f} GiB")
    print("\n" + line)
    record_property("dit_memory_mode", line)
    assert np.isfinite(image.astype(np.float32)).all()
    assert ours / plain < 1.5
    if mode == "sequential_offload":
        weights = sum(p.numel() * p.element_size() for p in components.transformer.parameters()) / 2**30
        assert peak < weights / 2, f"sequential offload kept {peak:.1f} GiB resident of {weights:.1f} GiB"
