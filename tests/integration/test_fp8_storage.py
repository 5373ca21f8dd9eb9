"""A1111's "FP8 weight" option (``fp8_storage``): the denoiser's Linear/Conv weights kept as float8_e4m3fn
(diffusers layerwise casting), cached apart from the full-precision copy, LoRAs merged and restored on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures.factory import TinyModels
from tests.fixtures.jobs import pixels
from tests.fixtures.lora_factory import make_lora, write_lora
from webui.context import AppContext
from webui.models.cache import module_bytes
from webui.options import OptionError
from webui.runtime.memory import store_weights, weight_storage
from webui.settings import Settings
from webui.types import Arch, GenerationRequest, JobState, LoadModelRequest, LoraRef

SMALL = dict(width=64, height=64, steps=2, seed=7, prompt="a red fox", negative_prompt="")
FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("choice, arch, expected", [
    ("Disable", Arch.SDXL, ""), ("Enable for SDXL", Arch.SDXL, "fp8"), ("Enable for SDXL", Arch.SDXL_REFINER, "fp8"),
    ("Enable for SDXL", Arch.SD1, ""), ("Enable", Arch.SD1, "fp8"), ("Enable", Arch.FLUX, "fp8")])
def test_which_families_the_option_applies_to(choice, arch, expected):
    assert weight_storage(choice, arch) == expected


def test_fp8_unet_computes_what_its_fp8_rounded_weights_compute():
    """The stored model equals a dense float32 model whose cast weights were rounded to float8 once (the
    forward casts each layer up to float32: same values; tolerance 1e-5 for summation order)."""
    from webui.models.tiny import build_components

    unet = build_components("sd15", dtype=torch.float32)["unet"].eval()
    reference = build_components("sd15", dtype=torch.float32)["unet"].eval()
    dense_bytes = module_bytes(unet)
    assert store_weights(unet, "fp8", torch.float32)
    stored = {name for name, p in unet.named_parameters() if p.dtype == FP8}
    assert stored and any(".norm" in n for n, p in unet.named_parameters() if p.dtype == torch.float32)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in stored:
                param.copy_(param.to(FP8).to(torch.float32))
        x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, unet.config.cross_attention_dim)
        out, ref = unet(x, t, text).sample, reference(x, t, text).sample
    assert torch.allclose(out, ref, atol=1e-5)
    assert module_bytes(unet) < 0.35 * dense_bytes  # float32 run: 1 byte instead of 4 for most weights
    assert not store_weights(unet, "", torch.float32)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("fp8")
    models = TinyModels(root, fixture_cache)
    models.path("sd15"), models.path("sdxl")
    context = AppContext.create(Settings.for_data_dir(root))
    assert context.run(LoadModelRequest(checkpoint="tiny_sd15"), timeout=300).state is JobState.DONE
    pipe = context.manager.current.pipe
    context.settings.lora_dir.mkdir(parents=True, exist_ok=True)
    write_lora(context.settings.lora_dir / "tiny_style.safetensors",
               make_lora({"unet": pipe.unet}, rank=4, alpha=4.0, amp=0.5, components=("unet",)),
               metadata={"ss_base_model_version": "sd_v1"})
    context.refresh_models("lora")
    yield context
    context.options.update({"fp8_storage": "Disable"})
    context.close()


def _unet_dtypes(ctx) -> set:
    return {p.dtype for p in ctx.manager.current.pipe.unet.parameters()}


def test_enable_reloads_in_fp8_and_disable_gives_the_untouched_full_precision_model_back(ctx):
    request = GenerationRequest(**SMALL, checkpoint="tiny_sd15")
    full = pixels(ctx.run(request, timeout=300))
    assert FP8 not in _unet_dtypes(ctx)
    ctx.options.update({"fp8_storage": "Enable"})
    fp8 = ctx.run(request, timeout=300)
    assert FP8 in _unet_dtypes(ctx)
    assert np.array_equal(pixels(ctx.run(request, timeout=300)), pixels(fp8))  # deterministic
    ctx.options.update({"fp8_storage": "Enable for SDXL"})  # SD1.5: full precision again, from the cache
    assert np.array_equal(pixels(ctx.run(request, timeout=300)), full)
    assert FP8 not in _unet_dtypes(ctx) and ctx.manager.current.cache_hit
    pixels(ctx.run(GenerationRequest(**SMALL, checkpoint="tiny_sdxl"), timeout=300))
    assert FP8 in _unet_dtypes(ctx)
    ctx.options.update({"fp8_storage": "Disable"})


def test_lora_on_fp8_weights_is_applied_and_restored_exactly(ctx):
    ctx.options.update({"fp8_storage": "Enable"})
    try:
        plain_request = GenerationRequest(**SMALL, checkpoint="tiny_sd15")
        plain = pixels(ctx.run(plain_request, timeout=300))
        before = {n: p.detach().clone() for n, p in ctx.manager.current.pipe.unet.named_parameters()}
        styled = pixels(ctx.run(GenerationRequest(**SMALL, checkpoint="tiny_sd15",
                                                  loras=(LoraRef(name="tiny_style", weight=1.0),)), timeout=300))
        assert np.abs(styled - plain).max() > 0
        again = pixels(ctx.run(plain_request, timeout=300))
        assert np.array_equal(again, plain)
        after = dict(ctx.manager.current.pipe.unet.named_parameters())
        assert all(after[n].dtype == t.dtype and torch.equal(after[n].view(torch.uint8), t.view(torch.uint8))
                   if t.dtype == FP8 else torch.equal(after[n], t) for n, t in before.items())
    finally:
        ctx.options.update({"fp8_storage": "Disable"})


def test_unknown_choice_is_refused(ctx):
    with pytest.raises(OptionError, match="fp8_storage"):
        ctx.options.update({"fp8_storage": "Maybe"})
